"""PagedKVCache: K/V pages in a floating-point dtype for every layer.

Layout follows docs/attention.md: per layer k/v [num_pages, page_size, Hkv, D].
"""
from __future__ import annotations

import torch
from torch import Tensor

from forkdec.cache.allocator import PageAllocator
from forkdec.validation import require


class PagedKVCache:
    """K/V pages for every layer, `[num_layers, num_pages, page_size, Hkv, D]` each,
    with the allocator that hands the pages out."""

    def __init__(self, num_layers: int, num_pages: int, num_kv_heads: int, head_dim: int, *,
                 page_size: int = 16, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        require(page_size >= 1, "page_size", f"must be >= 1, got {page_size}")
        require(num_pages >= 1, "num_pages", f"must be >= 1, got {num_pages}")
        self.page_size = page_size
        shape = (num_layers, num_pages, page_size, num_kv_heads, head_dim)
        # empty, not zeros: pages are written before they are read, and untouched
        # memory is never committed, so a generous budget costs nothing until used.
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        # Each layer's [num_pages, page_size, Hkv, D] views, made once (a step passes all of them).
        self.layers_k, self.layers_v = list(self.k.unbind(0)), list(self.v.unbind(0))
        self.allocator = PageAllocator(num_pages)

    @staticmethod
    def page_bytes(num_layers: int, num_kv_heads: int, head_dim: int, page_size: int, dtype: torch.dtype) -> int:
        """Bytes of one page across all layers, K and V."""
        return 2 * num_layers * page_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    @property
    def num_pages(self) -> int:
        return self.k.shape[1]

    @property
    def device(self) -> torch.device:
        return self.k.device

    @property
    def bytes_per_page(self) -> int:
        return 2 * self.k[:, 0].numel() * self.k.element_size()

    @property
    def bytes_used(self) -> int:
        return self.allocator.num_used * self.bytes_per_page

    def layer(self, i: int) -> tuple[Tensor, Tensor]:
        """(k_cache, v_cache) of layer i, each [num_pages, page_size, Hkv, D], contiguous views."""
        return self.layers_k[i], self.layers_v[i]

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    def copy_prefix(self, src: int, dst: int, tokens: int) -> None:
        """Copy the first `tokens` rows of page `src` into page `dst`, every layer (copy on write
        of a partial page a forked path goes on writing)."""
        self.k[:, dst, :tokens] = self.k[:, src, :tokens]
        self.v[:, dst, :tokens] = self.v[:, src, :tokens]
