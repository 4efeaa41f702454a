"""Quantized linear layer in Triton, weight-only: the activations stay in their float
dtype, the GGUF block weights (packed by forkdec.qweight) are dequantized tile by tile
inside the kernel and multiplied with tl.dot, accumulating in fp32.

`qlinear_rows(x, codes, scale, offset, bits, k, bias, out)`: x [M, K] with unit stride
along a row, out [M, N] contiguous; semantics as forkdec.reference.qlinear.
"""
from __future__ import annotations

from typing import Optional

import os

import torch
import triton
import triton.language as tl


# The interpreter multiplies bf16 tiles wrongly in tl.dot: there the products run in fp32.
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _qlinear_kernel(x_ptr, codes_ptr, scale_ptr, offset_ptr, bias_ptr, out_ptr, M, N, K, x_stride,
                    code_row, scale_row, BITS: tl.constexpr, HAS_BIAS: tl.constexpr, FP32_DOT: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = rm < M, rn < N
    i = tl.arange(0, 32)  # position in a GGUF block
    tile, f = rn // 16, rn % 16
    # Tiled layout (forkdec.qweight): per tile and block, 64-byte vectors of 4 codes per feature;
    # 4-bit: vector (i % 16) // 4, high nibble for i >= 16; 8-bit: vector i // 4.
    if BITS == 4:
        at = (tile * code_row)[:, None] + (((i % 16) // 4) * 64 + i % 4)[None, :] + (f * 4)[:, None]
        shift = ((i >= 16) * 4)[None, :]
    else:
        at = (tile * code_row)[:, None] + ((i // 4) * 64 + i % 4)[None, :] + (f * 4)[:, None]
    s_at = tile * scale_row + f
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for b in range(0, K // 32):
        xb = tl.load(x_ptr + rm[:, None] * x_stride + b * 32 + i[None, :], mask=m_ok[:, None], other=0.0)
        code = tl.load(codes_ptr + at + b * (BITS * 64), mask=n_ok[:, None], other=0)
        if BITS == 4:
            code = (code >> shift) & 15
        d = tl.load(scale_ptr + s_at + b * 16, mask=n_ok, other=0.0).to(tl.float32)
        c = tl.load(offset_ptr + s_at + b * 16, mask=n_ok, other=0.0).to(tl.float32)
        w = code.to(tl.float32) * d[:, None] + c[:, None]
        if FP32_DOT:
            acc += tl.dot(xb.to(tl.float32), tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(xb, tl.trans(w.to(x_ptr.dtype.element_ty)))
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0)[None, :]
    tl.store(out_ptr + rm[:, None] * N + rn[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def qlinear_rows(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int,
                 k: int, bias: Optional[torch.Tensor], out: torch.Tensor) -> None:
    m, n = out.shape
    block_m = 16 if m <= 16 else 32
    block_n = 32
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _qlinear_kernel[grid](x, codes, scale, offset, bias if bias is not None else scale, out, m, n, k,
                          x.stride(0), codes.shape[1], scale.shape[1], BITS=bits, HAS_BIAS=bias is not None,
                          FP32_DOT=x.dtype == torch.float32 or _INTERPRETED, BLOCK_M=block_m, BLOCK_N=block_n)
