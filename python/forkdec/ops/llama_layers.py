"""The decoder layers of a Llama-family model for one decode step, looped in C++.

    x, residual = torch.ops.forkdec.llama_layers(x, cos, sin, weights, qbits, num_q_heads, num_kv_heads,
                                                 eps, k_caches, v_caches, slots, *plan.lists, sm_scale)

x [T, hidden] (the embedded tokens, model dtype); cos, sin fp32 [T, D/2]; weights and
qbits as LlamaModel._layer_tensors builds them (per layer: attn_norm, ffn_norm, qkv bias
or an empty tensor, then qkv, o, gate_up, down as (codes, scale, offset) of stored GGUF
blocks with qbits 4/8, or (dense [N, K], empty, empty) with qbits 0); k_caches, v_caches
one [num_pages, page_size, Hkv, D] cache per layer, written in place at `slots`; the
cascade levels as CascadePlan.lists. Returns (x, residual) before the final norm.

It computes what LlamaModel.forward's Python loop computes (rms_norm, add_rms_norm,
qlinear or linear, rope_qkv, append_kv, cascade_attention, silu_and_mul), in the same
order on the same values: the elementwise and qlinear kernels called directly on
buffers allocated once per call, the rest as ops. Its results are bitwise that loop's:
the loop is its reference (tests/test_llama_layers.py). It exists because at one token
per step a 135M model's ~10 small ops per layer cost about as much in Python, op
dispatch and output allocation as in their kernels. CPU only.
"""
from __future__ import annotations

import torch
from torch import Tensor

from forkdec import _extension


def _fake(x: Tensor, cos: Tensor, sin: Tensor, weights: list[Tensor], qbits: list[int], num_q_heads: int,
          num_kv_heads: int, eps: float, k_caches: list[Tensor], v_caches: list[Tensor], slots: Tensor,
          qo_indptr: list[Tensor], kv_indptr: list[Tensor], kv_indices: list[Tensor],
          kv_last_page_len: list[Tensor], causal: list[bool], custom_mask: list[Tensor | None],
          sm_scale: float) -> tuple[Tensor, Tensor]:
    return torch.empty_like(x, memory_format=torch.contiguous_format), \
        torch.empty_like(x, memory_format=torch.contiguous_format)


if _extension.load() is not None:
    torch.library.register_fake("forkdec::llama_layers")(_fake)
