"""The cache layer, one below the engine: pages with reference counts, the paged fp
cache, the quantized caches (XQuant, KIVI), cache kinds, and the per-step attend.
Used by the engine, the evaluation code and the speculative step; it imports
nothing above it (forkdec.ops, forkdec.xquant's formats and kernels, forkdec.tree)."""
from forkdec.cache.allocator import PageAllocator
from forkdec.cache.attend import make_attend, pick_backend
from forkdec.cache.batch import StepBatch, TreeInputs
from forkdec.cache.kind import CacheKind, cache_kind, make_kv_cache
from forkdec.cache.paged import PagedKVCache

__all__ = ["CacheKind", "PageAllocator", "PagedKVCache", "StepBatch", "TreeInputs", "cache_kind", "make_attend",
           "make_kv_cache", "pick_backend"]
