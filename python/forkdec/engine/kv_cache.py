"""The paged KV cache and its page allocator with reservations.

Layout follows docs/attention.md: per layer k/v [num_pages, page_size, Hkv, D].
The engine reserves, when it admits a path, every page the path could ever
need, so a running batch can always grow: the engine never runs out of pages
(and never OOMs) mid-decode; paths that do not fit wait for pages to be freed.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from forkdec.validation import require


class PageAllocator:
    """Free list of page ids plus a count of pages promised to admitted owners."""

    def __init__(self, num_pages: int, on_free: Callable[[list[int]], None] | None = None) -> None:
        require(num_pages >= 0, "num_pages", f"must be >= 0, got {num_pages}")
        self.num_pages = num_pages
        self.on_free = on_free  # a cache that keeps per-page state (quantized kinds) forgets it here
        self._free = list(range(num_pages - 1, -1, -1))  # pop() hands out low ids first
        self._reserved = 0

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_pages - len(self._free)

    @property
    def num_reserved(self) -> int:
        """Pages promised to owners but not yet handed out."""
        return self._reserved

    @property
    def num_available(self) -> int:
        """Pages a new reservation can still take."""
        return len(self._free) - self._reserved

    def reserve(self, count: int) -> bool:
        """Promise `count` pages to a new owner if they are available."""
        if count > self.num_available:
            return False
        self._reserved += count
        return True

    def release(self, count: int) -> None:
        """Return `count` promised but unused pages."""
        assert 0 <= count <= self._reserved, (count, self._reserved)
        self._reserved -= count

    def alloc(self) -> int:
        """Hand out one page out of an earlier reservation."""
        assert self._reserved > 0 and self._free, "alloc without a reservation"
        self._reserved -= 1
        return self._free.pop()

    def free(self, pages: list[int]) -> None:
        if self.on_free is not None:
            self.on_free(pages)
        self._free.extend(reversed(pages))
        assert len(self._free) <= self.num_pages, "a page was freed twice"


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
        return self.k[i], self.v[i]

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)


def make_kv_cache(kv: str | None, model, num_pages: int, *, page_size: int = 16,
                  max_window_slots: int | None = None):
    """The cache of kind `kv` (see forkdec.xquant.kinds; None: K/V in the model's dtype)
    for `model`: a PagedKVCache for the fp kinds, a QuantizedKVCache otherwise
    (max_window_slots: its window pool's cap, see QuantizedKVCache)."""
    from forkdec.xquant.kinds import parse_kind

    cfg = model.config
    kind = None if kv is None else parse_kind(kv)
    device = getattr(model, "device", "cpu")  # models outside forkdec.models may not say
    if kind is None or not kind.quantized:
        dtype = model.dtype if kind is None else kind.dtype
        return PagedKVCache(cfg.num_layers, num_pages, cfg.num_kv_heads, cfg.head_dim, page_size=page_size,
                            dtype=dtype, device=device)
    from forkdec.xquant.cache import QuantizedKVCache

    return QuantizedKVCache(kind, model, num_pages, device=device, max_window_slots=max_window_slots)


def kv_page_bytes(kv: str | None, model, page_size: int = 16) -> tuple[int, int]:
    """(page_size, bytes of one page over all layers) for the cache kind `kv`; for
    quantized kinds the page size is the kind's and the bytes are a quantized page's
    (the full-precision window comes on top: see kv_window_pages)."""
    from forkdec.xquant.kinds import parse_kind

    cfg = model.config
    kind = None if kv is None else parse_kind(kv)
    if kind is None or not kind.quantized:
        dtype = model.dtype if kind is None else kind.dtype
        return page_size, PagedKVCache.page_bytes(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, page_size, dtype)
    from forkdec.xquant.cache import QuantizedKVCache

    return kind.page_size(page_size), QuantizedKVCache.page_bytes(kind, cfg)


def kv_window_pages(kv: str | None, model, page_size: int = 16) -> int:
    """Budget pages (of kv_page_bytes' size) that cover one live sequence's full-precision
    window for a quantized kind (0 for fp kinds). A sequence flushes its oldest window page
    once R + page_size tokens are in the window, so the window spans at most
    ceil((R + page_size) / page_size) pages, each a slot of 16-bit rows in every layer."""
    from forkdec.xquant.accounting import stream_widths, window_dtype
    from forkdec.xquant.kinds import parse_kind

    kind = None if kv is None else parse_kind(kv)
    if kind is None or not kind.quantized:
        return 0
    p, quant_bytes = kv_page_bytes(kv, model, page_size)
    item = torch.empty((), dtype=window_dtype(kind, model.dtype)).element_size()
    slot_bytes = model.config.num_layers * p * sum(w for _, w, _ in stream_widths(kind, model.config)) * item
    return -(-kv_window_slots(kv) * slot_bytes // quant_bytes)


def kv_window_slots(kv: str | None) -> int:
    """Window slots (pages of the kind's size) one live sequence's window spans at most: 0 for fp kinds."""
    from forkdec.xquant.kinds import parse_kind

    kind = None if kv is None else parse_kind(kv)
    if kind is None or not kind.quantized:
        return 0
    p = kind.page_size()
    return -(-(kind.residual + p) // p)
