"""Perplexity with every prediction read through a KV cache kind, exactly as decoding reads it.

Non-overlapping windows of `window` tokens; each is fed in chunks of `chunk`
tokens through a cache built by `forkdec.cache.make_kv_cache` and the
cache layer's `make_attend`, so a chunk's queries read all earlier tokens from the
cache as stored (quantized pages and the full-precision window of quantized
kinds), never from a fake-quantized copy. Predictions: token t+1 from tokens
<= t of the same window (window - 1 per window), no BOS token added.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from forkdec.cache import StepBatch, make_attend, make_kv_cache
from forkdec.ops import CascadeLevel
from forkdec.text_file import read_tokens  # noqa: F401  (forkdec.eval's face for it)
from forkdec.validation import require, validation


@dataclass
class PplResult:
    kv: str
    ppl: float
    nll: float                      # mean negative log-likelihood (nats)
    tokens: int                     # predictions scored
    windows: int
    window: int
    chunk: int
    seconds: float
    window_nll: list[float] = field(default_factory=list)  # mean NLL of each window


def window_nll(model, tokens: Tensor, cache, *, chunk: int = 128, backend: str = "auto") -> tuple[float, int]:
    """(sum of NLL, predictions) of one window `tokens` [n] fed in chunks through `cache`
    (an engine cache with no pages in use; they are all returned at the end)."""
    n, ps = tokens.numel(), cache.page_size
    num_pages = -(-n // ps)
    alloc = cache.allocator
    require(alloc.reserve(num_pages), "window", f"{n} tokens need {num_pages} pages, the cache has {alloc.num_available}")
    pages = [alloc.alloc() for _ in range(num_pages)]
    table = torch.tensor(pages, dtype=torch.int32)
    nll, count = 0.0, 0
    try:
        for start in range(0, n, chunk):
            end = min(n, start + chunk)
            pos = torch.arange(start, end)
            used = -(-end // ps)
            level = CascadeLevel(torch.tensor([0, end - start], dtype=torch.int32),
                                 torch.tensor([0, used], dtype=torch.int32), table[:used],
                                 torch.tensor([end - (used - 1) * ps], dtype=torch.int32), causal=True)
            slots = table.long()[pos // ps] * ps + pos % ps
            batch = StepBatch(tokens[start:end], pos, slots, [level])
            with validation(start == 0):  # metadata checked on the first chunk, then the hot path
                attend = make_attend(batch, cache, prefill=True, backend=backend)
                logits = model.forward(batch.tokens, batch.positions, attend)
            targets = tokens[start + 1:end + 1]
            nll += float(F.cross_entropy(logits[:targets.numel()].float(), targets, reduction="sum"))
            count += targets.numel()
    finally:
        alloc.free(pages)
    return nll, count


def perplexity(model, tokens: list[int] | Tensor, kv: str | None, *, window: int = 2048, chunk: int = 128,
               windows: int | None = None, first: int = 0, backend: str = "auto",
               progress: Callable[[int, int, float], None] | None = None) -> PplResult:
    """PPL of `model` on consecutive non-overlapping `window`-token windows of `tokens`
    (a trailing partial window is dropped), starting at window index `first`, with the
    cache kind `kv`; `windows` caps the count. progress(done, total, ppl_so_far) is
    called after each window."""
    require(isinstance(window, int) and window >= 2, "window", f"must be an int >= 2, got {window!r}")
    require(isinstance(chunk, int) and chunk >= 1, "chunk", f"must be an int >= 1, got {chunk!r}")
    require(window <= model.config.max_position_embeddings, "window",
            f"{window} exceeds the model's context {model.config.max_position_embeddings}")
    ids = torch.as_tensor(tokens, dtype=torch.int64).flatten()
    require(isinstance(first, int) and first >= 0, "first", f"must be an int >= 0, got {first!r}")
    total = ids.numel() // window - first
    require(windows is None or (isinstance(windows, int) and windows >= 1), "windows", f"must be >= 1, got {windows!r}")
    total = total if windows is None else min(total, windows)
    require(total >= 1, "data", f"{ids.numel()} tokens hold no window of {window} from window {first} on")
    t0 = time.perf_counter()
    with torch.inference_mode():
        cache = make_kv_cache(kv, model, -(-window // 16) + 1)
        if cache.num_pages * cache.page_size < window:  # quantized kinds use bigger pages
            cache = make_kv_cache(kv, model, -(-window // cache.page_size))
        sums, counts = [], []
        for w in range(first, first + total):
            s, c = window_nll(model, ids[w * window:(w + 1) * window], cache, chunk=chunk, backend=backend)
            sums.append(s)
            counts.append(c)
            if progress is not None:
                progress(w + 1 - first, total, math.exp(sum(sums) / sum(counts)))
    mean = sum(sums) / sum(counts)
    return PplResult(kv or "model dtype", math.exp(mean), mean, sum(counts), total, window, chunk,
                     time.perf_counter() - t0, [s / c for s, c in zip(sums, counts)])
