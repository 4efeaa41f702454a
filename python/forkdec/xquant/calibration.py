"""Activation statistics for rank-truncated latents (kinds with `-kR-cal`).

Truncating Wk to its top-R singular directions ignores what X looks like: the
dropped directions can carry most of X·Wk when X has outlier channels (on
SmolLM2, rank 96 of 192 keeps 88% of Wk's energy yet multiplies perplexity by
over 1000). Given the second moment C = E[xᵀx] of a layer's input, the rank-R
map minimizing E‖x·W - x·W·P‖² over projections P of the output space is
P = B·Bᵀ with B the top-R eigenvectors of Wᵀ·C·W (C = I gives the plain SVD
truncation). `calibrate` measures C per layer by running the model over some
tokens with exact attention, and stores it on each layer for the cache to use.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from forkdec.text_file import read_tokens
from forkdec.validation import require

ATTR = "xquant_x_moment"  # LlamaLayer attribute holding C [hidden, hidden] fp64


class _Collect:
    """An attend (see forkdec.models.llama) that sums xᵀx per layer and attends exactly (causal)."""
    needs_layer_input = True

    def __init__(self, num_layers: int, hidden: int) -> None:
        self.sums = [torch.zeros(hidden, hidden, dtype=torch.float64) for _ in range(num_layers)]

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor, *, x: Tensor, residual: Tensor) -> Tensor:
        xf = x.double()
        self.sums[layer] += xf.t() @ xf
        rep = q.shape[1] // k.shape[1]
        qt, kt, vt = (t.float().transpose(0, 1) for t in (q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)))
        return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True).transpose(0, 1).to(q.dtype)


def x_moments(model, tokens: Tensor | list[int], *, chunk: int = 512) -> list[Tensor]:
    """Per layer, E[xᵀx] [hidden, hidden] fp64 of the layer input x (post-norm) over
    `tokens` [T] (T >= 1), fed as independent sequences of `chunk` tokens."""
    ids = torch.as_tensor(tokens, dtype=torch.long).flatten()
    require(ids.numel() >= 1, "tokens", "need at least one token")
    require(isinstance(chunk, int) and chunk >= 1, "chunk", f"must be an int >= 1, got {chunk!r}")
    cfg = model.config
    collect = _Collect(cfg.num_layers, cfg.hidden_size)
    for part in ids.split(chunk):
        model(part, torch.arange(part.numel()), collect, logits_rows=torch.zeros(1, dtype=torch.long))
    return [s / ids.numel() for s in collect.sums]


def calibrate(model, tokens: Tensor | list[int], *, chunk: int = 512) -> None:
    """Store x_moments(model, tokens) on the model's layers: caches of `-cal` kinds built
    afterwards truncate their latents to the directions that carry most of x·Wk, x·Wv."""
    for layer, c in zip(model.layers, x_moments(model, tokens, chunk=chunk)):
        setattr(layer, ATTR, c)


def calibrate_from_text(model, tokenizer, path: str, *, max_tokens: int = 4096) -> int:
    """calibrate(model, the first `max_tokens` tokens of the text file `path`); returns
    how many tokens it used. Use text the evaluation does not score."""
    require(isinstance(max_tokens, int) and max_tokens >= 1, "max_tokens", f"must be an int >= 1, got {max_tokens!r}")
    ids = read_tokens(path, tokenizer, max_tokens)
    calibrate(model, ids)
    return len(ids)


def calibrated_factors(w: Tensor, rank: int, moment: Tensor) -> tuple[Tensor, Tensor]:
    """w [hidden, out], moment C [hidden, hidden] -> (down [hidden, rank], up [rank, out]) fp32
    with up = Bᵀ (orthonormal rows, B the top-`rank` eigenvectors of wᵀ·C·w), down = w·B."""
    require(moment.shape == (w.shape[0], w.shape[0]), "moment",
            f"expected [{w.shape[0]}, {w.shape[0]}], got {tuple(moment.shape)}")
    require(0 < rank <= w.shape[1], "rank", f"must be in 1..{w.shape[1]}, got {rank}")
    wd = w.double()
    m = wd.t() @ moment.double() @ wd
    _, vecs = torch.linalg.eigh((m + m.t()) / 2)  # ascending eigenvalues
    b = vecs[:, -rank:].flip(1)
    return (wd @ b).float().contiguous(), b.t().float().contiguous()
