"""forkdec as an out-of-tree vLLM (v1) attention backend; needs `vllm` (written against 0.32).

    from forkdec.integrations.vllm_backend import register
    register()        # then: vllm serve ... --attention-backend CUSTOM

The KV cache is vLLM's own `[2, num_blocks, block_size, Hkv, D]` tensor (forkdec's
NHD pages); the builder turns each step's block table into a forkdec cascade by
index arithmetic (`forkdec.integrations.layouts`): when every request shares
leading blocks (prefix caching, e.g. the n paths vLLM forks for
`SamplingParams(n=...)`), level 0 reads them once for all queries and level 1
reads each request's own blocks. vLLM's CPU platform needs a CPU build of vLLM,
which PyPI does not ship (docs/integrations.md); the backend itself runs on CPU
tensors and is tested against `forkdec.reference` without a vLLM engine.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor
from vllm.v1.attention.backend import (AttentionBackend, AttentionCGSupport, AttentionImpl, AttentionMetadataBuilder,
                                       AttentionType, CommonAttentionMetadata, MultipleOf)

import forkdec.ops as ops
from forkdec.integrations.layouts import common_prefix_blocks, from_vllm_block_table, vllm_cascade_levels
from forkdec.ops.attention import HEAD_DIMS, CascadeLevel
from forkdec.validation import require


@dataclass
class ForkdecMetadata:
    """One step's cascade levels (built once per step) and its slot mapping."""
    num_actual_tokens: int
    slot_mapping: Tensor
    levels: list[CascadeLevel]
    _plans: dict = field(default_factory=dict)

    def plan(self, num_blocks: int, block_size: int, scale: float) -> ops.CascadePlan:
        """The validated plan for this cache size and scale; built by the first layer, reused by the rest."""
        key = (num_blocks, block_size, scale)
        if key not in self._plans:
            self._plans[key] = ops.CascadePlan(self.levels, num_pages=num_blocks, page_size=block_size,
                                               total_q=self.num_actual_tokens, sm_scale=scale)
        return self._plans[key]


def build_metadata(block_table: Tensor, seq_lens: Tensor, query_start_loc: Tensor, slot_mapping: Tensor,
                   block_size: int) -> ForkdecMetadata:
    """vLLM's per-step tensors as forkdec cascade levels (shared leading blocks as level 0 when any)."""
    num_reqs = seq_lens.numel()
    block_table, query_start_loc = block_table[:num_reqs], query_start_loc[: num_reqs + 1]
    total = int(query_start_loc[-1])
    shared = common_prefix_blocks(block_table, seq_lens, query_start_loc, block_size)
    if shared > 0:
        levels = vllm_cascade_levels(block_table, seq_lens, query_start_loc, block_size, shared * block_size)
    else:
        t = from_vllm_block_table(block_table, seq_lens, block_size)
        levels = [CascadeLevel(query_start_loc.to(torch.int32), t.kv_indptr, t.kv_indices, t.kv_last_page_len,
                               causal=True)]
    return ForkdecMetadata(total, slot_mapping[:total], levels)


class ForkdecMetadataBuilder(AttentionMetadataBuilder[ForkdecMetadata]):
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER

    def __init__(self, kv_cache_spec: Any, layer_names: list[str], vllm_config: Any, device: torch.device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.block_size = kv_cache_spec.block_size

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> ForkdecMetadata:
        m = common_attn_metadata
        return build_metadata(m.block_table_tensor, m.seq_lens, m.query_start_loc, m.slot_mapping, self.block_size)


class ForkdecImpl(AttentionImpl[ForkdecMetadata]):
    """Decoder self-attention: append_kv at vLLM's slot mapping, then the step's cascade plan."""

    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int | None = None,
                 alibi_slopes: list[float] | None = None, sliding_window: int | None = None,
                 kv_cache_dtype: str = "auto", logits_soft_cap: float | None = None,
                 attn_type: str = AttentionType.DECODER, kv_sharing_target_layer_name: str | None = None,
                 **unused: Any) -> None:
        require(head_size in HEAD_DIMS, "head_size", f"{head_size} is not supported (supported: {HEAD_DIMS})")
        require(alibi_slopes is None, "alibi_slopes", "ALiBi is not supported")
        require(sliding_window is None, "sliding_window", "sliding windows are not supported")
        require(logits_soft_cap is None, "logits_soft_cap", "soft-capping is not supported")
        require(kv_cache_dtype == "auto", "kv_cache_dtype", f"only 'auto' is supported, got {kv_cache_dtype!r}")
        require(attn_type == AttentionType.DECODER, "attn_type", f"only decoder attention, got {attn_type!r}")
        self.num_heads, self.head_size, self.scale = num_heads, head_size, float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name

    def forward(self, layer: Any, query: Tensor, key: Tensor, value: Tensor, kv_cache: Tensor,
                attn_metadata: ForkdecMetadata | None, output: Tensor, output_scale: Tensor | None = None,
                output_block_scale: Tensor | None = None) -> Tensor:
        """query [T, Hq, D], key/value [T, Hkv, D], kv_cache [2, num_blocks, block_size, Hkv, D];
        writes the first num_actual_tokens rows of output ([T, Hq * D] or [T, Hq, D])."""
        if attn_metadata is None:  # vLLM's memory-profiling run
            return output.fill_(0)
        require(output_scale is None and output_block_scale is None, "output_scale",
                "fused output quantization is not supported")
        n, h, d = attn_metadata.num_actual_tokens, self.num_heads, self.head_size
        k_cache, v_cache = kv_cache.unbind(0)
        if self.kv_sharing_target_layer_name is None:  # layers sharing another layer's KV do not write it
            ops.append_kv(k_cache, v_cache, key[:n], value[:n], attn_metadata.slot_mapping)
        plan = attn_metadata.plan(k_cache.shape[0], k_cache.shape[1], self.scale)
        output[:n].view(n, h, d).copy_(plan.run(query[:n].view(n, h, d), k_cache, v_cache))
        return output


class ForkdecBackend(AttentionBackend):
    accept_output_buffer: bool = True
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto"]
    forward_includes_kv_cache_update: bool = True

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_impl_cls() -> type[ForkdecImpl]:
        return ForkdecImpl

    @staticmethod
    def get_builder_cls() -> type[ForkdecMetadataBuilder]:
        return ForkdecMetadataBuilder

    @staticmethod
    def get_kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_size: int,
                           cache_dtype_str: str = "auto") -> tuple[int, ...]:
        return (2, num_blocks, block_size, num_kv_heads, head_size)

    @staticmethod
    def get_supported_kernel_block_sizes() -> list[int | MultipleOf]:
        return [MultipleOf(1)]

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return list(HEAD_DIMS)


def register() -> None:
    """Register ForkdecBackend as vLLM's CUSTOM attention backend (select it with
    `--attention-backend CUSTOM` / `attention_backend="CUSTOM"`)."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CUSTOM, f"{__name__}.ForkdecBackend")
