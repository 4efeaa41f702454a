"""Reference sampling: the filtered distribution and inverse-CDF draws, in plain PyTorch.

Semantics (docs/sampling.md), per output row with temperature t, top_k k,
top_p p, min_p m over logits x [V]:
  a = x / t (fp32); e_i = exp(a_i - max a)
  top-k  (0 < k < V): keep a_i >= the k-th largest a (every token tied with it too)
  top-p  (p < 1):     over the top-k set, keep i when the mass of the tokens with
                      a strictly larger than a_i is below p times the top-k mass
                      (tokens tied with the boundary are kept together)
  min-p  (m > 0):     keep e_i >= m, i.e. prob_i >= m * max prob
  t == 0:             greedy, argmax, ties to the lowest index (filters ignored:
                      the argmax survives every filter anyway)
A draw with uniform u in [0, 1) returns the first index whose running sum of
kept weights e (in index order) exceeds u * (sum of kept weights).
This file sorts freely: it is the obviously correct version, not a fast one.
"""
from __future__ import annotations

import torch
from torch import Tensor

Param = float | int | Tensor


def _per_row(value: Param, rows: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    if isinstance(value, Tensor):
        return value.reshape(-1).to(device=device, dtype=dtype)
    return torch.full((rows,), value, dtype=dtype, device=device)


def _weights(x: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor, min_p: Tensor) -> Tensor:
    """Unnormalized kept weights [R, V] fp32 (0 for filtered tokens)."""
    rows, vocab = x.shape
    greedy = temperature == 0
    a = x.float() / torch.where(greedy, torch.ones_like(temperature), temperature)[:, None]
    a = a + 0.0  # -0.0 -> +0.0, so that ties are ties in every comparison below
    top = a.max(dim=1, keepdim=True).values
    e = torch.exp(a - top)

    # top-k: threshold at the k-th largest scaled logit, ties included.
    keep = torch.ones_like(a, dtype=torch.bool)
    k = top_k.clamp(max=vocab)
    active = (k > 0) & (k < vocab)
    if bool(active.any()):
        sorted_a = a.sort(dim=1, descending=True).values
        kth = sorted_a.gather(1, (k - 1).clamp(min=0)[:, None])
        keep &= ~active[:, None] | (a >= kth)
    e = torch.where(keep, e, torch.zeros_like(e))

    # top-p over the top-k set: mass strictly above each token's logit.
    if bool((top_p < 1).any()):
        order = a.argsort(dim=1, descending=True, stable=True)
        sa, se = a.gather(1, order), e.gather(1, order)
        before = torch.cumsum(se, dim=1) - se  # mass of earlier tokens in the sorted order
        # A tie group shares the mass before its first member.
        starts = torch.ones_like(sa, dtype=torch.bool)
        starts[:, 1:] = sa[:, 1:] != sa[:, :-1]
        group = torch.cumsum(starts.long(), dim=1) - 1
        group_start = torch.zeros_like(before).scatter_add_(1, group, torch.where(starts, before, 0.0))
        above = group_start.gather(1, group)
        total = se.sum(dim=1, keepdim=True)
        keep_sorted = (above < top_p[:, None] * total) | (top_p[:, None] >= 1)
        keep_p = torch.empty_like(keep_sorted).scatter_(1, order, keep_sorted)
        e = torch.where(keep_p, e, torch.zeros_like(e))

    # min-p relative to the largest probability (whose e is exactly 1).
    e = torch.where(e >= min_p[:, None], e, torch.zeros_like(e))

    # Greedy rows: all the weight on the first maximum (none for a row of only -inf).
    if bool(greedy.any()):
        one_hot = torch.zeros_like(e)
        one_hot.scatter_(1, a.argmax(dim=1, keepdim=True), (top > -float("inf")).float())
        e = torch.where(greedy[:, None], one_hot, e)
    return e


def _check_rows(weights: Tensor, row_of: Tensor) -> Tensor:
    total = weights.sum(dim=1)
    bad = ~(torch.isfinite(total) & (total > 0))
    if bool(bad.any()):
        r = int(bad.nonzero()[0, 0])
        raise ValueError(f"logits: row {int(row_of[r])} leaves no token to sample after temperature and "
                         "filters (all -inf, or x / temperature overflows)")
    return total


def _expand(logits: Tensor, temperature: Param, top_k: Param, top_p: Param, min_p: Param,
            row_ids: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    rows = logits.shape[0]
    ids = torch.arange(rows, device=logits.device) if row_ids is None else row_ids.long().to(logits.device)
    out_rows, device = ids.numel(), logits.device
    return (logits.index_select(0, ids), ids,
            _per_row(temperature, out_rows, torch.float32, device), _per_row(top_k, out_rows, torch.int64, device),
            _per_row(top_p, out_rows, torch.float32, device), _per_row(min_p, out_rows, torch.float32, device),
            torch.arange(out_rows, device=device))


def filtered_probs(logits: Tensor, temperature: Param = 1.0, top_k: Param = 0, top_p: Param = 1.0,
                   min_p: Param = 0.0, row_ids: Tensor | None = None) -> Tensor:
    """The distribution `sample` draws from: fp32 [R, V], rows sum to 1.

    logits [B, V] fp32/fp16/bf16; each parameter a scalar or one value per output
    row (R = B, or row_ids.numel() with row r taken from logits[row_ids[r]]).
    Raises ValueError for a row that leaves no token.
    """
    x, ids, t, k, p, m, _ = _expand(logits, temperature, top_k, top_p, min_p, row_ids)
    if x.shape[0] == 0:
        return torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    w = _weights(x, t, k, p, m)
    return w / _check_rows(w, ids)[:, None]


def sample(logits: Tensor, uniforms: Tensor, *, temperature: Param = 1.0, top_k: Param = 0, top_p: Param = 1.0,
           min_p: Param = 0.0, row_ids: Tensor | None = None) -> Tensor:
    """Tokens int64 [R]: output r is the inverse-CDF draw (index order) of
    `filtered_probs` row r at uniforms[r] (fp32 in [0, 1))."""
    x, ids, t, k, p, m, _ = _expand(logits, temperature, top_k, top_p, min_p, row_ids)
    if x.shape[0] == 0:
        return torch.zeros(0, dtype=torch.int64, device=x.device)
    w = _weights(x, t, k, p, m)
    _check_rows(w, ids)
    running = torch.cumsum(w, dim=1)
    target = uniforms.float().reshape(-1, 1) * running[:, -1:]
    token = torch.searchsorted(running, target, right=True).reshape(-1)
    # u * W can round up to W: then the last kept token.
    last_kept = (w > 0).long().cumsum(1).argmax(dim=1)
    return torch.where(token < x.shape[1], token, last_kept)


def token_signals(logits: Tensor, tokens: Tensor, num_top: int = 0,
                  row_ids: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-token signals under the unfiltered temperature-1 distribution.

    logits [B, V]; tokens int64 [R] (output r drawn from logits[row_ids[r]], or
    row r). Returns (logprobs fp32 [R]: log softmax(x)[token]; top_logprobs fp32
    [R, num_top] and top_ids int64 [R, num_top]: the num_top largest logprobs,
    descending, ties by lower id; confidence fp32 [R]: -mean(top_logprobs),
    DeepConf's token confidence, NaN when num_top = 0).
    """
    ids = torch.arange(logits.shape[0], device=logits.device) if row_ids is None else row_ids.long()
    x = logits.index_select(0, ids).float()
    out_rows = x.shape[0]
    if out_rows == 0:
        return (torch.zeros(0, device=x.device), torch.zeros(0, num_top, device=x.device),
                torch.zeros(0, num_top, dtype=torch.int64, device=x.device), torch.zeros(0, device=x.device))
    lse = torch.logsumexp(x, dim=1)
    logprobs = x.gather(1, tokens.long().reshape(-1, 1)).reshape(-1) - lse
    order = x.sort(dim=1, descending=True, stable=True).indices[:, :num_top]
    top_logprobs = x.gather(1, order) - lse[:, None]
    confidence = (-top_logprobs.double().mean(dim=1)).float() if num_top else torch.full_like(lse, float("nan"))
    return logprobs, top_logprobs, order, confidence


def sample_with_logprobs(logits: Tensor, uniforms: Tensor, *, num_top: int = 0, temperature: Param = 1.0,
                         top_k: Param = 0, top_p: Param = 1.0, min_p: Param = 0.0,
                         row_ids: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """`sample` and then `token_signals` of the drawn tokens:
    (tokens, logprobs, top_logprobs, top_ids, confidence)."""
    tokens = sample(logits, uniforms, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                    row_ids=row_ids)
    return (tokens, *token_signals(logits, tokens, num_top, row_ids))
