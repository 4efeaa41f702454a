"""XQuant's latent variant for grouped-query models: cache X·U instead of X.

With W = U·Σ·Bᵀ (thin SVD, rank r = min(hidden, Hkv·D)), X·W = (X·U)·(Σ·Bᵀ):
the latent X·U is r wide (the KV width, 192 for SmolLM2 instead of X's 576),
and K or V is rematerialized from it with the r x (Hkv·D) factor Σ·Bᵀ. Exact
before quantization; the latents are what the cache quantizes.
"""
from __future__ import annotations

import torch
from torch import Tensor

from forkdec.validation import require


def latent_factors(w: Tensor) -> tuple[Tensor, Tensor]:
    """w [hidden, out] (x @ w convention) -> (down [hidden, r], up [r, out]) fp32, down @ up == w.

    down has orthonormal columns, so quantization error in the latent x @ down is
    not amplified by the down projection; the singular values sit in `up`.
    """
    require(w.dim() == 2 and w.is_floating_point(), "w", f"expected a float [hidden, out] matrix, got {tuple(w.shape)}")
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    return u.float().contiguous(), (s[:, None] * vh).float().contiguous()
