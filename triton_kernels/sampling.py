"""Sampling with temperature, top-k, top-p and min-p in Triton, sorting-free.

`sample_rows(x, row_ids, uniforms, temperature, top_k, top_p, min_p, tokens)`:
one program per output row r draws from x[row_ids[r]] with uniforms[r]
(semantics: docs/sampling.md). Nothing is sorted: each threshold is found by a
binary search over the 2**32 fp32 values, represented as order-preserving
int32 keys, with one reduction over the row per step (32 steps):
  top-k: the smallest key b with count(key > b) < k, kept: key >= b;
  top-p: the smallest key b with mass(top-k tokens with key > b) < p * mass(top-k),
         kept: key >= b (so tie groups are kept whole, as in the other backends);
  min-p: kept: exp(a - max) >= min_p.
Each step rereads a row that a GPU keeps in L2 for the usual vocabularies; the
search is exact (it ends on a value present in the row), unlike a fixed number
of pivot rounds that stop near the threshold. The draw is an inverse CDF in
index order: block sums, then a cumulative sum inside the crossing block.
A row that leaves no token gets token -1 (the caller raises).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

KEY_BELOW_ALL = tl.constexpr(-(2**31) - 1)  # below every int32 key: count(key > it) is the row size
SEARCH_STEPS = tl.constexpr(33)  # the interval (lo, hi] spans at most 2**32 + 1 keys
# Compiler float options, set explicitly: no FMA contraction, so that a GPU
# rounds each product and sum as the interpreter and the CPU kernels do.
FLOAT_OPTIONS = {"enable_fp_fusion": False}


@triton.jit
def _key(a):
    """int64 key with key(a) < key(b) exactly when a < b, for non-NaN fp32 a (no -0.0)."""
    bits = a.to(tl.int32, bitcast=True)
    return (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.int64)


@triton.jit
def _scaled(x_row, start, offs, vocab, inv_t):
    mask = start + offs < vocab
    x = tl.load(x_row + start + offs, mask=mask, other=float("-inf")).to(tl.float32)
    # x * (1/t) would round differently from x / t, which the other backends use; and
    # on a GPU `/` is an approximate division: div_rn rounds as IEEE (and the CPU) do.
    return tl.math.div_rn(x, inv_t) + 0.0, mask


@triton.jit
def _sample_kernel(x_ptr, row_ids_ptr, u_ptr, t_ptr, k_ptr, p_ptr, min_p_ptr, out_ptr, vocab, x_row_stride,
                   BLOCK: tl.constexpr):
    r = tl.program_id(0)
    row = tl.load(row_ids_ptr + r)
    x_row = x_ptr + row * x_row_stride
    t = tl.load(t_ptr + r)
    k = tl.load(k_ptr + r)
    p = tl.load(p_ptr + r)
    min_p = tl.load(min_p_ptr + r)
    u = tl.load(u_ptr + r)
    divisor = tl.where(t == 0, 1.0, t)  # greedy ranks the raw logits
    offs = tl.arange(0, BLOCK)

    # Pass 1: the max and its first index.
    top = float("-inf")
    first = vocab
    for start in range(0, vocab, BLOCK):
        a, mask = _scaled(x_row, start, offs, vocab, divisor)
        block_top = tl.max(a, axis=0)
        block_first = tl.min(tl.where(mask & (a == block_top), start + offs, vocab), axis=0)
        first = tl.where(block_top > top, block_first, first)
        top = tl.maximum(top, block_top)
    usable = (top > float("-inf")) & (top < float("inf"))

    if t == 0:
        tl.store(out_ptr + r, tl.where(usable, first, -1).to(tl.int64))
    else:
        # A row without a finite max stores -1 below; 0 keeps its exp finite meanwhile.
        top = tl.where(usable, top, 0.0)
        top_key = _key(top)
        # top-k threshold key (KEY_BELOW_ALL: off).
        k_key = tl.full((), KEY_BELOW_ALL, tl.int64)
        if (k > 0) & (k < vocab):
            lo = tl.full((), KEY_BELOW_ALL, tl.int64)
            hi = top_key
            for _ in range(SEARCH_STEPS):
                mid = (lo + hi) >> 1
                count = tl.zeros((), tl.int64)
                for start in range(0, vocab, BLOCK):
                    a, mask = _scaled(x_row, start, offs, vocab, divisor)
                    count += tl.sum((mask & (_key(a) > mid)).to(tl.int64), axis=0)
                below = count < k
                hi = tl.where(below & (hi - lo > 1), mid, hi)
                lo = tl.where(~below & (hi - lo > 1), mid, lo)
            k_key = hi

        # The top-k mass, then the top-p threshold key within it.
        mass_k = 0.0
        for start in range(0, vocab, BLOCK):
            a, mask = _scaled(x_row, start, offs, vocab, divisor)
            mass_k += tl.sum(tl.where(mask & (_key(a) >= k_key), tl.exp(a - top), 0.0), axis=0)
        p_key = tl.full((), KEY_BELOW_ALL, tl.int64)
        if p < 1:
            limit = p * mass_k
            lo = tl.full((), KEY_BELOW_ALL, tl.int64)
            hi = top_key
            for _ in range(SEARCH_STEPS):
                mid = (lo + hi) >> 1
                mass = 0.0
                for start in range(0, vocab, BLOCK):
                    a, mask = _scaled(x_row, start, offs, vocab, divisor)
                    key = _key(a)
                    mass += tl.sum(tl.where(mask & (key >= k_key) & (key > mid), tl.exp(a - top), 0.0), axis=0)
                below = mass < limit
                hi = tl.where(below & (hi - lo > 1), mid, hi)
                lo = tl.where(~below & (hi - lo > 1), mid, lo)
            p_key = hi

        # Kept weights: their total, then the inverse CDF at u * total.
        keep_key = tl.maximum(k_key, p_key)
        total = 0.0
        for start in range(0, vocab, BLOCK):
            a, mask = _scaled(x_row, start, offs, vocab, divisor)
            e = tl.exp(a - top)
            total += tl.sum(tl.where(mask & (_key(a) >= keep_key) & (e >= min_p), e, 0.0), axis=0)
        target = u * total
        running = 0.0
        token = tl.full((), -1, tl.int64)
        last = tl.full((), -1, tl.int64)
        for start in range(0, vocab, BLOCK):
            a, mask = _scaled(x_row, start, offs, vocab, divisor)
            e = tl.exp(a - top)
            w = tl.where(mask & (_key(a) >= keep_key) & (e >= min_p), e, 0.0)
            running_in = running + tl.cumsum(w, axis=0)
            index = (start + offs).to(tl.int64)
            hit = tl.min(tl.where((w > 0) & (running_in > target), index, vocab), axis=0)
            token = tl.where((token < 0) & (hit < vocab), hit, token)
            last = tl.maximum(last, tl.max(tl.where(w > 0, index, -1), axis=0))
            running += tl.sum(w, axis=0)
        token = tl.where(token < 0, last, token)  # u * total rounded up to the end
        ok = usable & (total > 0) & (total < float("inf"))
        tl.store(out_ptr + r, tl.where(ok, token, -1))


def sample_rows(x: torch.Tensor, row_ids: torch.Tensor, uniforms: torch.Tensor, temperature: torch.Tensor,
                top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor, tokens: torch.Tensor) -> None:
    """tokens[r] = the draw from x[row_ids[r]] with uniforms[r] and row r's parameters.

    x: [B, V] fp32/fp16/bf16, unit column stride. row_ids, top_k: int64 [R];
    uniforms, temperature, top_p, min_p: fp32 [R]; tokens: int64 [R], written
    (-1 for a row that leaves no token). All contiguous, on x's device.
    """
    rows, vocab = x.shape
    out_rows = tokens.numel()
    assert x.dtype in (torch.float32, torch.float16, torch.bfloat16), x.dtype
    assert vocab <= 1 or x.stride(1) == 1, "x needs unit column stride"
    for t, dtype in ((row_ids, torch.int64), (uniforms, torch.float32), (temperature, torch.float32),
                     (top_k, torch.int64), (top_p, torch.float32), (min_p, torch.float32), (tokens, torch.int64)):
        assert t.dtype == dtype and t.is_contiguous() and t.numel() == out_rows, (t.dtype, t.shape)
    if out_rows == 0:
        return
    block = min(max(triton.next_power_of_2(vocab), 16), 4096)
    _sample_kernel[(out_rows,)](x, row_ids, uniforms, temperature, top_k, top_p, min_p, tokens, vocab,
                                x.stride(0), BLOCK=block, num_warps=8 if block >= 2048 else 4, **FLOAT_OPTIONS)


# ---- per-token signals: the log-sum-exp and the top-k logprobs of each row ------------------

KEY_MIN = tl.constexpr(-(2**63))  # below every (value, index) key: an empty slot
KEY_MAX = tl.constexpr(2**63 - 1)  # a slot past k: never the worst, never returned


@triton.jit
def _signals_kernel(x_ptr, row_ids_ptr, tokens_ptr, logprob_ptr, top_lp_ptr, top_id_ptr, conf_ptr, vocab,
                    x_row_stride, num_top, BLOCK: tl.constexpr, TOP: tl.constexpr):
    r = tl.program_id(0)
    row = tl.load(row_ids_ptr + r)
    x_row = x_ptr + row * x_row_stride
    offs = tl.arange(0, BLOCK)
    slots = tl.arange(0, TOP)
    # (value, index) as one int64 key, larger = better: value descending, then
    # index ascending. Keys are unique, so the top k is a set of k keys.
    best = tl.where(slots < num_top, KEY_MIN, KEY_MAX).to(tl.int64)
    m = -3.4028234663852886e38  # -FLT_MAX, not -inf: m - m stays 0 on a row of -inf
    s = 0.0
    for start in range(0, vocab, BLOCK):
        index = start + offs
        mask = index < vocab
        a = tl.load(x_row + index, mask=mask, other=float("-inf")).to(tl.float32) + 0.0
        top = tl.maximum(m, tl.max(a, axis=0))
        s = s * tl.exp(m - top) + tl.sum(tl.exp(a - top), axis=0)
        m = top
        if num_top > 0:
            keys = tl.where(mask, (_key(a) << 32) | (0xFFFFFFFF - index.to(tl.int64)), KEY_MIN)
            worst = tl.min(best, axis=0)
            candidate = tl.max(keys, axis=0)
            while candidate > worst:  # rare once the k best have been seen
                slot = tl.min(tl.where(best == worst, slots, TOP), axis=0)
                best = tl.where(slots == slot, candidate, best)
                keys = tl.where(keys == candidate, KEY_MIN, keys)
                worst = tl.min(best, axis=0)
                candidate = tl.max(keys, axis=0)
    lse = m + tl.log(s)
    token = tl.load(tokens_ptr + r)
    tl.store(logprob_ptr + r, tl.load(x_row + token).to(tl.float32) - lse)
    if num_top > 0:
        best = tl.where(slots < num_top, best, KEY_MIN)
        total = 0.0
        for j in range(num_top):  # the k keys in order, largest first
            key = tl.max(best, axis=0)
            best = tl.where(best == key, KEY_MIN, best)
            index = 0xFFFFFFFF - (key & 0xFFFFFFFF)
            lp = tl.load(x_row + index).to(tl.float32) + 0.0 - lse
            tl.store(top_lp_ptr + r * num_top + j, lp)
            tl.store(top_id_ptr + r * num_top + j, index)
            total += lp
        tl.store(conf_ptr + r, tl.math.div_rn(-total, num_top.to(tl.float32)))


def token_signals(x: torch.Tensor, row_ids: torch.Tensor, tokens: torch.Tensor, num_top: int, logprobs: torch.Tensor,
                  top_logprobs: torch.Tensor, top_ids: torch.Tensor, confidence: torch.Tensor) -> None:
    """Writes, for output r (row x[row_ids[r]], drawn token tokens[r]): logprobs[r] =
    log softmax(x[row])[tokens[r]] (temperature 1, unfiltered); top_logprobs[r]
    and top_ids[r] [num_top]: the largest logprobs, descending, ties by lower id;
    confidence[r] = -mean(top_logprobs[r]) (untouched when num_top = 0).

    x: [B, V] fp32/fp16/bf16, unit column stride, V < 2**32. One read of the
    row per output beyond sampling's (a streaming log-sum-exp and a k-slot
    selection kept in registers).
    """
    out_rows = tokens.numel()
    vocab = x.shape[1]
    assert vocab <= 1 or x.stride(1) == 1, "x needs unit column stride"
    if out_rows == 0:
        return
    block = min(max(triton.next_power_of_2(vocab), 16), 4096)
    top = max(triton.next_power_of_2(max(num_top, 1)), 2)
    _signals_kernel[(out_rows,)](x, row_ids, tokens, logprobs, top_logprobs, top_ids, confidence, vocab,
                                 x.stride(0), num_top, BLOCK=block, TOP=top, num_warps=8 if block >= 2048 else 4,
                                 **FLOAT_OPTIONS)
