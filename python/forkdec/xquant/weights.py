"""Per-layer weights a quantized cache needs to write its streams and to rematerialize K and V."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from forkdec.validation import require
from forkdec.xquant.calibration import ATTR, calibrated_factors
from forkdec.xquant.kinds import KVKind
from forkdec.xquant.latent import latent_factors


@dataclass
class LayerWeights:
    """x @ wk (+ bk) = K before RoPE, x @ wv (+ bv) = V, fp32, for the cached stream x:
    the layer input X (raw, cl) or the latents (wk, wv are then the up factors,
    down_k/down_v map X to the latents). norm: the layer's RMSNorm weight (cl: X = norm ⊙ unit-RMS stream)."""
    wk: Tensor
    wv: Tensor
    bk: Tensor | None = None
    bv: Tensor | None = None
    down_k: Tensor | None = None
    down_v: Tensor | None = None
    norm: Tensor | None = None


def layer_weights(kind: KVKind, layer, config) -> LayerWeights:
    """From a forkdec.models LlamaLayer (fused qkv [(Hq + 2 Hkv)·D, hidden]); ValueError
    naming `model` if its weights do not have the config's shapes."""
    h, d, hq, hkv = config.hidden_size, config.head_dim, config.num_heads, config.num_kv_heads
    qkv = layer.qkv
    require(tuple(qkv.shape) == ((hq + 2 * hkv) * d, h), "model",
            f"qkv weight has shape {tuple(qkv.shape)}, the config needs {((hq + 2 * hkv) * d, h)}")
    norm = layer.attn_norm
    require(tuple(norm.shape) == (h,), "model", f"attn_norm has shape {tuple(norm.shape)}, expected ({h},)")
    wk = qkv[hq * d:(hq + hkv) * d].t().float().contiguous()
    wv = qkv[(hq + hkv) * d:].t().float().contiguous()
    bias = layer.qkv_bias
    bk = None if bias is None else bias[hq * d:(hq + hkv) * d].float().contiguous()
    bv = None if bias is None else bias[(hq + hkv) * d:].float().contiguous()
    if kind.family == "xquant-latent":
        if kind.calibrated:
            moment = getattr(layer, ATTR, None)
            require(moment is not None, "model", f"{kind.name!r} needs a calibrated model: call "
                    "forkdec.xquant.calibration.calibrate(model, tokens) first")
            (down_k, up_k), (down_v, up_v) = (calibrated_factors(w, r, moment)
                                              for w, r in ((wk, kind.rank), (wv, kind.rank_v)))
        else:
            (down_k, up_k), (down_v, up_v) = scaled_factors(wk, kind.rank), scaled_factors(wv, kind.rank_v)
        return LayerWeights(up_k, up_v, bk, bv, down_k, down_v)
    return LayerWeights(wk, wv, bk, bv, norm=norm.float() if kind.family == "xquant-cl" else None)


def scaled_factors(w: Tensor, rank: int = 0) -> tuple[Tensor, Tensor]:
    """latent_factors with the singular values moved into the latent: down = U·Σ, up = Bᵀ.
    up has orthonormal rows, so a latent's quantization error reaches K or V unamplified;
    with U·(Σ·Bᵀ) the per-token (V) groups' error was scaled up by the large singular values.
    Per-channel groups are indifferent (each channel has its own scale).
    rank > 0 keeps the top-`rank` singular directions (down [hidden, rank], up [rank, out]):
    down @ up is then the best rank-`rank` approximation of w (Eckart-Young), no longer w."""
    down, up = latent_factors(w)
    if rank:
        down, up = down[:, :rank], up[:rank]  # svd orders singular values descending
    s = up.norm(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
    return (down * s).contiguous(), (up / s[:, None]).contiguous()


def unit_rms(x: Tensor, eps: float) -> Tensor:
    """x / sqrt(mean(x²) + eps) in fp32: the model's RMSNorm without its per-layer weight."""
    xf = x.float()
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)


def rope_tables(inv_freq: Tensor, max_pos: int) -> tuple[Tensor, Tensor]:
    """cos, sin [max_pos, D] fp32 in the rotate-half layout (halves repeated), as
    xquant_attention takes them; inv_freq [D/2] is the model's (scaling included)."""
    angles = torch.arange(max_pos, dtype=torch.float32)[:, None] * inv_freq.float().cpu()[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().contiguous(), angles.sin().contiguous()
