"""The `attend(layer, q, k, v)` callback the model calls in every layer.

It writes the new tokens' K/V into the paged cache (append_kv) and runs
attention with the step's metadata. The metadata is validated once per step
(in the first layer by append_kv and attention's own checks; for decode by
CascadePlan, once per step); every other layer runs with validation off.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

import forkdec.ops as ops
from forkdec.backends import resolve
from forkdec.cache.batch import StepBatch
from forkdec.cache.paged import PagedKVCache
from forkdec.ops.attention import BACKENDS, validate_slots
from forkdec.validation import validation, validation_enabled

Attend = Callable[[int, Tensor, Tensor, Tensor], Tensor]


@dataclass
class PagedStep:
    """A decode step's attention as data, for a model that loops over its layers in C++
    (LlamaModel with torch.ops.forkdec.llama_layers): per layer append_kv(slots) into
    k_caches[i] / v_caches[i], then plan.run. Set as `attend.paged_step` when the
    cache is a PagedKVCache on the cpu backend; its inputs are checked already."""
    k_caches: list[Tensor]
    v_caches: list[Tensor]
    slots: Tensor
    plan: ops.CascadePlan


def pick_backend(device: torch.device) -> str:
    """The attention backend for the whole run, resolved once: resolving "auto" on
    every call probes installed packages, which costs ~0.2 ms x 2 ops x layers per step.
    FORKDEC_ENGINE_BACKEND forces one (tests run the engine on "triton" under the interpreter)."""
    if os.environ.get("FORKDEC_ENGINE_BACKEND"):
        return os.environ["FORKDEC_ENGINE_BACKEND"]
    names = {resolve("auto", op, device, BACKENDS) for op in ("append_kv", "attention", "cascade_attention")}
    return names.pop() if len(names) == 1 else "auto"


def make_attend(batch: StepBatch, cache, *, prefill: bool, backend: str = "auto") -> Attend:
    """The step's attend for `cache`: a quantized cache (forkdec.cache.quantized) builds
    its own; for a PagedKVCache, append_kv then attention (prefill) or the step's
    CascadePlan (decode). Output in q's dtype whatever the cache's dtype."""
    if not isinstance(cache, PagedKVCache):
        return cache.make_attend(batch, prefill=prefill, backend=backend)
    check = [validation_enabled()]  # cleared after the first layer
    plan = None if prefill else ops.CascadePlan(batch.levels, num_pages=cache.num_pages, page_size=cache.page_size,
                                                total_q=int(batch.tokens.numel()), backend=backend)

    def attend(layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        k_cache, v_cache = cache.layer(layer)
        with validation(check[0]):
            check[0] = False
            ops.append_kv(k_cache, v_cache, k.to(k_cache.dtype), v.to(v_cache.dtype), batch.slots, backend=backend)
            dtype, q = q.dtype, q.to(k_cache.dtype)
            if prefill:
                lv = batch.levels[0]
                return ops.attention(q, lv.qo_indptr, k_cache, v_cache, lv.kv_indptr, lv.kv_indices,
                                     lv.kv_last_page_len, causal=True, backend=backend).to(dtype)
            return plan.run(q, k_cache, v_cache).to(dtype)

    if plan is not None and plan.backend == "cpu":
        if check[0]:  # what the first layer's append_kv would check of the step's own input
            validate_slots(batch.slots, int(batch.tokens.numel()), cache.num_pages * cache.page_size)
        attend.paged_step = PagedStep(cache.layers_k, cache.layers_v, batch.slots, plan)
    return attend
