"""Two-Pass Softmax in Triton (Dukhan & Ablavatski, arXiv 2001.04438).

`softmax_rows(x, inv_temperature, row_inv_temperature, out)` writes
out[r] = softmax(x[r].float() * inv_t[r]) for a 2-D x. Pass 1 sums exp over a
row as a (mantissa, exponent) pair, exp(t) = m * 2**n, so no running max is
needed and no finite input overflows; pass 2 recomputes (m, n) and writes
(m / M) * 2**(n - N) for the row sum M * 2**N.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
# ln 2 = LN2_HI + LN2_LO (Cody-Waite): LN2_HI is fp32 0x3F317200 (15 significant
# bits), so t - n * ln 2 loses almost nothing to rounding.
LN2_HI = tl.constexpr(0.693145751953125)
LN2_LO = tl.constexpr(1.4286068202862268e-06)
FLT_MAX = tl.constexpr(3.4028234663852886e38)
# |t - n ln2| <= ln2/2 + 45 for |t| < 2**30, where n = round(t log2e) carries fp32
# rounding; beyond that fp32 n is too coarse for r, which is then clamped so that
# m stays finite and positive (e**64 times any row length fits in fp32).
R_MAX = tl.constexpr(64.0)


@triton.jit
def _exp_split(t):
    """exp(t) = m * 2**n elementwise on fp32 t: m finite and positive for every
    t except NaN (then NaN); n is a finite integer-valued float except for
    t = +-inf (n = +-inf, so -inf weighs 2**-inf = 0 and +inf makes its row NaN)."""
    n = tl.floor(t * LOG2E + 0.5)
    # |t| > FLT_MAX / log2e overflows t * log2e: keep such finite t finite.
    n = tl.where(n > FLT_MAX, FLT_MAX, tl.where(n < -FLT_MAX, -FLT_MAX, n))
    r = tl.fma(-n, LN2_HI, t)
    r = tl.fma(-n, LN2_LO, r)
    # Clamp by comparisons, which keep NaN (tl.minimum/maximum may drop it).
    r = tl.where(r > R_MAX, R_MAX, tl.where(r < -R_MAX, -R_MAX, r))
    m = tl.exp(r)
    n = tl.where(tl.abs(t) < float("inf"), n, t)
    return m, n


@triton.jit
def _softmax_kernel(x_ptr, out_ptr, row_inv_t_ptr, inv_temperature, rows, cols, x_row_stride,
                    ROWS: tl.constexpr, BLOCK: tl.constexpr, HAS_ROW_T: tl.constexpr):
    # One program owns ROWS rows (1 for long rows) and walks them in [ROWS, BLOCK] tiles.
    row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = row < rows
    row64 = row.to(tl.int64)
    x_rows = x_ptr + row64[:, None] * x_row_stride
    out_rows = out_ptr + row64[:, None] * cols
    col = tl.arange(0, BLOCK)[None, :]
    if HAS_ROW_T:
        inv_t = tl.load(row_inv_t_ptr + row, mask=row_ok, other=1.0)[:, None]
    else:
        inv_t = inv_temperature

    # Pass 1: per lane, sum = acc_m * 2**acc_n. acc_n starts at -FLT_MAX, not -inf,
    # so that exponent differences are never -inf - -inf.
    acc_m = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    acc_n = tl.full([ROWS, BLOCK], -FLT_MAX, dtype=tl.float32)
    for start in range(0, cols, BLOCK):
        mask = row_ok[:, None] & (start + col < cols)
        x = tl.load(x_rows + start + col, mask=mask, other=float("-inf")).to(tl.float32)
        m, n = _exp_split(x * inv_t)
        new_n = tl.maximum(acc_n, n)
        acc_m = acc_m * tl.exp2(acc_n - new_n) + m * tl.exp2(n - new_n)
        acc_n = new_n
    # Reduce the lanes: the row sum is M * 2**N.
    row_n = tl.max(acc_n, axis=1)[:, None]
    row_m = tl.sum(acc_m * tl.exp2(acc_n - row_n), axis=1)[:, None]
    # M = 0 only for a row of only -inf (or past the last row): its output is NaN,
    # as torch's. (Not as 1/0 * 0, which the interpreter would warn about.)
    nonzero = row_m > 0
    inv_m = tl.where(nonzero, 1.0 / tl.where(nonzero, row_m, 1.0), float("nan"))

    # Pass 2, backwards: the end of the row was read last and is likeliest still cached.
    num_blocks = tl.cdiv(cols, BLOCK)
    for i in range(0, num_blocks):
        start = (num_blocks - 1 - i) * BLOCK
        mask = row_ok[:, None] & (start + col < cols)
        x = tl.load(x_rows + start + col, mask=mask, other=float("-inf")).to(tl.float32)
        m, n = _exp_split(x * inv_t)
        tl.store(out_rows + start + col, m * inv_m * tl.exp2(n - row_n), mask=mask)


def softmax_rows(x: torch.Tensor, inv_temperature: float, row_inv_temperature: Optional[torch.Tensor],
                 out: torch.Tensor) -> None:
    """out[r, :] = softmax(x[r, :].float() * inv_t[r]) in two passes over x.

    x: [rows, cols] fp32/fp16/bf16 with unit column stride, any row stride.
    inv_temperature: 1 / temperature, used when row_inv_temperature is None.
    row_inv_temperature: None or contiguous fp32 [rows], 1 / temperature per row.
    out: contiguous fp32 [rows, cols], written in place.
    """
    rows, cols = x.shape
    assert x.dtype in (torch.float32, torch.float16, torch.bfloat16), x.dtype
    assert cols <= 1 or x.stride(1) == 1, "x needs unit column stride"
    assert out.dtype == torch.float32 and out.shape == x.shape and out.is_contiguous()
    if row_inv_temperature is not None:
        assert row_inv_temperature.dtype == torch.float32 and row_inv_temperature.is_contiguous()
        assert row_inv_temperature.numel() == rows
    if rows == 0 or cols == 0:
        return
    block = min(max(triton.next_power_of_2(cols), 16), 4096)
    # Short rows: several per program, so that a program still moves a 4096-element tile.
    rows_per_program = min(4096 // block, triton.next_power_of_2(rows))
    grid = (triton.cdiv(rows, rows_per_program),)
    has_row_t = row_inv_temperature is not None
    _softmax_kernel[grid](
        x, out, row_inv_temperature if has_row_t else out,  # unread placeholder when absent
        float(inv_temperature), rows, cols, x.stride(0),
        ROWS=rows_per_program, BLOCK=block, HAS_ROW_T=has_row_t,
        num_warps=8 if block * rows_per_program >= 2048 else 4)
