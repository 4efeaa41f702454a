"""forkdec's out-of-tree vLLM attention backend, driven the way vLLM's model runner drives it.

Needs vllm (0.32 tested, in a separate venv: it pins its own torch/transformers
versions, see docs/integrations.md); skipped otherwise. The builder gets vLLM's
CommonAttentionMetadata, the impl gets vLLM's [2, num_blocks, block_size, Hkv, D]
cache, the new tokens' K/V and a padded output buffer; the result is compared
with `forkdec.reference` on a dense layout (tolerances as tests/test_layouts.py).
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm", reason="vllm is not installed (it pins torch/transformers versions of its own)")

from forkdec.integrations.vllm_backend import ForkdecBackend, ForkdecImpl, ForkdecMetadataBuilder, register  # noqa: E402
from test_layouts import D, HKV, HQ, VllmBatch, check, dense_expected, random_kv  # noqa: E402
from vllm.v1.attention.backend import CommonAttentionMetadata  # noqa: E402


def common_metadata(batch: VllmBatch, slot_mapping: torch.Tensor) -> CommonAttentionMetadata:
    q_lens = batch.q_lens
    return CommonAttentionMetadata(
        query_start_loc=batch.query_start_loc, query_start_loc_cpu=batch.query_start_loc, seq_lens=batch.seq_lens,
        num_reqs=len(q_lens), num_actual_tokens=sum(q_lens), max_query_len=max(q_lens),
        max_seq_len=max(batch.seq_lens_list), block_table_tensor=batch.block_table, slot_mapping=slot_mapping)


@pytest.mark.parametrize("shared_blocks", [0, 2], ids=["no_shared_prefix", "prefix_cached"])
@pytest.mark.parametrize("decode", [True, False], ids=["decode", "prefill"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backend_step_matches_reference(shared_blocks, decode, dtype):
    bs = 4
    own = [5, 2, 9]
    q_lens = [1, 1, 1] if decode else [3, 2, 6]
    seq_lens = [shared_blocks * bs + n for n in own]
    gen = torch.Generator().manual_seed(7 + shared_blocks + decode)
    batch = VllmBatch(seq_lens, q_lens, bs, dtype, gen, shared_blocks=shared_blocks)
    prefix = random_kv(shared_blocks * bs, dtype, gen)
    batch.write(0, range(shared_blocks * bs), *prefix)
    ks, vs, new_k, new_v, slots = [], [], [], [], []
    for b, n in enumerate(own):
        k, v = random_kv(n, dtype, gen)
        cached = seq_lens[b] - q_lens[b]  # tokens already in the cache; the rest arrive as key/value
        batch.write(b, range(shared_blocks * bs, cached), k[: n - q_lens[b]], v[: n - q_lens[b]])
        new_k.append(k[n - q_lens[b]:])
        new_v.append(v[n - q_lens[b]:])
        slots.append(batch.slot_mapping(b, range(cached, seq_lens[b])))
        ks.append(k)
        vs.append(v)
    total, pad = sum(q_lens), 2  # vLLM pads the token dimension; padded rows must be left alone
    query = torch.randn(total + pad, HQ, D, generator=gen).to(dtype)
    key = torch.cat(new_k + [torch.zeros(pad, HKV, D, dtype=dtype)])
    value = torch.cat(new_v + [torch.zeros(pad, HKV, D, dtype=dtype)])
    slot_mapping = torch.cat(slots + [torch.full((pad,), -1)])

    builder = ForkdecMetadataBuilder(SimpleNamespace(block_size=bs), ["layer.0"], None, torch.device("cpu"))
    meta = builder.build(0, common_metadata(batch, slot_mapping))
    assert len(meta.levels) == (2 if shared_blocks else 1)
    impl = ForkdecImpl(HQ, D, D ** -0.5, HKV)
    output = torch.full((total + pad, HQ * D), 5.0, dtype=dtype)
    kv_before = batch.kv_cache.data_ptr()
    impl.forward(None, query, key, value, batch.kv_cache, meta, output)
    assert batch.kv_cache.data_ptr() == kv_before
    assert bool((output[total:] == 5.0).all())
    expected = dense_expected(query[:total], q_lens, ks, vs, shared=prefix if shared_blocks else None)
    check((output[:total].view(total, HQ, D), expected[1]), expected, dtype)


def test_registered_as_the_custom_backend_and_cache_shape():
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    register()
    assert AttentionBackendEnum.CUSTOM.get_class() is ForkdecBackend
    assert ForkdecBackend.get_kv_cache_shape(10, 16, 2, 64) == (2, 10, 16, 2, 64)
    assert ForkdecBackend.get_impl_cls() is ForkdecImpl and ForkdecBackend.get_builder_cls() is ForkdecMetadataBuilder
    with pytest.raises(ValueError, match="^sliding_window:"):
        ForkdecImpl(4, 64, 0.125, 2, sliding_window=128)
    with pytest.raises(ValueError, match="^head_size:"):
        ForkdecImpl(4, 80, 0.1, 2)
