"""A small PyTorch sampler with the signature of `forkdec.ops.sample`.

Stand-in until `forkdec.ops.sample` lands in this tree (then this file goes).
Semantics: temperature 0 = argmax (lowest index on ties); otherwise, on the
distribution softmax(logits / temperature): top-k keeps every token whose
logit is >= the k-th largest (ties at the boundary kept), then top-p keeps the
smallest prefix (by descending probability, renormalized after top-k) whose
mass reaches top_p, then min-p keeps tokens with prob >= min_p * max prob.
"""
from __future__ import annotations

import torch
from torch import Tensor

from forkdec.validation import require, validation_enabled

Param = float | int | Tensor


def _per_row(value: Param, rows: int, name: str, dtype: torch.dtype) -> Tensor:
    if isinstance(value, Tensor):
        require(value.dim() == 1 and value.numel() == rows, name,
                f"per-row values must be a [{rows}] tensor, got shape {tuple(value.shape)}")
        return value.to(dtype)
    return torch.full((rows,), value, dtype=dtype)


def sample(logits: Tensor, *, temperature: Param = 1.0, top_k: Param = 0, top_p: Param = 1.0,
           min_p: Param = 0.0, generator: torch.Generator | None = None, seed: int | None = None,
           row_ids: Tensor | None = None, check_nan: bool = True, backend: str = "auto") -> Tensor:
    """Draw one token per output row.

    logits [B, V] float. row_ids [R] int (optional): output r draws from row
    row_ids[r], each with its own draw. temperature/top_k/top_p/min_p: scalars or
    one value per output row. Returns tokens [R or B] int64. `backend` is accepted
    for signature compatibility; this fallback is plain PyTorch.
    """
    require(logits.dim() == 2 and logits.shape[1] > 0, "logits", f"expected [B, V], got {tuple(logits.shape)}")
    if row_ids is not None:
        require(row_ids.dim() == 1 and not row_ids.is_floating_point(), "row_ids", "must be a 1-D integer tensor")
        require(row_ids.numel() == 0 or (int(row_ids.min()) >= 0 and int(row_ids.max()) < logits.shape[0]),
                "row_ids", f"must be in [0, {logits.shape[0]})")
        logits = logits[row_ids.long()]
    rows = logits.shape[0]
    if rows == 0:
        return torch.empty(0, dtype=torch.int64, device=logits.device)
    x = logits.float()
    row_max = x.amax(dim=1)  # NaN propagates into the max, so one reduction checks all three
    if check_nan and validation_enabled():
        require(not bool(torch.isnan(row_max).any()) and not bool(torch.isposinf(row_max).any()), "logits",
                "contains NaN or +inf")
    t = _per_row(temperature, rows, "temperature", torch.float32)
    k = _per_row(top_k, rows, "top_k", torch.int64)
    p = _per_row(top_p, rows, "top_p", torch.float32)
    mp = _per_row(min_p, rows, "min_p", torch.float32)
    require(bool((t >= 0).all()), "temperature", "must be >= 0")
    require(bool((k >= 0).all()), "top_k", "must be >= 0")
    require(bool(((p > 0) & (p <= 1)).all()), "top_p", "must be in (0, 1]")
    require(bool(((mp >= 0) & (mp < 1)).all()), "min_p", "must be in [0, 1)")
    require(bool(torch.isfinite(row_max).all()), "logits", "a row has no finite logit")
    greedy = t == 0
    out = x.argmax(dim=1)  # first maximum = lowest index on ties
    if bool(greedy.all()):
        return out
    if generator is None and seed is not None:
        generator = torch.Generator(device=logits.device).manual_seed(seed)
    s = x / torch.where(greedy, 1.0, t).unsqueeze(1)
    vocab = s.shape[1]
    if bool((k > 0).any()):
        kk = torch.where((k > 0) & (k < vocab), k, vocab)
        kth = s.sort(dim=1, descending=True).values.gather(1, (kk - 1).unsqueeze(1))
        s = s.masked_fill(s < kth, float("-inf"))
    probs = torch.softmax(s, dim=1)
    if bool((p < 1).any()):
        sp, idx = probs.sort(dim=1, descending=True)
        before = sp.cumsum(dim=1) - sp  # mass strictly before each token
        drop = before >= p.unsqueeze(1)
        probs = probs.scatter(1, idx, sp.masked_fill(drop, 0.0))
    if bool((mp > 0).any()):
        probs = probs.masked_fill(probs < mp.unsqueeze(1) * probs.max(dim=1, keepdim=True).values, 0.0)
    # Inverse CDF with one uniform per row: far cheaper than a random number per token
    # (exponential race) or torch.multinomial on 50k-wide rows. u < total, so the first
    # cumsum entry above u exists and belongs to a token with nonzero probability.
    cdf = probs.cumsum(dim=1)
    u = torch.rand(rows, 1, generator=generator, device=probs.device) * cdf[:, -1:]
    drawn = torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=vocab - 1)
    return torch.where(greedy, out, drawn)
