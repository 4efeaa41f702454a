"""One cached stream of a batch of equal-length sequences: quantized pages plus a full-precision window.

The transformers cache classes (forkdec.integrations.transformers_cache) keep
each quantity they cache (K and V for KIVI; X or its latents for XQuant) in a
`QuantizedStream`, with the flush semantics of forkdec's QuantizedKVCache:
new tokens land in the window (16-bit, `window_dtype`); `flush()`, called
after a step's attention read the stream, quantizes the oldest whole pages
(page_size tokens) while `residual + page_size` or more tokens sit in the
window, so quantized pages always start at multiples of page_size and every
page is quantized from the window's 16-bit values, as forkdec quantizes them.
"""
from __future__ import annotations

import torch
from torch import Tensor

from forkdec.xquant.quantize import QuantizedTensor, dequantize, quantize


class QuantizedStream:
    """A [B, n, width] stream: `quantized_len` tokens in codes [B, groups, bytes] with fp16
    scale/zero [B, groups], the other n - quantized_len in `window` [B, f, width]."""

    def __init__(self, width: int, bits: int, group_size: int, axis: str, page_size: int, residual: int,
                 window_dtype: torch.dtype) -> None:
        self.width, self.bits, self.group_size, self.axis = width, bits, group_size, axis
        self.page_size, self.residual, self.window_dtype = page_size, residual, window_dtype
        self.codes: Tensor | None = None
        self.scale: Tensor | None = None
        self.zero: Tensor | None = None
        self.window: Tensor | None = None
        self.quantized_len = 0

    def __len__(self) -> int:
        return self.quantized_len + (0 if self.window is None else self.window.shape[1])

    def append(self, x: Tensor) -> None:
        """Add x [B, T, width] (any float dtype) to the window."""
        x = x.to(self.window_dtype)
        self.window = x if self.window is None else torch.cat([self.window, x], dim=1)

    def read(self) -> Tensor:
        """The whole stream [B, n, width] in fp32: dequantized pages, then the window."""
        win = self.window.float()
        if not self.quantized_len:
            return win
        b = win.shape[0]
        qt = QuantizedTensor(self.codes.reshape(-1, self.codes.shape[-1]), self.scale.reshape(-1),
                             self.zero.reshape(-1), self.bits, self.group_size, self.axis,
                             (b * self.quantized_len, self.width))
        # Rows' groups are stored row after row, so the flat tensor is [B * quantized_len, width] in row order.
        return torch.cat([dequantize(qt).reshape(b, self.quantized_len, self.width), win], dim=1)

    def flush(self) -> None:
        """Quantize the window's oldest pages while residual + page_size or more tokens sit in it."""
        p = self.page_size
        full = 0
        while self.window is not None and self.window.shape[1] - full >= self.residual + p:
            full += p
        if not full:
            return
        b = self.window.shape[0]
        # Each page's groups stay inside one row and one page (p is a multiple of the group size).
        pages = self.window[:, :full].reshape(b * full // p, p, self.width)
        qt = quantize(pages.float().reshape(-1, self.width), self.bits, self.group_size, self.axis)
        codes, scale, zero = (t.reshape(b, -1, *t.shape[1:]) for t in (qt.codes, qt.scale, qt.zero))
        if self.codes is None:
            self.codes, self.scale, self.zero = codes, scale, zero
        else:
            self.codes = torch.cat([self.codes, codes], dim=1)
            self.scale = torch.cat([self.scale, scale], dim=1)
            self.zero = torch.cat([self.zero, zero], dim=1)
        self.window = self.window[:, full:].contiguous()
        self.quantized_len += full

    def nbytes(self) -> int:
        """Bytes held: codes, fp16 scales and zeros, and the window."""
        held = 0 if self.window is None else self.window.numel() * self.window.element_size()
        if self.codes is not None:
            held += self.codes.numel() + 2 * self.scale.numel() + 2 * self.zero.numel()
        return held

    def select_rows(self, index: Tensor) -> None:
        """Keep (or repeat, reorder) batch rows: index [B'] into the current rows."""
        for name in ("codes", "scale", "zero", "window"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.index_select(0, index.to(t.device)))

    def clear(self) -> None:
        self.codes = self.scale = self.zero = self.window = None
        self.quantized_len = 0
