"""Reference decoder-layer elementwise ops: plain PyTorch in fp32, one rounding to x's dtype."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x [..., H] / sqrt(mean(x^2) + eps) * weight [H], in x's dtype."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(rms_norm(sum), sum) with sum = x + residual rounded to x's dtype."""
    total = (x.float() + residual.float()).to(x.dtype)
    return rms_norm(total, weight, eps), total


def rope_qkv(qkv: Tensor, cos: Tensor, sin: Tensor, num_q_heads: int,
             num_kv_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """Rotate-half RoPE of the q and k heads of qkv [T, (Hq + 2 Hkv) * D]; cos, sin
    fp32 [T, D/2]. Returns contiguous q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D]."""
    t = qkv.shape[0]
    heads = num_q_heads + 2 * num_kv_heads
    x = qkv.float().reshape(t, heads, qkv.shape[1] // heads)
    qk, v = x[:, : num_q_heads + num_kv_heads], x[:, num_q_heads + num_kv_heads:]
    x1, x2 = qk.chunk(2, dim=-1)
    c, s = cos.float()[:, None, :], sin.float()[:, None, :]
    qk = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(qkv.dtype)
    q, k = qk.split((num_q_heads, num_kv_heads), dim=1)
    return q.contiguous(), k.contiguous(), v.to(qkv.dtype).contiguous()


def silu_and_mul(x: Tensor) -> Tensor:
    """silu(x[..., :I]) * x[..., I:] for x [..., 2I], in x's dtype."""
    a, b = x.float().chunk(2, dim=-1)
    return (F.silu(a) * b).to(x.dtype)
