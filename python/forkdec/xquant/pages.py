"""Quantized X in the paged layout: every page is one quantized [page_size, W] tile.

Axis "token" groups along W within each token; axis "channel" groups
`group_size` consecutive tokens of one channel, so page_size must be a multiple
of group_size and only full pages are quantized (a cache keeps the newest tokens
in full precision until a whole page can be flushed).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from forkdec.validation import require
from forkdec.xquant.quantize import quantize, unpack_codes, validate_format


@dataclass
class QuantizedPages:
    """codes uint8 [num_pages, groups_per_page, group_size * bits / 8];
    scale, zero fp16 [num_pages, groups_per_page]."""
    codes: Tensor
    scale: Tensor
    zero: Tensor
    bits: int
    group_size: int
    axis: str
    page_size: int
    width: int

    @staticmethod
    def empty(num_pages: int, page_size: int, width: int, bits: int, group_size: int, axis: str,
              device: torch.device | str = "cpu") -> "QuantizedPages":
        validate_format(bits, group_size, axis)
        if axis == "token":
            require(width % group_size == 0, "width", f"{width} is not a multiple of group_size {group_size}")
        else:
            require(page_size % group_size == 0, "page_size",
                    f"{page_size} is not a multiple of group_size {group_size} (channel groups span tokens)")
        groups = page_size * width // group_size
        return QuantizedPages(torch.zeros(num_pages, groups, group_size * bits // 8, dtype=torch.uint8, device=device),
                              torch.zeros(num_pages, groups, dtype=torch.float16, device=device),
                              torch.zeros(num_pages, groups, dtype=torch.float16, device=device),
                              bits, group_size, axis, page_size, width)

    @property
    def num_pages(self) -> int:
        return self.codes.shape[0]

    def nbytes_per_page(self) -> int:
        return self.codes[0].numel() + 4 * self.scale.shape[1]

    def write(self, page: int, x: Tensor) -> None:
        """Quantize x [page_size, W] into `page`."""
        require(tuple(x.shape) == (self.page_size, self.width), "x",
                f"expected one page [{self.page_size}, {self.width}], got {tuple(x.shape)}")
        qt = quantize(x, self.bits, self.group_size, self.axis)
        self.codes[page], self.scale[page], self.zero[page] = qt.codes, qt.scale, qt.zero

    def read(self, pages: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """Dequantized pages [len(pages), page_size, W], all pages in one pass."""
        idx = pages.to(device=self.codes.device, dtype=torch.long)
        n, ps, w, g = idx.numel(), self.page_size, self.width, self.group_size
        codes = unpack_codes(self.codes[idx].reshape(-1, self.codes.shape[-1]), self.bits, g).float()
        vals = codes * self.scale[idx].reshape(-1, 1).float() + self.zero[idx].reshape(-1, 1).float()
        if self.axis == "token":
            return vals.reshape(n, ps, w).to(dtype)
        # channel groups: per page (token block, channel) pairs, the block's tokens contiguous
        return vals.reshape(n, ps // g, w, g).transpose(2, 3).reshape(n, ps, w).to(dtype)
