"""forkdec's attention ops on vLLM's paged cache and SGLang's token-level cache, as they are.

Each test writes every request's K/V into the foreign layout (through its own
slot mapping / out_cache_loc, with append_kv), converts only the index tensors
(forkdec.integrations.layouts), runs the op on the very cache tensors (same
data_ptr, unchanged afterwards), and compares with `forkdec.reference.attention`
over an independent dense layout: each request's keys alone in one page.
Tolerances as the attention harness: out 2e-5 (fp32) / 2e-2 (fp16, bf16), lse 1e-4.
"""
from __future__ import annotations

import pytest
import torch

import forkdec
from forkdec import reference
from forkdec.backends import unavailable_reason
from forkdec.integrations.layouts import (common_prefix_blocks, from_sglang_req_to_token, from_vllm_block_table,
                                          token_pool_as_pages, vllm_cascade_levels)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
HQ, HKV, D = 4, 2, 32


def backends() -> list:
    out = []
    for b in ("reference", "cpu", "triton"):
        reason = unavailable_reason(b, "attention", torch.device("cpu"))
        out.append(pytest.param(b, marks=pytest.mark.skip(reason=reason)) if reason else b)
    return out


def tol(dtype: torch.dtype) -> float:
    return 2e-5 if dtype == torch.float32 else 2e-2


def dense_expected(q, q_lens, ks, vs, causal=True, shared=None):
    """Reference attention with each request's keys (shared prefix first, if any) in one page of its own."""
    if shared is not None:
        ks = [torch.cat([shared[0], k]) for k in ks]
        vs = [torch.cat([shared[1], v]) for v in vs]
    longest = max([k.shape[0] for k in ks] + [1])
    kc = q.new_zeros(len(ks), longest, HKV, D)
    vc = torch.zeros_like(kc)
    for b, (k, v) in enumerate(zip(ks, vs)):
        kc[b, : k.shape[0]], vc[b, : v.shape[0]] = k, v
    lens = torch.tensor([k.shape[0] for k in ks], dtype=torch.int32)
    has = (lens > 0).int()
    qo = torch.zeros(len(ks) + 1, dtype=torch.int32)
    qo[1:] = torch.tensor(q_lens, dtype=torch.int32).cumsum(0)
    kv_indptr = torch.zeros(len(ks) + 1, dtype=torch.int32)
    kv_indptr[1:] = has.cumsum(0)
    indices = torch.arange(len(ks), dtype=torch.int32)[has.bool()]
    return reference.attention(q, qo, kc, vc, kv_indptr, indices, lens, causal=causal, return_lse=True)


