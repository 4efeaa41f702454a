"""The forkdec engine: many sampled paths per prompt over a prefix-shared paged KV cache."""
from forkdec.cache import PageAllocator, PagedKVCache
from forkdec.engine.completion import Completion, GenerateStats
from forkdec.engine.engine import Engine
from forkdec.engine.params import SamplingParams
from forkdec.engine.progress import Progress, ProgressBar

__all__ = ["Completion", "Engine", "GenerateStats", "PageAllocator", "PagedKVCache", "Progress", "ProgressBar",
           "SamplingParams"]
