"""Decoder-layer elementwise ops in Triton: one program per row, math in fp32.

`rms_norm_rows(x, residual, weight, eps, out, total)`, `rope_qkv_rows(qkv, cos, sin,
hq, hkv, q, k, v)` and `silu_and_mul_rows(x, out)` take 2-D row views (unit
stride along a row) and write contiguous outputs; semantics as in
forkdec.reference.layer_ops.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit
def _round(x, dtype: tl.constexpr):
    """fp32 -> dtype rounding to nearest even, as torch's .to(dtype). For bf16 the
    rounding is done on the bits first (the interpreter's conversion truncates), so
    the final conversion is exact on every backend."""
    if dtype.is_bf16():
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True).to(dtype)
    else:
        return x.to(dtype)


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr, h, x_stride, res_stride, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    col = tl.arange(0, BLOCK)
    ok = col < h
    s = tl.load(x_ptr + row * x_stride + col, mask=ok, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        s += tl.load(res_ptr + row * res_stride + col, mask=ok, other=0.0).to(tl.float32)
        # The norm is of the rounded sum: the value the residual stream carries on.
        s = _round(s, sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * h + col, s, mask=ok)
        s = s.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(s * s, axis=0) / h + eps)
    w = tl.load(w_ptr + col, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * h + col, _round((s * inv * w), out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _rope_qkv_kernel(qkv_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, stride, hq, hkv,
                     D: tl.constexpr, HALF_BLOCK: tl.constexpr):
    # Program (t, head) over the hq + 2 hkv heads of row t.
    t = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    half = D // 2
    i = tl.arange(0, HALF_BLOCK)
    ok = i < half
    src = qkv_ptr + t * stride + head * D
    x1 = tl.load(src + i, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(src + half + i, mask=ok, other=0.0).to(tl.float32)
    if head < hq + hkv:
        c = tl.load(cos_ptr + t * half + i, mask=ok, other=0.0)
        s = tl.load(sin_ptr + t * half + i, mask=ok, other=0.0)
        o1 = x1 * c - x2 * s
        o2 = x2 * c + x1 * s
        if head < hq:
            dst = q_ptr + (t * hq + head) * D
        else:
            dst = k_ptr + (t * hkv + head - hq) * D
    else:
        o1 = x1
        o2 = x2
        dst = v_ptr + (t * hkv + head - hq - hkv) * D
    tl.store(dst + i, _round(o1, q_ptr.dtype.element_ty), mask=ok)
    tl.store(dst + half + i, _round(o2, q_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, inter, stride, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = col < inter
    a = tl.load(x_ptr + row * stride + col, mask=ok, other=0.0).to(tl.float32)
    b = tl.load(x_ptr + row * stride + inter + col, mask=ok, other=0.0).to(tl.float32)
    y = a / (1.0 + tl.exp(-a)) * b
    tl.store(out_ptr + row * inter + col, _round(y, out_ptr.dtype.element_ty), mask=ok)


def rms_norm_rows(x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor, eps: float,
                  out: torch.Tensor, total: Optional[torch.Tensor]) -> None:
    rows, h = x.shape
    if rows == 0 or h == 0:
        return
    _rms_norm_kernel[(rows,)](x, residual if residual is not None else x, weight, out,
                              total if total is not None else out, h, x.stride(0),
                              residual.stride(0) if residual is not None else 0, eps,
                              HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(h))


def rope_qkv_rows(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, hq: int, hkv: int,
                  q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    t, width = qkv.shape
    if t == 0:
        return
    d = width // (hq + 2 * hkv)
    _rope_qkv_kernel[(t, hq + 2 * hkv)](qkv, cos, sin, q, k, v, qkv.stride(0), hq, hkv, D=d,
                                         HALF_BLOCK=triton.next_power_of_2(d // 2))


def silu_and_mul_rows(x: torch.Tensor, out: torch.Tensor) -> None:
    rows, width = x.shape
    inter = width // 2
    if rows == 0 or inter == 0:
        return
    block = min(1024, triton.next_power_of_2(inter))
    _silu_and_mul_kernel[(rows, triton.cdiv(inter, block))](x, out, inter, x.stride(0), BLOCK=block)
