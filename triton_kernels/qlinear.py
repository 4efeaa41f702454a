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
                    code_bytes, blocks, BITS: tl.constexpr, HAS_BIAS: tl.constexpr, FP32_DOT: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = rm < M, rn < N
    j = tl.arange(0, 64)
    # Chunk order inside a 128-element superblock: the lo part (position j < 64)
    # holds elements j, j + 32 (j >= 32); the hi part the 32 after each.
    lo_col = j + 32 * (j >= 32)
    chunk = j // 32
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for sb in range(0, tl.cdiv(K, 128)):
        col = sb * 128 + lo_col
        xl = tl.load(x_ptr + rm[:, None] * x_stride + col[None, :], mask=m_ok[:, None] & (col < K)[None, :],
                     other=0.0)
        xh = tl.load(x_ptr + rm[:, None] * x_stride + col[None, :] + 32,
                     mask=m_ok[:, None] & (col + 32 < K)[None, :], other=0.0)
        if BITS == 4:
            byte = tl.load(codes_ptr + rn[:, None] * code_bytes + sb * 64 + j[None, :], mask=n_ok[:, None], other=0)
            ql = byte & 15
            qh = byte >> 4
        else:
            base = codes_ptr + rn[:, None] * code_bytes + sb * 128 + j[None, :]
            ql = tl.load(base, mask=n_ok[:, None], other=0)
            qh = tl.load(base + 64, mask=n_ok[:, None], other=0)
        s_at = rn[:, None] * blocks + sb * 4 + chunk[None, :]
        wl = ql.to(tl.float32) * tl.load(scale_ptr + s_at, mask=n_ok[:, None], other=0.0) \
            + tl.load(offset_ptr + s_at, mask=n_ok[:, None], other=0.0)
        wh = qh.to(tl.float32) * tl.load(scale_ptr + s_at + 2, mask=n_ok[:, None], other=0.0) \
            + tl.load(offset_ptr + s_at + 2, mask=n_ok[:, None], other=0.0)
        if FP32_DOT:
            acc += tl.dot(xl.to(tl.float32), tl.trans(wl), input_precision="ieee")
            acc += tl.dot(xh.to(tl.float32), tl.trans(wh), input_precision="ieee")
        else:
            acc += tl.dot(xl, tl.trans(wl.to(x_ptr.dtype.element_ty)))
            acc += tl.dot(xh, tl.trans(wh.to(x_ptr.dtype.element_ty)))
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0)[None, :]
    tl.store(out_ptr + rm[:, None] * N + rn[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def qlinear_rows(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int,
                 k: int, bias: Optional[torch.Tensor], out: torch.Tensor) -> None:
    m, n = x.shape[0], codes.shape[0]
    block_m = 16 if m <= 16 else 32
    block_n = 32
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _qlinear_kernel[grid](x, codes, scale, offset, bias if bias is not None else scale, out, m, n, k,
                          x.stride(0), codes.shape[1], scale.shape[1], BITS=bits, HAS_BIAS=bias is not None,
                          FP32_DOT=x.dtype == torch.float32 or _INTERPRETED, BLOCK_M=block_m, BLOCK_N=block_n)
