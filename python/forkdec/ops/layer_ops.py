"""Fused elementwise parts of a Llama decoder layer: RMSNorm (with the residual add),
RoPE of a fused qkv projection, SiLU-and-multiply.

At decode batch sizes (tens of rows) each of these was several small tensor ops
whose dispatch cost dominated the arithmetic; here each is one pass. Math in
fp32, one rounding to the input dtype (the reference, `forkdec.reference`,
defines the results).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from forkdec import _extension, reference
from forkdec.backends import resolve
from forkdec.validation import require, validation_enabled

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BACKENDS = ("reference", "cpu", "triton")


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6, *, backend: str = "auto") -> Tensor:
    """RMSNorm over the last dim: x [..., H] / sqrt(mean(x^2) + eps) * weight [H].

    x fp32/fp16/bf16, any strides; weight any of those dtypes. Returns a new
    contiguous tensor in x's dtype.
    """
    if validation_enabled():
        _validate_norm(x, None, weight, eps)
    name = resolve(backend, "rms_norm", x.device, BACKENDS)
    if name == "reference":
        return reference.rms_norm(x, weight, eps)
    if name == "triton":
        return torch.ops.forkdec.add_rms_norm_triton(x, None, weight, eps)[0]
    return torch.ops.forkdec.rms_norm(x, weight, eps)


def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float = 1e-6, *,
                 backend: str = "auto") -> tuple[Tensor, Tensor]:
    """The pre-norm residual step: total = x + residual (rounded to x's dtype), then
    (rms_norm(total, weight, eps), total).

    x, residual [..., H] of one dtype (fp32/fp16/bf16), any strides; weight [H].
    Returns two new contiguous tensors in x's dtype; the norm is taken of the
    rounded total, so the pair equals the unfused add then rms_norm.
    """
    if validation_enabled():
        _validate_norm(x, residual, weight, eps)
    name = resolve(backend, "add_rms_norm", x.device, BACKENDS)
    if name == "reference":
        return reference.add_rms_norm(x, residual, weight, eps)
    if name == "triton":
        out, total = torch.ops.forkdec.add_rms_norm_triton(x, residual, weight, eps)
        return out, total
    out, total = torch.ops.forkdec.add_rms_norm(x, residual, weight, eps)
    return out, total


def rope_qkv(qkv: Tensor, cos: Tensor, sin: Tensor, num_q_heads: int, num_kv_heads: int, *,
             backend: str = "auto") -> tuple[Tensor, Tensor, Tensor]:
    """Split a fused projection into heads and rotate q and k (rotate-half RoPE).

    qkv [T, (Hq + 2 Hkv) * D] fp32/fp16/bf16 with unit stride along a row (any
    row stride): Hq query heads, then Hkv key heads, then Hkv value heads of D
    (even) elements. cos, sin: fp32 [T, D/2], the angles of each row's position.
    Element i of a q/k head pairs with i + D/2:
    out_i = x_i cos_i - x_{i+D/2} sin_i, out_{i+D/2} = x_{i+D/2} cos_i + x_i sin_i.
    Returns contiguous q [T, Hq, D], k [T, Hkv, D] (rotated) and v [T, Hkv, D]
    (copied), in qkv's dtype.
    """
    if validation_enabled():
        _validate_rope(qkv, cos, sin, num_q_heads, num_kv_heads)
    name = resolve(backend, "rope_qkv", qkv.device, BACKENDS)
    if name == "reference":
        return reference.rope_qkv(qkv, cos, sin, num_q_heads, num_kv_heads)
    if name == "triton":
        q, k, v = torch.ops.forkdec.rope_qkv_triton(qkv, cos, sin, num_q_heads, num_kv_heads)
    else:
        q, k, v = torch.ops.forkdec.rope_qkv(qkv, cos, sin, num_q_heads, num_kv_heads)
    return q, k, v


def silu_and_mul(x: Tensor, *, backend: str = "auto") -> Tensor:
    """SwiGLU's gate: silu(x[..., :I]) * x[..., I:] for x [..., 2I] (fp32/fp16/bf16,
    any strides). Returns a new contiguous [..., I] tensor in x's dtype."""
    if validation_enabled():
        require(isinstance(x, Tensor), "x", f"expected a tensor, got {type(x).__name__}")
        require(x.dtype in DTYPES, "x", f"dtype {x.dtype} is not supported; expected fp32, fp16 or bf16")
        require(x.dim() >= 1 and x.shape[-1] % 2 == 0, "x", f"the last dimension must be even, got {tuple(x.shape)}")
    name = resolve(backend, "silu_and_mul", x.device, BACKENDS)
    if name == "reference":
        return reference.silu_and_mul(x)
    if name == "triton":
        return torch.ops.forkdec.silu_and_mul_triton(x)
    return torch.ops.forkdec.silu_and_mul(x)


def _validate_norm(x: Tensor, residual: Tensor | None, weight: Tensor, eps: float) -> None:
    require(isinstance(x, Tensor), "x", f"expected a tensor, got {type(x).__name__}")
    require(x.dtype in DTYPES, "x", f"dtype {x.dtype} is not supported; expected fp32, fp16 or bf16")
    require(x.dim() >= 1, "x", "must have at least one dimension [..., H]")
    if residual is not None:
        require(isinstance(residual, Tensor) and residual.shape == x.shape and residual.dtype == x.dtype
                and residual.device == x.device, "residual",
                f"must match x ({tuple(x.shape)}, {x.dtype}, {x.device})")
    require(isinstance(weight, Tensor) and weight.dim() == 1 and weight.shape[0] == x.shape[-1], "weight",
            f"must be a 1-D tensor of {x.shape[-1]} values")
    require(weight.dtype in DTYPES and weight.device == x.device, "weight",
            f"must be fp32/fp16/bf16 on {x.device}, got {weight.dtype} on {weight.device}")
    require(isinstance(eps, (int, float)) and not isinstance(eps, bool) and math.isfinite(eps) and eps >= 0,
            "eps", f"must be a finite float >= 0, got {eps!r}")


