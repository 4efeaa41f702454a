"""CacheKind: a cache kind string parsed once, answering what the engine and the
budget need (page size, page bytes, window pages and slots) and building the cache."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from forkdec.cache.paged import PagedKVCache
from forkdec.cache.quantized import QuantizedKVCache
from forkdec.xquant.accounting import stream_widths, window_dtype
from forkdec.xquant.kinds import KVKind, parse_kind


@dataclass(frozen=True)
class CacheKind:
    """The cache of `kind` (None: K/V in the model's dtype) for one model.

    page_size: tokens per page (quantized kinds use their own, the requested size
    is then ignored); page_bytes: one page over all layers (quantized kinds: a
    quantized page; the full-precision window comes on top); window_slots: window
    pages one live sequence spans at most; window_pages: budget pages (of
    page_bytes) that cover one live sequence's window (0 for fp kinds).
    """
    name: str | None
    kind: KVKind | None
    page_size: int
    page_bytes: int
    window_slots: int
    window_pages: int

    @property
    def quantized(self) -> bool:
        return self.kind is not None and self.kind.quantized

    def make(self, model, num_pages: int, *, max_window_slots: int | None = None):
        """A cache of this kind with `num_pages` pages: PagedKVCache (fp kinds) or QuantizedKVCache
        (max_window_slots: its window pool's cap)."""
        device = getattr(model, "device", "cpu")  # models outside forkdec.models may not say
        cfg = model.config
        if not self.quantized:
            dtype = model.dtype if self.kind is None else self.kind.dtype
            return PagedKVCache(cfg.num_layers, num_pages, cfg.num_kv_heads, cfg.head_dim,
                                page_size=self.page_size, dtype=dtype, device=device)
        return QuantizedKVCache(self.kind, model, num_pages, device=device, max_window_slots=max_window_slots)


def cache_kind(kv: str | None, model, page_size: int = 16) -> CacheKind:
    """Parse the kind string `kv` (forkdec.xquant.kinds; None: the model's dtype) once for `model`."""
    cfg = model.config
    kind = None if kv is None else parse_kind(kv)
    if kind is None or not kind.quantized:
        dtype = model.dtype if kind is None else kind.dtype
        return CacheKind(kv, kind, page_size,
                         PagedKVCache.page_bytes(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, page_size, dtype),
                         0, 0)
    p = kind.page_size(page_size)
    widths = stream_widths(kind, cfg)
    quant_bytes = QuantizedKVCache.page_bytes(kind, cfg)
    # A sequence flushes its oldest window page once R + page_size tokens are in the window,
    # so the window spans at most ceil((R + page_size) / page_size) pages of 16-bit rows.
    slots = -(-(kind.residual + p) // p)
    item = torch.empty((), dtype=window_dtype(kind, model.dtype)).element_size()
    slot_bytes = cfg.num_layers * p * sum(w for _, w, _ in widths) * item
    return CacheKind(kv, kind, p, quant_bytes, slots, -(-slots * slot_bytes // quant_bytes))


def make_kv_cache(kv: str | None, model, num_pages: int, *, page_size: int = 16,
                  max_window_slots: int | None = None):
    """The cache of kind `kv` for `model` with `num_pages` pages (see CacheKind.make)."""
    return cache_kind(kv, model, page_size).make(model, num_pages, max_window_slots=max_window_slots)
