"""One sampler call per step for every path, with the per-token signals the paths ask for.

Both decoding loops (Engine.generate's and Session's) draw through `draw`: the
token, its logprob under the unfiltered temperature-1 distribution, and, when
any row asks, the top-k logprobs and DeepConf's token confidence, all from one
fused kernel call (forkdec.ops.sample_with_logprobs) instead of a separate
logsumexp pass. min_tokens: rows still short of it have their stop tokens
masked out before the draw.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

import forkdec.ops as ops
from forkdec.engine.params import SamplingParams


@dataclass
class Draw:
    """Per output row: token, logprob; top ids/logprobs [R, k] (k = 0 when no row asked);
    confidence [R] (None when no row asked for one; a row with confidence_k = 0 gets 0)."""
    tokens: list[int]
    logprobs: list[float]
    top_ids: Tensor
    top_logprobs: Tensor
    confidence: list[float] | None

    def top(self, r: int, k: int) -> list[tuple[int, float]]:
        return list(zip(self.top_ids[r, :k].tolist(), self.top_logprobs[r, :k].tolist()))


def _per_row(values: list, dtype: torch.dtype) -> Tensor | float | int:
    return values[0] if len(set(values)) == 1 else torch.tensor(values, dtype=dtype)


def draw(logits: Tensor, params: Sequence[SamplingParams], *, uniforms: Tensor | None = None,
         generator: torch.Generator | None = None, row_ids: Tensor | None = None,
         mask_ids: Sequence[Sequence[int]] | None = None, backend: str = "auto") -> Draw:
    """logits fp32 [B, V]; params: one per output row; row_ids as for ops.sample;
    mask_ids: per output row, token ids to exclude from the draw (min_tokens);
    backend: the sampler's (the engine passes the one its attention runs on)."""
    if mask_ids is not None and any(mask_ids):
        rows = row_ids if row_ids is not None else torch.arange(len(params))
        logits = logits[rows].clone()
        row_ids = None
        for r, ids in enumerate(mask_ids):
            if ids:
                logits[r, list(ids)] = float("-inf")
    k = max(max(p.top_logprobs, p.confidence_k) for p in params)
    f32 = torch.float32
    out = ops.sample_with_logprobs(
        logits, top_logprobs=k or None, row_ids=row_ids, uniforms=uniforms, generator=generator, backend=backend,
        temperature=_per_row([float(p.temperature) for p in params], f32),
        top_k=_per_row([p.top_k for p in params], torch.int64),
        top_p=_per_row([float(p.top_p) for p in params], f32),
        min_p=_per_row([float(p.min_p) for p in params], f32))
    confidence = None
    if k and all(p.confidence_k == k for p in params):
        confidence = out.confidence.tolist()
    elif any(p.confidence_k for p in params):  # the kernel averaged k columns; some rows asked for fewer
        confidence = [float(-out.top_logprobs[r, :p.confidence_k].mean()) if p.confidence_k else 0.0
                      for r, p in enumerate(params)]
    return Draw(out.tokens.tolist(), out.logprobs.tolist(), out.top_ids, out.top_logprobs, confidence)
