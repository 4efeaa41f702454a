"""Plan/run split for cascade attention: validate a step's metadata once, run it per layer.

A decoding step runs the same cascade (same levels, page tables, masks) in every
layer of the model; only q and the layer's caches change. `CascadePlan` checks
and packs the metadata once (`plan`), and `run` then does only the cheap checks
that need no data reads (shapes and dtypes of q and the caches). On the triton
backend the plan also reads the requests' lengths back from the device once
and keeps the kernels' work lists, so that `run` makes no device-to-host copy
(no host sync per layer; CUDA graph friendly).
"""
from __future__ import annotations

import torch
from torch import Tensor

from forkdec import reference
from forkdec.backends import resolve
from forkdec.ops.attention import BACKENDS, CascadeLevel, softmax_scale, validate_page_table, validate_tensors
from forkdec.validation import require, validation_enabled


def _int32(t: Tensor) -> Tensor:
    return t if t.dtype == torch.int32 and t.is_contiguous() else t.to(torch.int32).contiguous()


class CascadePlan:
    """Cascade metadata for one step, validated and packed once.

    levels: as for `cascade_attention`. num_pages, page_size: the caches' first
    two dimensions; total_q: the number of query rows. `run(q, k_cache, v_cache)`
    equals `cascade_attention(q, k_cache, v_cache, levels)` for every layer's q
    [total_q, Hq, D] and caches [num_pages, page_size, Hkv, D].
    """

    def __init__(self, levels: list[CascadeLevel], *, num_pages: int, page_size: int, total_q: int,
                 sm_scale: float | None = None, backend: str = "auto"):
        require(len(levels) > 0, "levels", "needs at least one level")
        if validation_enabled():
            require(sm_scale is None or (isinstance(sm_scale, (int, float)) and sm_scale > 0), "sm_scale",
                    f"must be a positive float, got {sm_scale!r}")
            for i, lv in enumerate(levels):
                require(isinstance(lv, CascadeLevel), f"levels[{i}]",
                        f"expected a CascadeLevel, got {type(lv).__name__}")
                validate_page_table(total_q, num_pages, page_size, lv.qo_indptr, lv.kv_indptr, lv.kv_indices,
                                    lv.kv_last_page_len, lv.custom_mask, prefix=f"levels[{i}].")
        self.levels = [CascadeLevel(_int32(lv.qo_indptr), _int32(lv.kv_indptr), _int32(lv.kv_indices),
                                    _int32(lv.kv_last_page_len), lv.causal,
                                    None if lv.custom_mask is None else lv.custom_mask.contiguous())
                       for lv in levels]
        self.num_pages, self.page_size, self.total_q = num_pages, page_size, total_q
        self.sm_scale = sm_scale
        self.backend = resolve(backend, "cascade_attention", levels[0].qo_indptr.device, BACKENDS)
        # cascade_attention's level arguments: qo_indptr, kv_indptr, kv_indices, kv_last_page_len,
        # causal, custom_mask lists, one entry per level.
        self.lists = ([lv.qo_indptr for lv in self.levels], [lv.kv_indptr for lv in self.levels],
                       [lv.kv_indices for lv in self.levels], [lv.kv_last_page_len for lv in self.levels],
                       [lv.causal for lv in self.levels], [lv.custom_mask for lv in self.levels])
        self._launch_plan = None
        if self.backend == "triton":
            from forkdec.triton_kernels.attention import LaunchPlan
            self._launch_plan = LaunchPlan([(lv.qo_indptr, lv.kv_indptr, lv.kv_indices, lv.kv_last_page_len,
                                             lv.custom_mask) for lv in self.levels], page_size)

    def scale(self, head_dim: int) -> float:
        """The softmax scale the kernels use: sm_scale, or 1 / sqrt(head_dim) when None."""
        return softmax_scale(head_dim, self.sm_scale)

    def run(self, q: Tensor, k_cache: Tensor, v_cache: Tensor, *,
            return_lse: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """out [total_q, Hq, D] in q's dtype (and lse [total_q, Hq] fp32 if return_lse)."""
        if validation_enabled():
            validate_tensors(q, k_cache, v_cache, self.sm_scale)
            require(q.shape[0] == self.total_q, "q", f"has {q.shape[0]} rows, the plan has {self.total_q}")
            require(tuple(k_cache.shape[:2]) == (self.num_pages, self.page_size), "k_cache",
                    f"[num_pages, page_size] = {tuple(k_cache.shape[:2])}, the plan has "
                    f"{(self.num_pages, self.page_size)}")
        if self.backend == "reference":
            return reference.cascade_attention(q, k_cache, v_cache, self.levels, sm_scale=self.sm_scale,
                                               return_lse=return_lse)
        if self.backend == "triton":  # the planned launch: the kernels with this step's work lists
            from forkdec.triton_kernels.attention import cascade_attention
            out, lse = cascade_attention(q, k_cache, v_cache, *self.lists, self.scale(q.shape[-1]),
                                         plan=self._launch_plan)
        else:
            out, lse = torch.ops.forkdec.cascade_attention(q, k_cache, v_cache, *self.lists,
                                                           self.scale(q.shape[-1]))
        return (out, lse) if return_lse else out
