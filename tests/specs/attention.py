"""Harness specs for the attention ops: random forests (docs/attention.md)."""
from __future__ import annotations

import math

import torch

import forkdec
from forkdec import reference
from forkdec.ops.attention import BACKENDS
from forkdec.testing import random_forest
from harness import SPECS, Case, OpSpec

# (id, prompts, paths per prompt, max prompt len, max own len, max qo, page_size, hq, hkv, d, tree, triton-sized)
FORESTS = [
    ("decode_gqa3_p16", 2, 5, 300, 40, 1, 16, 9, 3, 64, False, True),
    ("decode_mha_p1", 1, 3, 70, 9, 1, 1, 4, 4, 32, False, True),
    ("prefill_gqa4_p64", 3, 2, 200, 100, 30, 64, 8, 2, 128, False, True),
    ("tree_gqa8_p16", 2, 3, 120, 40, 16, 16, 16, 2, 64, True, True),
    ("empty_prompt_and_paths", 3, 2, 0, 5, 2, 16, 6, 3, 96, False, True),
    ("big_forest", 8, 64, 3000, 24, 1, 16, 9, 3, 64, False, False),
    ("long_prompt_d256", 1, 4, 2900, 50, 4, 64, 4, 1, 256, True, False),
]


def _forest(dtype, g, prompts, paths, max_prompt, max_own, max_qo, page_size, hq, hkv, d, tree):
    prompt_lens = [int(torch.randint(0, max_prompt + 1, (1,), generator=g)) if max_prompt else 0
                   for _ in range(prompts)]
    own, qo = [], []
    for _ in range(prompts):
        n = int(torch.randint(1, paths + 1, (1,), generator=g))
        o = [int(torch.randint(0, max_own + 1, (1,), generator=g)) for _ in range(n)]
        own.append(o)
        qo.append([min(x, int(torch.randint(1, max_qo + 1, (1,), generator=g))) for x in o])
    return random_forest(prompt_lens, own, qo, page_size=page_size, hq=hq, hkv=hkv, d=d, dtype=dtype, tree=tree,
                         generator=g)


def _cascade_case(row):
    id, *params, triton = row

    def make(dtype, g):
        f = _forest(dtype, g, *params)
        return (f.q, f.k_cache, f.v_cache, f.levels), {"return_lse": True}
    return Case(id, make, triton)


def _attention_case(row, level):
    id, *params, triton = row

    def make(dtype, g):
        f = _forest(dtype, g, *params)
        lv = f.levels[level] if level is not None else f.flat
        q = f.q
        if id.startswith("decode_gqa3"):  # a non-contiguous q: every other row of a wider tensor
            q = torch.stack([q, torch.zeros_like(q)], 1).reshape(-1, *q.shape[1:])[::2]
        return ((q, lv.qo_indptr, f.k_cache, f.v_cache, lv.kv_indptr, lv.kv_indices, lv.kv_last_page_len),
                {"causal": lv.causal, "custom_mask": lv.custom_mask, "sm_scale": 0.2, "return_lse": True})
    return Case(f"{id}_{'flat' if level is None else f'level{level}'}", make, triton)


def compare_states(out, ref, dtype):
    (o, lse), (ro, rlse) = out, ref
    assert o.dtype == ro.dtype and o.shape == ro.shape and lse.dtype == torch.float32 and lse.shape == rlse.shape
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(o.float(), ro.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(lse, rlse, rtol=1e-4, atol=1e-4)


def _merge_case(id, t, n, h, d, empty_fraction, triton=True):
    def make(dtype, g):
        o = torch.randn(t, n + 1, h, d, generator=g).to(dtype)
        lse = torch.randn(t, n + 1, h, generator=g) * 5
        if id == "sliced":  # non-contiguous states: drop the first of n + 1
            o, lse = o[:, 1:], lse[:, 1:]
        else:
            o, lse = o[:, :n].contiguous(), lse[:, :n].contiguous()
        lse[torch.rand(t, n, h, generator=g) < empty_fraction] = -math.inf
        return (o, lse), {}
    return Case(id, make, triton)


MERGE_CASES = [_merge_case("t0", 0, 2, 3, 64, 0.0), _merge_case("t1_n1", 1, 1, 1, 32, 0.0),
               _merge_case("t7_n3", 7, 3, 9, 64, 0.3), _merge_case("t33_n2_all_empty", 33, 2, 4, 128, 1.0),
               _merge_case("sliced", 9, 4, 8, 96, 0.2)]


def _append_case(id, n, num_pages, page_size, hkv, d, triton=True):
    def make(dtype, g):
        k_cache = torch.randn(num_pages, page_size, hkv, d, generator=g).to(dtype)
        v_cache = torch.randn(num_pages, page_size, hkv, d, generator=g).to(dtype)
        slots = torch.randperm(num_pages * page_size, generator=g)[:n].to(torch.int32)
        k = torch.randn(2 * n, hkv, d, generator=g).to(dtype)[::2]  # non-contiguous rows
        v = torch.randn(n, hkv, d, generator=g).to(dtype)
        return (k_cache, v_cache, k, v, slots), {}
    return Case(id, make, triton)


def _append_op(k_cache, v_cache, k, v, slots, backend):
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    forkdec.ops.append_kv(k_cache, v_cache, k, v, slots, backend=backend)
    return k_cache, v_cache


def _append_ref(k_cache, v_cache, k, v, slots):
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    reference.append_kv(k_cache, v_cache, k, v, slots)
    return k_cache, v_cache


def _exact(out, ref, dtype):
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _merge_op(o, lse, backend):
    if o.shape[1] == 2 and o.shape[0] % 2:  # also run the two-state form on odd sizes
        return forkdec.ops.merge_state(o[:, 0], lse[:, 0], o[:, 1], lse[:, 1], backend=backend)
    return forkdec.ops.merge_states(o, lse, backend=backend)


def _merge_ref(o, lse):
    if o.shape[1] == 2 and o.shape[0] % 2:
        return reference.merge_state(o[:, 0], lse[:, 0], o[:, 1], lse[:, 1])
    return reference.merge_states(o, lse)


SPECS.extend([
    OpSpec("cascade_attention", forkdec.ops.cascade_attention, reference.cascade_attention, BACKENDS,
           [_cascade_case(r) for r in FORESTS], compare_states),
    OpSpec("attention", forkdec.ops.attention, reference.attention, BACKENDS,
           [_attention_case(r, lv) for r in FORESTS[:5] for lv in (0, 1, None)], compare_states),
    OpSpec("merge_states", _merge_op, _merge_ref, BACKENDS, MERGE_CASES, compare_states),
    OpSpec("append_kv", _append_op, _append_ref, BACKENDS,
           [_append_case("n0", 0, 2, 4, 1, 32), _append_case("n1_p1", 1, 5, 1, 3, 64),
            _append_case("n37_p16", 37, 4, 16, 3, 64), _append_case("n50_p64_d128", 50, 2, 64, 8, 128)], _exact),
])