class VllmBatch:
    """A vLLM-style batch: kv_cache [2, num_blocks, block_size, Hkv, D] (or the num-blocks-first
    physical order [num_blocks, 2, ...] when `blocks_first`), block table padded with junk ids,
    slot mapping of every token written, seq_lens and query_start_loc."""

    def __init__(self, seq_lens, q_lens, block_size, dtype, gen, *, blocks_first=False, shared_blocks=0):
        self.block_size, self.seq_lens_list, self.q_lens = block_size, seq_lens, q_lens
        need = [-(-s // block_size) for s in seq_lens]
        own = sum(n - shared_blocks for n in need)
        num_blocks = shared_blocks + own + 3  # a few blocks nobody uses
        shape = (num_blocks, 2, block_size, HKV, D) if blocks_first else (2, num_blocks, block_size, HKV, D)
        self.kv_cache = torch.full(shape, float("nan"), dtype=dtype)  # unused slots are NaN: reading one shows
        self.k_cache, self.v_cache = (self.kv_cache.unbind(1) if blocks_first else self.kv_cache.unbind(0))
        free = torch.randperm(num_blocks, generator=gen).tolist()
        prefix = [free.pop() for _ in range(shared_blocks)]
        width = max(need + [1]) + 2
        self.block_table = torch.randint(10_000, 20_000, (len(seq_lens), width), generator=gen, dtype=torch.int32)
        for b, n in enumerate(need):
            self.block_table[b, :n] = torch.tensor(prefix + [free.pop() for _ in range(n - shared_blocks)],
                                                   dtype=torch.int32)
        self.seq_lens = torch.tensor(seq_lens, dtype=torch.int32)
        self.query_start_loc = torch.zeros(len(seq_lens) + 1, dtype=torch.int32)
        self.query_start_loc[1:] = torch.tensor(q_lens, dtype=torch.int32).cumsum(0)
        self.num_blocks = num_blocks

    def slot_mapping(self, b: int, positions: range) -> torch.Tensor:
        """vLLM's slot of each position of request b: block_table[b, pos // bs] * bs + pos % bs."""
        pos = torch.tensor(list(positions), dtype=torch.long)
        return self.block_table[b].long()[pos // self.block_size] * self.block_size + pos % self.block_size

    def write(self, b: int, positions: range, k, v) -> None:
        forkdec.ops.append_kv(self.k_cache, self.v_cache, k, v, self.slot_mapping(b, positions))


def random_kv(n, dtype, gen):
    return (torch.randn(n, HKV, D, generator=gen).to(dtype), torch.randn(n, HKV, D, generator=gen).to(dtype))


def assert_same_storage_unchanged(cache_before, cache_after, view, base):
    assert view.data_ptr() >= base.data_ptr() and view.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
    assert torch.equal(cache_before.nan_to_num(7.0), cache_after.nan_to_num(7.0)), "the op wrote into the cache"


def run_vllm(batch: VllmBatch, q, backend, table=None, levels=None):
    before = batch.kv_cache.clone()
    if levels is not None:
        out = forkdec.ops.cascade_attention(q, batch.k_cache, batch.v_cache, levels, return_lse=True,
                                            backend=backend)
    else:
        out = forkdec.ops.attention(q, batch.query_start_loc, batch.k_cache, batch.v_cache, table.kv_indptr,
                                    table.kv_indices, table.kv_last_page_len, causal=True, return_lse=True,
                                    backend=backend)
    assert_same_storage_unchanged(before, batch.kv_cache, batch.k_cache, batch.kv_cache)
    assert_same_storage_unchanged(before, batch.kv_cache, batch.v_cache, batch.kv_cache)
    return out


def check(out, ref, dtype):
    (o, lse), (ro, rlse) = out, ref
    assert o.dtype == dtype and o.shape == ro.shape
    torch.testing.assert_close(o.float(), ro.float(), rtol=tol(dtype), atol=tol(dtype))
    torch.testing.assert_close(lse, rlse, rtol=1e-4, atol=1e-4)


# (seq_lens, q_lens, block_size): chunked prefill with odd lengths, a one-token
# request, a sequence ending exactly on a block boundary; then pure decode.
VLLM_CASES = {
    "prefill": ([13, 1, 32, 7], [5, 1, 32, 7], 8),
    "prefill_bs16": ([37, 16, 3], [37, 2, 3], 16),
    "decode": ([9, 1, 24, 17, 33], [1, 1, 1, 1, 1], 8),
    "decode_bs1": ([5, 3, 1], [1, 1, 1], 1),
}


@pytest.mark.parametrize("case", list(VLLM_CASES))
@pytest.mark.parametrize("blocks_first", [False, True], ids=["kv_first", "blocks_first"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", backends())
def test_vllm_paged_cache(case, blocks_first, dtype, backend):
    seq_lens, q_lens, bs = VLLM_CASES[case]
    gen = torch.Generator().manual_seed(2 * list(VLLM_CASES).index(case) + blocks_first)
    batch = VllmBatch(seq_lens, q_lens, bs, dtype, gen, blocks_first=blocks_first)
    ks, vs = [], []
    for b, s in enumerate(seq_lens):
        k, v = random_kv(s, dtype, gen)
        batch.write(b, range(s), k, v)
        ks.append(k)
        vs.append(v)
    q = torch.randn(sum(q_lens), HQ, D, generator=gen).to(dtype)
    table = from_vllm_block_table(batch.block_table, batch.seq_lens, bs, num_blocks=batch.num_blocks)
    check(run_vllm(batch, q, backend, table=table), dense_expected(q, q_lens, ks, vs), dtype)


@pytest.mark.parametrize("decode", [True, False], ids=["decode", "prefill"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", backends())
def test_vllm_prefix_caching_as_a_cascade(decode, dtype, backend):
    """Requests whose block tables share their first blocks (vLLM's prefix caching): the shared
    blocks are read once for all queries (level 0), each request's own blocks in level 1."""
    bs, shared_blocks = 4, 3
    own = [5, 1, 9, 4]
    q_lens = [1] * len(own) if decode else [3, 1, 9, 2]
    seq_lens = [shared_blocks * bs + n for n in own]
    gen = torch.Generator().manual_seed(11 + decode)
    batch = VllmBatch(seq_lens, q_lens, bs, dtype, gen, blocks_first=True, shared_blocks=shared_blocks)
    prefix = random_kv(shared_blocks * bs, dtype, gen)
    batch.write(0, range(shared_blocks * bs), *prefix)  # once: every row points at these blocks
    ks, vs = [], []
    for b, n in enumerate(own):
        k, v = random_kv(n, dtype, gen)
        batch.write(b, range(shared_blocks * bs, seq_lens[b]), k, v)
        ks.append(k)
        vs.append(v)
    q = torch.randn(sum(q_lens), HQ, D, generator=gen).to(dtype)
    levels = vllm_cascade_levels(batch.block_table, batch.seq_lens, batch.query_start_loc, bs, shared_blocks * bs)
    assert levels[0].kv_indices.tolist() == batch.block_table[0, :shared_blocks].tolist()
    expected = dense_expected(q, q_lens, ks, vs, shared=prefix)
    check(run_vllm(batch, q, backend, levels=levels), expected, dtype)
    # The flat page table of the same batch gives the same result.
    table = from_vllm_block_table(batch.block_table, batch.seq_lens, bs)
    check(run_vllm(batch, q, backend, table=table), expected, dtype)


# (seq_lens, q_lens): SGLang extend (prefill after a cached prefix) and decode.
SGLANG_CASES = {"extend": ([11, 1, 6], [4, 1, 6]), "decode": ([7, 1, 20, 2], [1, 1, 1, 1])}


@pytest.mark.parametrize("case", list(SGLANG_CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", backends())
def test_sglang_token_level_cache(case, dtype, backend):
    seq_lens, q_lens = SGLANG_CASES[case]
    gen = torch.Generator().manual_seed(3 + len(case))
    pool_size, max_reqs, max_ctx = sum(seq_lens) + 5, 6, max(seq_lens) + 3
    k_buffer = torch.full((pool_size, HKV, D), float("nan"), dtype=dtype)
    v_buffer = torch.full_like(k_buffer, float("nan"))
    req_to_token = torch.randint(5000, 6000, (max_reqs, max_ctx), generator=gen, dtype=torch.int32)
    req_pool_indices = torch.randperm(max_reqs, generator=gen)[: len(seq_lens)].to(torch.int64)
    free = torch.randperm(pool_size, generator=gen).tolist()
    k_pages, v_pages = token_pool_as_pages(k_buffer), token_pool_as_pages(v_buffer)
    assert k_pages.data_ptr() == k_buffer.data_ptr() and k_pages.shape == (pool_size, 1, HKV, D)
    ks, vs = [], []
    for b, s in enumerate(seq_lens):
        slots = torch.tensor([free.pop() for _ in range(s)], dtype=torch.int32)
        req_to_token[req_pool_indices[b], :s] = slots
        k, v = random_kv(s, dtype, gen)
        forkdec.ops.append_kv(k_pages, v_pages, k, v, slots)  # SGLang's out_cache_loc are these slots
        ks.append(k)
        vs.append(v)
    q = torch.randn(sum(q_lens), HQ, D, generator=gen).to(dtype)
    qo = torch.zeros(len(seq_lens) + 1, dtype=torch.int32)
    qo[1:] = torch.tensor(q_lens).cumsum(0)
    table = from_sglang_req_to_token(req_to_token, req_pool_indices, torch.tensor(seq_lens), pool_size=pool_size)
    before = k_buffer.clone()
    out = forkdec.ops.attention(q, qo, k_pages, v_pages, table.kv_indptr, table.kv_indices, table.kv_last_page_len,
                                causal=True, return_lse=True, backend=backend)
    assert_same_storage_unchanged(before, k_buffer, k_pages, k_buffer)
    check(out, dense_expected(q, q_lens, ks, vs), dtype)


def test_empty_batches_and_requests_without_keys():
    table = from_vllm_block_table(torch.zeros(0, 4, dtype=torch.int32), torch.zeros(0, dtype=torch.int32), 16)
    assert table.kv_indptr.tolist() == [0] and table.kv_indices.numel() == 0 and table.kv_last_page_len.numel() == 0
    table = from_vllm_block_table(torch.tensor([[7, 9], [3, 4]], dtype=torch.int32), torch.tensor([0, 17]), 16)
    assert table.kv_indptr.tolist() == [0, 0, 2] and table.kv_indices.tolist() == [3, 4]
    assert table.kv_last_page_len.tolist() == [0, 1]
    table = from_sglang_req_to_token(torch.arange(12).view(3, 4), torch.tensor([2, 0]), torch.tensor([3, 0]))
    assert table.kv_indptr.tolist() == [0, 3, 3] and table.kv_indices.tolist() == [8, 9, 10]
    assert table.kv_last_page_len.tolist() == [1, 0] and table.kv_indices.dtype == torch.int32


def test_common_prefix_blocks_counts_shared_computed_blocks():
    table = torch.tensor([[4, 7, 9, 1], [4, 7, 9, 2], [4, 7, 3, 0]], dtype=torch.int32)
    qsl = torch.tensor([0, 1, 2, 3])
    assert common_prefix_blocks(table, torch.tensor([13, 14, 11]), qsl, 4) == 2  # rows part at block 2
    assert common_prefix_blocks(table[:2], torch.tensor([13, 14]), qsl[:3], 4) == 3
    # Request 0's queries start inside block 1: only block 0 is computed for everyone.
    assert common_prefix_blocks(table[:2], torch.tensor([13, 14]), torch.tensor([0, 8, 9]), 4) == 1
    assert common_prefix_blocks(table[:1], torch.tensor([13]), qsl[:2], 4) == 0  # one request: nothing to share


BT, SL = torch.tensor([[1, 2], [3, 4]], dtype=torch.int32), torch.tensor([5, 8])


@pytest.mark.parametrize("call, arg", [
    (lambda: from_vllm_block_table(BT, SL, 0), "block_size"),
    (lambda: from_vllm_block_table(BT.float(), SL, 4), "block_table"),
    (lambda: from_vllm_block_table(BT[0], SL, 4), "block_table"),
    (lambda: from_vllm_block_table(BT, SL[:1], 4), "seq_lens"),
    (lambda: from_vllm_block_table(BT, torch.tensor([5, 9]), 4), "seq_lens"),
    (lambda: from_vllm_block_table(BT, torch.tensor([-1, 3]), 4), "seq_lens"),
    (lambda: from_vllm_block_table(BT, SL, 4, num_blocks=4), "block_table"),
    (lambda: from_sglang_req_to_token(BT, torch.tensor([2]), torch.tensor([1])), "req_pool_indices"),
    (lambda: from_sglang_req_to_token(BT, torch.tensor([0.0]), torch.tensor([1])), "req_pool_indices"),
    (lambda: from_sglang_req_to_token(BT, torch.tensor([1]), torch.tensor([3])), "seq_lens"),
    (lambda: from_sglang_req_to_token(BT, torch.tensor([1]), torch.tensor([2]), pool_size=4), "req_to_token"),
    (lambda: token_pool_as_pages(torch.zeros(3, 4)), "buffer"),
    (lambda: vllm_cascade_levels(BT, SL, torch.tensor([0, 1, 2]), 4, 3), "common_prefix_len"),
    (lambda: vllm_cascade_levels(BT, SL, torch.tensor([0, 1, 2]), 4, 4), "block_table"),
    (lambda: vllm_cascade_levels(torch.tensor([[1, 2], [1, 4]]), SL, torch.tensor([0, 2, 4]), 4, 4),
     "common_prefix_len"),
])
def test_bad_input_names_the_argument(call, arg):
    with pytest.raises(ValueError, match=f"^{arg}:"):
        call()