def _validate_rope(qkv: Tensor, cos: Tensor, sin: Tensor, hq: int, hkv: int) -> None:
    require(isinstance(hq, int) and hq >= 1, "num_q_heads", f"must be an int >= 1, got {hq!r}")
    require(isinstance(hkv, int) and hkv >= 1, "num_kv_heads", f"must be an int >= 1, got {hkv!r}")
    require(isinstance(qkv, Tensor) and qkv.dim() == 2, "qkv", "must be a 2-D tensor [T, (Hq + 2 Hkv) * D]")
    require(qkv.dtype in DTYPES, "qkv", f"dtype {qkv.dtype} is not supported; expected fp32, fp16 or bf16")
    heads = hq + 2 * hkv
    require(qkv.shape[1] % heads == 0 and (qkv.shape[1] // heads) % 2 == 0, "qkv",
            f"width {qkv.shape[1]} is not (Hq + 2 Hkv) * D = {heads} * D with an even D")
    half = qkv.shape[1] // heads // 2
    for name, c in (("cos", cos), ("sin", sin)):
        require(isinstance(c, Tensor) and c.dtype == torch.float32 and tuple(c.shape) == (qkv.shape[0], half)
                and c.device == qkv.device, name, f"must be float32 [{qkv.shape[0]}, {half}] on {qkv.device}")


# torch.compile support: fake (meta) implementations of the C++ ops.
def _norm_fake(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _add_norm_fake(x: Tensor, residual: Tensor | None, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    # Without a residual (rms_norm on Triton) there is no sum: an empty tensor, never uninitialized memory.
    total_shape = (0,) if residual is None else x.shape
    return torch.empty(x.shape, dtype=x.dtype, device=x.device), torch.empty(total_shape, dtype=x.dtype,
                                                                            device=x.device)


def _rope_fake(qkv: Tensor, cos: Tensor, sin: Tensor, hq: int, hkv: int) -> tuple[Tensor, Tensor, Tensor]:
    t, d = qkv.shape[0], qkv.shape[1] // (hq + 2 * hkv)
    return tuple(torch.empty((t, h, d), dtype=qkv.dtype, device=qkv.device) for h in (hq, hkv, hkv))


def _silu_fake(x: Tensor) -> Tensor:
    return torch.empty((*x.shape[:-1], x.shape[-1] // 2), dtype=x.dtype, device=x.device)


if _extension.load() is not None:
    torch.library.register_fake("forkdec::rms_norm")(_norm_fake)
    torch.library.register_fake("forkdec::add_rms_norm")(_add_norm_fake)
    torch.library.register_fake("forkdec::rope_qkv")(_rope_fake)
    torch.library.register_fake("forkdec::silu_and_mul")(_silu_fake)


def _rows(x: Tensor, cols: int) -> Tensor:
    """x as [rows, cols] with unit stride along a row (a copy only when needed)."""
    x2 = x.reshape(-1, cols) if cols else x.reshape(0, 0)
    return x2 if cols <= 1 or x2.stride(1) == 1 else x2.contiguous()


@torch.library.custom_op("forkdec::add_rms_norm_triton", mutates_args=())
def _add_rms_norm_triton(x: Tensor, residual: Tensor | None, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    from forkdec.triton_kernels.layer_ops import rms_norm_rows

    h = x.shape[-1]
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    total = x.new_empty((0,)) if residual is None else torch.empty_like(x, memory_format=torch.contiguous_format)
    rms_norm_rows(_rows(x, h), None if residual is None else _rows(residual, h), weight.contiguous(), eps,
                  out.view(-1, h) if h else out, None if residual is None else total.view(-1, h))
    return out, total


_add_rms_norm_triton.register_fake(_add_norm_fake)


@torch.library.custom_op("forkdec::rope_qkv_triton", mutates_args=())
def _rope_qkv_triton(qkv: Tensor, cos: Tensor, sin: Tensor, hq: int, hkv: int) -> tuple[Tensor, Tensor, Tensor]:
    from forkdec.triton_kernels.layer_ops import rope_qkv_rows

    q, k, v = _rope_fake(qkv, cos, sin, hq, hkv)
    rope_qkv_rows(_rows(qkv, qkv.shape[1]), cos.contiguous(), sin.contiguous(), hq, hkv, q, k, v)
    return q, k, v


_rope_qkv_triton.register_fake(_rope_fake)


@torch.library.custom_op("forkdec::silu_and_mul_triton", mutates_args=())
def _silu_and_mul_triton(x: Tensor) -> Tensor:
    from forkdec.triton_kernels.layer_ops import silu_and_mul_rows

    out = _silu_fake(x)
    silu_and_mul_rows(_rows(x, x.shape[-1]), out.view(-1, out.shape[-1]) if out.shape[-1] else out)
    return out


_silu_and_mul_triton.register_fake(_silu_fake)
