"""Speculative verification of draft token trees and chains (docs/speculative.md).

Greedy: the longest root-to-leaf path of draft tokens that all equal the
target's argmax. Sampling: SpecInfer's multi-step speculative sampling (Miao
et al. 2023, arXiv 2305.09781), which keeps the output distributed exactly as
sampling from the target alone; a chain is the one-child-per-node case
(Leviathan et al. 2023, Chen et al. 2023).

Randomness: the faces draw float64 uniforms with torch (`generator`, `seed`,
or torch's default generator) and hand them to the kernels as a tensor, so
every backend consumes the same uniforms and returns the same tokens.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from forkdec import _extension
from forkdec.backends import resolve
from forkdec.reference import speculative as ref
from forkdec.tree import INDEX_DTYPES, node_depths, validate_tree
from forkdec.validation import require, validation_enabled

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BACKENDS = ("reference", "cpu", "triton")


class VerifyResult(NamedTuple):
    """accepted_tokens [B, max_depth + 1] int32: the accepted draft tokens, then
    the bonus token, then -1; num_accepted [B] int32: accepted draft tokens
    (the request emits num_accepted + 1 tokens); bonus_token [B] int32;
    accepted_nodes [B, max_depth] int32: local node index of each accepted
    token, -1 padded (what forkdec.tree.accept_path_kv takes)."""
    accepted_tokens: Tensor
    num_accepted: Tensor
    bonus_token: Tensor
    accepted_nodes: Tensor


def verify_tree_greedy(draft_tokens: Tensor, parents: Tensor, tree_indptr: Tensor, target_logits: Tensor, *,
                       max_depth: int | None = None, backend: str = "auto") -> VerifyResult:
    """Greedy verification of a ragged batch of draft trees.

    draft_tokens [N] int32 (each node's token), parents [N] int32 (local parent,
    -1 = root, parents[i] < i), tree_indptr [B+1] int32.
    target_logits [N + B, V] fp32/fp16/bf16 (any row stride): request b's block
    starts at row tree_indptr[b] + b; its row 0 holds the target's logits after
    the root, row 1 + i those after node i (the verification forward over
    [root, nodes...]).
    Accepts the longest path from the root whose every token equals the
    target's argmax at its parent (argmax ties: lowest token id; equally long
    paths: the one whose node indices are lexicographically smallest). The bonus
    token is the target's argmax after the last accepted node (or the root).
    max_depth: output width (default: the deepest tree's depth; must be >= it).
    Returns VerifyResult(accepted_tokens, num_accepted, bonus_token, accepted_nodes).
    """
    if validation_enabled():
        _validate_tree_inputs(draft_tokens, parents, tree_indptr, target_logits, "target_logits", probs=False)
    depth = _max_depth(parents, tree_indptr, max_depth)
    name = resolve(backend, "verify_tree_greedy", target_logits.device, BACKENDS)
    if name == "reference":
        out = ref.verify_tree_greedy_rows(draft_tokens, parents, tree_indptr, target_logits, depth)
    else:
        op = torch.ops.forkdec.verify_tree_greedy if name == "cpu" else torch.ops.forkdec.verify_tree_greedy_triton
        out = op(draft_tokens, parents, tree_indptr, target_logits, depth)
    tokens, nodes, num, bonus = out
    return VerifyResult(tokens, num, bonus, nodes)


def verify_tree_sampling(draft_tokens: Tensor, parents: Tensor, tree_indptr: Tensor, draft_probs: Tensor,
                         target_probs: Tensor, *, generator: torch.Generator | None = None, seed: int | None = None,
                         uniforms: Tensor | None = None, max_depth: int | None = None,
                         backend: str = "auto") -> VerifyResult:
    """Lossless speculative sampling over a ragged batch of draft trees.

    SpecInfer's multi-step speculative sampling (arXiv 2305.09781, Alg. 2):
    from the root, with p the target's distribution at the current node, try
    its children in index order; child x is accepted with probability
    min(1, p(x) / q(x)); on rejection p <- norm(max(p - q, 0)). An accepted
    child becomes the current node (p = the target's row after it); when every
    child is rejected, or the node is a leaf, the bonus token is drawn from p.
    Lossless when the children of each node were drawn independently from q
    (with replacement: siblings may repeat tokens).

    draft_tokens, parents, tree_indptr as in verify_tree_greedy.
    draft_probs [N + B, V], target_probs [N + B, V]: fp32/fp16/bf16 distributions
    (rows sum to 1), the same row layout: request b's block starts at
    tree_indptr[b] + b; row 0 is the distribution after the root, row 1 + i the
    one after node i; for draft_probs, the distribution the children of that
    node were drawn from (a leaf's draft row is never read).
    Randomness: uniforms [N + B] float64 in [0, 1) (same block layout: entry 0
    draws the bonus token, 1 + i tests node i), drawn from `generator`, a
    generator seeded with `seed`, or torch's default generator unless given.
    Computation in fp32, sums in float64. Returns VerifyResult.
    """
    batch = tree_indptr.numel() - 1
    if validation_enabled():
        _validate_tree_inputs(draft_tokens, parents, tree_indptr, target_probs, "target_probs", probs=True)
        require(isinstance(draft_probs, Tensor) and draft_probs.shape == target_probs.shape, "draft_probs",
                f"shape {tuple(getattr(draft_probs, 'shape', ()))} must equal target_probs' "
                f"{tuple(target_probs.shape)}")
        _require_distribution(draft_probs, "draft_probs", target_probs.device)
        _validate_randomness(generator, seed, uniforms, draft_tokens.numel() + batch, target_probs.device)
    depth = _max_depth(parents, tree_indptr, max_depth)
    if uniforms is None:
        uniforms = ref.speculative_uniforms(draft_tokens.numel() + batch, target_probs.device, generator, seed)
    return _sample(draft_tokens, parents, tree_indptr, draft_probs, target_probs, uniforms, depth, True, backend)


def chain_speculative_sampling(draft_tokens: Tensor, draft_probs: Tensor, target_probs: Tensor, *,
                               generator: torch.Generator | None = None, seed: int | None = None,
                               uniforms: Tensor | None = None, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Speculative sampling of single-chain drafts (Leviathan et al. 2023, arXiv
    2211.17192; Chen et al. 2023, arXiv 2302.01318).

    draft_tokens [B, L] int32, token i drawn from draft_probs[b, i];
    draft_probs [B, L, V], target_probs [B, L + 1, V] fp32/fp16/bf16
    distributions (target_probs[b, i] follows the first i draft tokens).
    Token i is accepted with probability min(1, p(x) / q(x)) while all before
    it were; the first rejection draws from norm(max(p - q, 0)), full
    acceptance draws the bonus token from target_probs[b, L].
    uniforms [B, L + 1] float64 (entry 0 draws the final token, 1 + i tests
    token i), from generator / seed / torch's default generator unless given.
    Returns (accepted_tokens [B, L + 1] int32: accepted draft tokens, the
    final token, then -1; num_accepted [B] int32 draft tokens accepted).
    """
    if validation_enabled():
        require(isinstance(draft_tokens, Tensor) and draft_tokens.dim() == 2 and draft_tokens.dtype in INDEX_DTYPES,
                "draft_tokens", "must be an int32 [B, L] tensor")
        batch, length = draft_tokens.shape
        require(isinstance(target_probs, Tensor) and target_probs.dim() == 3 and target_probs.shape[:2] ==
                (batch, length + 1), "target_probs", f"must be [B={batch}, L+1={length + 1}, V], got "
                f"{tuple(getattr(target_probs, 'shape', ()))}")
        require(isinstance(draft_probs, Tensor) and draft_probs.shape == (batch, length, target_probs.shape[2]),
                "draft_probs", f"must be [B={batch}, L={length}, V={target_probs.shape[2]}], got "
                f"{tuple(getattr(draft_probs, 'shape', ()))}")
        _require_distribution(target_probs, "target_probs", target_probs.device)
        _require_distribution(draft_probs, "draft_probs", target_probs.device)
        _require_tokens(draft_tokens, target_probs.shape[2])
        _validate_randomness(generator, seed, uniforms, batch * (length + 1), target_probs.device)
    batch, length = draft_tokens.shape
    vocab = target_probs.shape[-1]
    if uniforms is None:
        uniforms = ref.speculative_uniforms(batch * (length + 1), target_probs.device, generator, seed)
    device = draft_tokens.device
    parents = torch.arange(-1, length - 1, dtype=torch.int32, device=device).repeat(batch)
    indptr = torch.arange(batch + 1, dtype=torch.int32, device=device) * length
    # [B, L, V] -> [B * L, V] stays a view for the usual layouts (reshape copies otherwise)
    out = _sample(draft_tokens.reshape(-1), parents, indptr, draft_probs.reshape(-1, vocab),
                  target_probs.reshape(-1, vocab), uniforms.reshape(-1), length, False, backend)
    return out.accepted_tokens, out.num_accepted


def _sample(draft_tokens, parents, tree_indptr, draft_probs, target_probs, uniforms, depth, match, backend):
    name = resolve(backend, "verify_tree_sampling", target_probs.device, BACKENDS)
    uniforms = uniforms.to(torch.float64).reshape(-1)
    if name == "reference":
        out = ref.verify_tree_sampling_rows(draft_tokens, parents, tree_indptr, draft_probs, target_probs, uniforms,
                                            depth, match)
    else:
        op = (torch.ops.forkdec.verify_tree_sampling if name == "cpu"
              else torch.ops.forkdec.verify_tree_sampling_triton)
        out = op(draft_tokens, parents, tree_indptr, draft_probs, target_probs, uniforms, depth, match)
    tokens, nodes, num, bonus = out
    return VerifyResult(tokens, num, bonus, nodes)


def _max_depth(parents: Tensor, tree_indptr: Tensor, max_depth: int | None) -> int:
    if max_depth is not None and not validation_enabled():
        return max_depth  # hot path: no device sync (the kernels still refuse a too-small max_depth)
    if not validation_enabled():  # measuring the depth needs well-formed trees (a cycle never ends)
        validate_tree(parents, tree_indptr)
    deepest = int(node_depths(parents, tree_indptr).max()) if parents.numel() else 0
    if max_depth is None:
        return deepest
    require(isinstance(max_depth, int) and max_depth >= deepest, "max_depth",
            f"must be an int >= the deepest tree's depth {deepest}, got {max_depth!r}")
    return max_depth


def _require_tokens(draft_tokens: Tensor, vocab: int) -> None:
    require(draft_tokens.numel() == 0 or (int(draft_tokens.min()) >= 0 and int(draft_tokens.max()) < vocab),
            "draft_tokens", f"token ids must be in [0, V={vocab})")


def _validate_tree_inputs(draft_tokens: Tensor, parents: Tensor, tree_indptr: Tensor, target: Tensor, name: str,
                          probs: bool) -> None:
    validate_tree(parents, tree_indptr)
    require(isinstance(draft_tokens, Tensor) and draft_tokens.dim() == 1 and draft_tokens.dtype in INDEX_DTYPES,
            "draft_tokens", "must be a 1-D int32 tensor")
    require(draft_tokens.numel() == parents.numel(), "draft_tokens",
            f"has {draft_tokens.numel()} entries, parents {parents.numel()}")
    batch = tree_indptr.numel() - 1
    require(isinstance(target, Tensor) and target.dim() == 2, name, "must be a 2-D [N + B, V] tensor")
    require(target.shape[0] == parents.numel() + batch, name,
            f"has {target.shape[0]} rows, expected N + B = {parents.numel() + batch} (row 0 of each request is the root's)")
    require(target.shape[1] > 0 or target.shape[0] == 0, name, "needs V >= 1")
    require(target.dtype in DTYPES, name, f"dtype {target.dtype} not supported (fp32, fp16, bf16)")
    require(draft_tokens.device == target.device and parents.device == target.device, "draft_tokens",
            f"draft_tokens, parents on {draft_tokens.device}, {parents.device}; {name} on {target.device}")
    _require_tokens(draft_tokens, target.shape[1])
    if probs:
        _require_distribution(target, name, target.device)
    else:
        require(not bool(torch.isnan(target).any()), name, "contains NaN")


def _require_distribution(p: Tensor, name: str, device: torch.device) -> None:
    require(isinstance(p, Tensor) and p.dtype in DTYPES, name, f"must be fp32/fp16/bf16, got "
            f"{getattr(p, 'dtype', type(p).__name__)}")
    require(p.device == device, name, f"is on {p.device}, expected {device}")
    if p.numel() == 0:
        return
    require(bool((p >= 0).all()), name, "entries must be non-negative and not NaN (a probability distribution)")
    sums = p.sum(-1, dtype=torch.float32)  # no fp32 copy of a 16-bit tensor
    # fp16/bf16 rows carry a relative rounding of up to 2^-8 per entry, so their sums may be off by as much
    tol = 1e-3 if p.dtype == torch.float32 else 1e-2
    bad = (sums - 1).abs() > tol
    if bool(bad.any()):
        row = int(torch.nonzero(bad.reshape(-1))[0])
        raise ValueError(f"{name}: row {row} sums to {float(sums.reshape(-1)[row]):.6g}, not 1 (within {tol})")


def _validate_randomness(generator, seed, uniforms, count: int, device: torch.device) -> None:
    given = sum(x is not None for x in (generator, seed, uniforms))
    require(given <= 1, "seed", "give at most one of generator, seed, uniforms")
    require(generator is None or isinstance(generator, torch.Generator), "generator", "must be a torch.Generator")
    require(seed is None or (isinstance(seed, int) and not isinstance(seed, bool)), "seed", "must be an int")
    if uniforms is not None:
        require(isinstance(uniforms, Tensor) and uniforms.is_floating_point() and uniforms.numel() == count,
                "uniforms", f"must be a float tensor with {count} entries")
        require(uniforms.device == device, "uniforms", f"is on {uniforms.device}, expected {device}")
        require(bool(((uniforms >= 0) & (uniforms < 1)).all()), "uniforms", "must be in [0, 1)")


# ---- torch.compile support: fake (meta) implementations ----------------------

def _verify_fake(batch: int, max_depth: int, like: Tensor):
    i32 = dict(dtype=torch.int32, device=like.device)
    return (torch.empty(batch, max_depth + 1, **i32), torch.empty(batch, max_depth, **i32),
            torch.empty(batch, **i32), torch.empty(batch, **i32))


def _greedy_fake(draft_tokens, parents, tree_indptr, target_logits, max_depth):
    return _verify_fake(tree_indptr.shape[0] - 1, max_depth, target_logits)


def _sampling_fake(draft_tokens, parents, tree_indptr, draft_probs, target_probs, uniforms, max_depth,
                   draft_rows_match_target):
    return _verify_fake(tree_indptr.shape[0] - 1, max_depth, target_probs)


if _extension.load() is not None and hasattr(torch.ops.forkdec, "verify_tree_greedy"):
    torch.library.register_fake("forkdec::verify_tree_greedy")(_greedy_fake)
    torch.library.register_fake("forkdec::verify_tree_sampling")(_sampling_fake)


# ---- Triton kernels as torch ops (triton_kernels/speculative.py) ---------------

def check_kernel_bounds(draft_tokens: Tensor, parents: Tensor, tree_indptr: Tensor, rows: Tensor, max_depth: int,
                        draft_rows: Tensor | None = None) -> None:
    """What the Triton kernels rely on to stay in bounds, checked even when
    validation is off (the C++ ops check the same in C++)."""
    validate_tree(parents, tree_indptr)
    n, batch = parents.numel(), tree_indptr.numel() - 1
    if rows.shape[0] != n + batch or draft_tokens.numel() != n:
        raise ValueError(f"target: expected {n + batch} rows and {n} draft tokens")
    _require_tokens(draft_tokens, rows.shape[1])
    if n and int(node_depths(parents, tree_indptr).max()) > max_depth:
        raise ValueError("max_depth: smaller than the deepest tree")
    if draft_rows is not None and (draft_rows.shape[1] != rows.shape[1] or draft_rows.shape[0] < n):
        raise ValueError("draft_probs: rows do not match target_probs")


@torch.library.custom_op("forkdec::verify_tree_greedy_triton", mutates_args=())
def _verify_tree_greedy_triton(draft_tokens: Tensor, parents: Tensor, tree_indptr: Tensor, target_logits: Tensor,
                               max_depth: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from forkdec.triton_kernels import speculative as kernels

    check_kernel_bounds(draft_tokens, parents, tree_indptr, target_logits, max_depth)
    return kernels.verify_tree_greedy(draft_tokens, parents, tree_indptr, target_logits, max_depth)


@torch.library.custom_op("forkdec::verify_tree_sampling_triton", mutates_args=())
def _verify_tree_sampling_triton(draft_tokens: Tensor, parents: Tensor, tree_indptr: Tensor, draft_probs: Tensor,
                                 target_probs: Tensor, uniforms: Tensor, max_depth: int,
                                 draft_rows_match_target: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from forkdec.triton_kernels import speculative as kernels

    check_kernel_bounds(draft_tokens, parents, tree_indptr, target_probs, max_depth, draft_probs)
    if uniforms.numel() != target_probs.shape[0]:
        raise ValueError("uniforms: expected one per target row")
    return kernels.verify_tree_sampling(draft_tokens, parents, tree_indptr, draft_probs, target_probs, uniforms,
                                        max_depth, draft_rows_match_target)


_verify_tree_greedy_triton.register_fake(_greedy_fake)
_verify_tree_sampling_triton.register_fake(_sampling_fake)
