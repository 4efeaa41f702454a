"""Speculative verification of draft trees in Triton: one program per request.

Layouts and arithmetic as in python/forkdec/reference/speculative.py (request
b's rows start at tree_indptr[b] + b; accept when u * q(x) < p(x) in float64;
residual max(p - q, 0) in fp32 over its float64 sum; bonus by inverse CDF in
float64). A program walks its tree with scalar loads; whole vocabulary rows
are streamed in BLOCK-wide tiles only on a rejection (the residual, kept in a
[B, V] fp32 scratch row) and for the final draw. Greedy keeps its per-node
state (argmax, matched, path lengths) in small int32 scratch arrays; each write
to them is followed by a barrier before any thread reads it back (scalar stores
are made by one thread, loads by all).

Launchers: verify_tree_greedy, verify_tree_sampling (both return
accepted_tokens, accepted_nodes, num_accepted, bonus_token).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_V = 1024
# 8 warps: [1024] float64 tiles at 4 warps spilled 8 B on sm_80 (tests/test_triton_compile.py).
NUM_WARPS = 8


@triton.jit
def _row_argmax(row_ptr, vocab, BLOCK: tl.constexpr):
    """First index of the maximum of a row (read in its dtype, compared in fp32)."""
    # loop-carried scalars start as tensors (a constexpr start would change type in the loop)
    best = tl.program_id(0).to(tl.float32) * 0 - float("inf")
    best_idx = tl.program_id(0) * 0
    for v0 in range(0, vocab, BLOCK):
        offs = v0 + tl.arange(0, BLOCK)
        vals = tl.load(row_ptr + offs, mask=offs < vocab, other=-float("inf")).to(tl.float32)
        block_max = tl.max(vals, 0)
        block_idx = tl.min(tl.where(vals == block_max, offs, vocab), 0)
        better = block_max > best  # strictly: an earlier block keeps its tie
        best_idx = tl.where(better, block_idx, best_idx)
        best = tl.where(better, block_max, best)
    return best_idx


@triton.jit
def _greedy_kernel(tok_ptr, par_ptr, indptr_ptr, logits_ptr, stride_l,
                   best_token_ptr, best_child_ptr, length_ptr, matched_ptr,
                   out_tok_ptr, out_node_ptr, num_ptr, bonus_ptr, vocab, max_depth,
                   BLOCK: tl.constexpr):
    b = tl.program_id(0)
    start = tl.load(indptr_ptr + b)
    n = tl.load(indptr_ptr + b + 1) - start
    base = start + b  # scratch slots: base + 0 is the root, base + 1 + i node i
    tl.store(best_token_ptr + base, _row_argmax(logits_ptr + base.to(tl.int64) * stride_l, vocab, BLOCK).to(tl.int32))
    tl.store(best_child_ptr + base, -1)
    # A scalar store is made by one thread and the loads below by all: every
    # write to the scratch arrays is followed by a barrier before it is read
    # (without one, warps may read stale scratch, disagree on a branch, and
    # walk garbage child indices out of bounds; the empty tree reads these two).
    tl.debug_barrier()
    for i in range(0, n):  # parents come first: one pass in index order
        par = tl.load(par_ptr + start + i)
        parent_ok = tl.where(par < 0, 1, tl.load(matched_ptr + start + tl.maximum(par, 0)))
        hit = (parent_ok != 0) & (tl.load(tok_ptr + start + i) == tl.load(best_token_ptr + base + 1 + par))
        tl.store(matched_ptr + start + i, hit.to(tl.int32))
        tl.store(best_child_ptr + base + 1 + i, -1)
        tl.store(length_ptr + start + i, 0)
        if hit:
            row = logits_ptr + (base + 1 + i).to(tl.int64) * stride_l
            tl.store(best_token_ptr + base + 1 + i, _row_argmax(row, vocab, BLOCK).to(tl.int32))
        tl.debug_barrier()
    for k in range(0, n):  # children before parents: lengths of the longest matching paths
        i = n - 1 - k
        if tl.load(matched_ptr + start + i) != 0:
            child = tl.load(best_child_ptr + base + 1 + i)
            length = 1 + tl.where(child >= 0, tl.load(length_ptr + start + tl.maximum(child, 0)), 0)
            tl.store(length_ptr + start + i, length)
            slot = base + 1 + tl.load(par_ptr + start + i)
            current = tl.load(best_child_ptr + slot)
            current_len = tl.where(current >= 0, tl.load(length_ptr + start + tl.maximum(current, 0)), -1)
            if length >= current_len:  # walking down the indices: the lower index wins ties
                tl.store(best_child_ptr + slot, i)
        tl.debug_barrier()
    out_tok = out_tok_ptr + b.to(tl.int64) * (max_depth + 1)
    out_node = out_node_ptr + b.to(tl.int64) * max_depth
    for j in range(0, max_depth):
        tl.store(out_tok + j + 1, -1)
        tl.store(out_node + j, -1)
    node = b * 0 - 1
    depth = b * 0
    child = tl.load(best_child_ptr + base)
    while child >= 0:
        tl.store(out_tok + depth, tl.load(tok_ptr + start + child))
        tl.store(out_node + depth, child)
        depth += 1
        node = child
        child = tl.load(best_child_ptr + base + 1 + node)
    bonus = tl.load(best_token_ptr + base + 1 + node)
    tl.store(out_tok + depth, bonus)
    tl.store(num_ptr + b, depth)
    tl.store(bonus_ptr + b, bonus)


@triton.jit
def _residual_sum(p_ptr, q_ptr, vocab, BLOCK: tl.constexpr):
    """float64 sum of max(p - q, 0) (p, q read in their dtypes, subtracted in fp32)."""
    total = tl.zeros((BLOCK,), dtype=tl.float64)
    for v0 in range(0, vocab, BLOCK):
        offs = v0 + tl.arange(0, BLOCK)
        m = offs < vocab
        p = tl.load(p_ptr + offs, mask=m, other=0.0).to(tl.float32)
        q = tl.load(q_ptr + offs, mask=m, other=0.0).to(tl.float32)
        total += tl.maximum(p - q, 0.0).to(tl.float64)
    return tl.sum(total, 0)


@triton.jit
def _residual_store(p_ptr, q_ptr, out_ptr, total, vocab, BLOCK: tl.constexpr):
    """out = fp32(max(p - q, 0) / total); p_ptr may be out_ptr (each tile is read before written)."""
    for v0 in range(0, vocab, BLOCK):
        offs = v0 + tl.arange(0, BLOCK)
        m = offs < vocab
        p = tl.load(p_ptr + offs, mask=m, other=0.0).to(tl.float32)
        q = tl.load(q_ptr + offs, mask=m, other=0.0).to(tl.float32)
        r = tl.maximum(p - q, 0.0).to(tl.float64)
        tl.store(out_ptr + offs, (r / total).to(tl.float32), mask=m)


@triton.jit
def _inverse_cdf(p_ptr, u, vocab, BLOCK: tl.constexpr):
    """The first k with cumsum(p)[k] > u * sum(p) in float64 and p[k] > 0; the
    last positive entry if rounding leaves none, 0 for an all-zero row."""
    acc = tl.zeros((BLOCK,), dtype=tl.float64)
    for v0 in range(0, vocab, BLOCK):
        offs = v0 + tl.arange(0, BLOCK)
        acc += tl.load(p_ptr + offs, mask=offs < vocab, other=0.0).to(tl.float32).to(tl.float64)
    threshold = u * tl.sum(acc, 0)
    running = tl.sum(tl.zeros((BLOCK,), dtype=tl.float64), 0)
    found = tl.program_id(0) * 0 + vocab
    last_positive = tl.program_id(0) * 0 - 1
    for v0 in range(0, vocab, BLOCK):
        offs = v0 + tl.arange(0, BLOCK)
        m = offs < vocab
        p = tl.load(p_ptr + offs, mask=m, other=0.0).to(tl.float32)
        p64 = p.to(tl.float64)
        cdf = tl.cumsum(p64, 0) + running
        hit = m & (cdf > threshold) & (p > 0)
        found = tl.minimum(found, tl.min(tl.where(hit, offs, vocab), 0))
        last_positive = tl.maximum(last_positive, tl.max(tl.where(m & (p > 0), offs, -1), 0))
        running += tl.sum(p64, 0)
    return tl.where(found < vocab, found, tl.maximum(last_positive, 0))


@triton.jit
def _sampling_kernel(tok_ptr, par_ptr, indptr_ptr, draft_ptr, stride_d, target_ptr, stride_t, u_ptr, work_ptr,
                     out_tok_ptr, out_node_ptr, num_ptr, bonus_ptr, vocab, max_depth,
                     DRAFT_MATCH: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    start = tl.load(indptr_ptr + b)
    n = tl.load(indptr_ptr + b + 1) - start
    base = start + b
    if DRAFT_MATCH:
        draft_base = base
    else:
        draft_base = start
    work = work_ptr + b.to(tl.int64) * vocab
    out_tok = out_tok_ptr + b.to(tl.int64) * (max_depth + 1)
    out_node = out_node_ptr + b.to(tl.int64) * max_depth
    for j in range(0, max_depth):
        tl.store(out_tok + j + 1, -1)
        tl.store(out_node + j, -1)
    node = start * 0 - 1
    from_target = start * 0 + 1  # p is the target row of `node` (1) or the residual in `work` (0)
    depth = start * 0
    searching = start * 0 + 1
    while searching != 0:
        trow = target_ptr + (base + 1 + node).to(tl.int64) * stride_t
        drow = draft_ptr + (draft_base + 1 + node).to(tl.int64) * stride_d
        accepted = node * 0 - 1
        c = node + 1  # children have larger indices
        while (c < n) & (accepted < 0):
            if tl.load(par_ptr + start + c) == node:
                x = tl.load(tok_ptr + start + c)
                q_x = tl.load(drow + x).to(tl.float32).to(tl.float64)
                if from_target != 0:
                    p_x = tl.load(trow + x).to(tl.float32).to(tl.float64)
                else:
                    p_x = tl.load(work + x).to(tl.float64)
                u = tl.load(u_ptr + base + 1 + c)
                if u * q_x < p_x:  # accept with probability min(1, p(x) / q(x))
                    accepted = c
                else:  # p <- norm(max(p - q, 0)); kept as is if nothing is left
                    if from_target != 0:
                        total = _residual_sum(trow, drow, vocab, BLOCK)
                        if total > 0:
                            _residual_store(trow, drow, work, total, vocab, BLOCK)
                            from_target = from_target * 0
                    else:
                        total = _residual_sum(work, drow, vocab, BLOCK)
                        if total > 0:
                            _residual_store(work, drow, work, total, vocab, BLOCK)
                    tl.debug_barrier()
            c += 1
        if accepted >= 0:
            tl.store(out_tok + depth, tl.load(tok_ptr + start + accepted))
            tl.store(out_node + depth, accepted)
            depth += 1
            node = accepted
            from_target = from_target * 0 + 1
        else:
            searching = searching * 0
    u0 = tl.load(u_ptr + base)
    if from_target != 0:
        bonus = _inverse_cdf(target_ptr + (base + 1 + node).to(tl.int64) * stride_t, u0, vocab, BLOCK)
    else:
        bonus = _inverse_cdf(work, u0, vocab, BLOCK)
    tl.store(out_tok + depth, bonus)
    tl.store(num_ptr + b, depth)
    tl.store(bonus_ptr + b, bonus)


def _outputs(batch: int, max_depth: int, device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    i32 = dict(dtype=torch.int32, device=device)
    return (torch.empty(batch, max_depth + 1, **i32), torch.empty(batch, max_depth, **i32),
            torch.empty(batch, **i32), torch.empty(batch, **i32))


def _unit_rows(t: Tensor) -> Tensor:
    return t.contiguous() if t.dim() == 2 and t.shape[1] > 1 and t.stride(1) != 1 else t


def verify_tree_greedy(draft_tokens: Tensor, parents: Tensor, tree_indptr: Tensor, target_logits: Tensor,
                       max_depth: int):
    batch, n = tree_indptr.numel() - 1, parents.numel()
    device = target_logits.device
    out = _outputs(batch, max_depth, device)
    if batch == 0:
        return out
    logits = _unit_rows(target_logits)
    i32 = dict(dtype=torch.int32, device=device)
    tok, par, ip = (t.to(torch.int32).contiguous() for t in (draft_tokens, parents, tree_indptr))
    best_token, best_child = torch.empty(n + batch, **i32), torch.empty(n + batch, **i32)
    length, matched = torch.empty(max(n, 1), **i32), torch.empty(max(n, 1), **i32)
    _greedy_kernel[(batch,)](tok, par, ip, logits, logits.stride(0), best_token, best_child, length, matched,
                             *out, logits.shape[1], max_depth, BLOCK=BLOCK_V, num_warps=NUM_WARPS,
                             enable_fp_fusion=False)
    return out


def verify_tree_sampling(draft_tokens: Tensor, parents: Tensor, tree_indptr: Tensor, draft_probs: Tensor,
                         target_probs: Tensor, uniforms: Tensor, max_depth: int, draft_rows_match_target: bool):
    batch = tree_indptr.numel() - 1
    device = target_probs.device
    out = _outputs(batch, max_depth, device)
    if batch == 0:
        return out
    target, draft = _unit_rows(target_probs), _unit_rows(draft_probs)
    vocab = target.shape[1]
    tok, par, ip = (t.to(torch.int32).contiguous() for t in (draft_tokens, parents, tree_indptr))
    work = torch.empty(batch, vocab, dtype=torch.float32, device=device)
    u = uniforms.to(torch.float64).contiguous()
    _sampling_kernel[(batch,)](tok, par, ip, draft, draft.stride(0), target, target.stride(0), u, work, *out,
                               vocab, max_depth, DRAFT_MATCH=bool(draft_rows_match_target), BLOCK=BLOCK_V,
                               num_warps=NUM_WARPS,
                               enable_fp_fusion=False)  # the other backends' arithmetic: no FMA contraction
    return out
