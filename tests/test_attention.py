"""Attention ops: semantics of the reference (checked against dense SDPA), cascade
equals flat attention over the union of keys, state merging, bad input."""
import math

import pytest
import torch
import torch.nn.functional as F

import forkdec
from forkdec.ops.attention import CascadeLevel
from forkdec.reference.attention import PageTable, unpack_mask
from forkdec.testing import random_forest


def _dense(q, level, k_cache, v_cache, scale):
    """Per request: SDPA over the gathered keys plus an explicit logsumexp."""
    table = PageTable(level.kv_indptr, level.kv_indices, level.kv_last_page_len)
    out = torch.zeros(q.shape, dtype=torch.float32)
    lse = torch.full(q.shape[:2], -math.inf)
    mask = None if level.custom_mask is None else unpack_mask(level.custom_mask, 1 << 40)
    offset = 0
    for b in range(level.qo_indptr.numel() - 1):
        q0, q1 = int(level.qo_indptr[b]), int(level.qo_indptr[b + 1])
        k, v = table.gather(k_cache, b).float(), table.gather(v_cache, b).float()
        qo, kv = q1 - q0, k.shape[0]
        allowed = torch.ones(qo, kv, dtype=torch.bool)
        if level.causal:
            allowed = torch.ones(qo, kv, dtype=torch.bool).tril(kv - qo)
        if mask is not None:
            allowed &= mask[offset:offset + qo * kv].reshape(qo, kv)
            offset += qo * kv
        if qo == 0 or kv == 0:
            continue
        rep = q.shape[1] // k.shape[1]
        qh = q[q0:q1].float().transpose(0, 1)                       # [H, qo, D]
        kh = k.repeat_interleave(rep, 1).transpose(0, 1)
        vh = v.repeat_interleave(rep, 1).transpose(0, 1)
        seen = allowed.any(-1)
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=allowed, scale=scale)
        out[q0:q1] = torch.where(seen[None, :, None], o, 0).transpose(0, 1)
        s = (qh @ kh.transpose(1, 2) * scale).masked_fill(~allowed, -math.inf)
        lse[q0:q1] = torch.logsumexp(s, -1).transpose(0, 1)
    return out, lse


@pytest.mark.parametrize("tree", [False, True])
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("hq,hkv,d", [(4, 4, 32), (9, 3, 64), (8, 1, 128)])
def test_reference_attention_matches_dense_sdpa(tree, page_size, hq, hkv, d):
    g = torch.Generator().manual_seed(0)
    f = random_forest([37, 0, 5], [[9, 4], [3], [6, 0, 2]], [[3, 1], [3], [2, 0, 2]], page_size=page_size,
                      hq=hq, hkv=hkv, d=d, tree=tree, generator=g)
    scale = 0.3
    for level in f.levels + [f.flat]:
        out, lse = forkdec.ops.attention(f.q, level.qo_indptr, f.k_cache, f.v_cache, level.kv_indptr,
                                         level.kv_indices, level.kv_last_page_len, causal=level.causal,
                                         custom_mask=level.custom_mask, sm_scale=scale, return_lse=True)
        want_out, want_lse = _dense(f.q, level, f.k_cache, f.v_cache, scale)
        torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tree", [False, True])
def test_cascade_equals_flat_attention_over_the_union(tree):
    g = torch.Generator().manual_seed(1)
    f = random_forest([50, 17], [[4, 7, 1], [5, 5]], [[1, 3, 1], [2, 5]], page_size=16, tree=tree, generator=g)
    out, lse = forkdec.ops.cascade_attention(f.q, f.k_cache, f.v_cache, f.levels, return_lse=True)
    fl = f.flat
    want_out, want_lse = forkdec.ops.attention(f.q, fl.qo_indptr, f.k_cache, f.v_cache, fl.kv_indptr, fl.kv_indices,
                                               fl.kv_last_page_len, causal=fl.causal, custom_mask=fl.custom_mask,
                                               return_lse=True)
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-5)


def test_packed_mask_equals_bool_mask():
    g = torch.Generator().manual_seed(2)
    f = random_forest([3], [[11, 6]], [[5, 6]], page_size=4, tree=True, generator=g)
    lv = f.levels[1]
    bits = lv.custom_mask.to(torch.uint8)
    pad = (-bits.numel()) % 8
    packed = (torch.cat([bits, bits.new_zeros(pad)]).reshape(-1, 8) << torch.arange(8, dtype=torch.uint8)).sum(
        -1, dtype=torch.uint8)
    args = (f.q, lv.qo_indptr, f.k_cache, f.v_cache, lv.kv_indptr, lv.kv_indices, lv.kv_last_page_len)
    torch.testing.assert_close(forkdec.ops.attention(*args, custom_mask=packed),
                               forkdec.ops.attention(*args, custom_mask=lv.custom_mask), rtol=0, atol=0)


def test_merge_state_with_empty_sides():
    g = torch.Generator().manual_seed(3)
    o = torch.randn(5, 2, 8, generator=g)
    lse = torch.randn(5, 2, generator=g)
    empty_o, empty_lse = torch.zeros_like(o), torch.full_like(lse, -math.inf)
    mo, ml = forkdec.ops.merge_state(o, lse, empty_o, empty_lse)
    torch.testing.assert_close(mo, o)
    torch.testing.assert_close(ml, lse)
    mo, ml = forkdec.ops.merge_state(empty_o, empty_lse, empty_o, empty_lse)
    assert (mo == 0).all() and (ml == -math.inf).all()


def test_merge_states_equals_attention_over_split_keys():
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(3, 2, 16, generator=g) for _ in range(3))
    scale = 0.25
    s = torch.einsum("qhd,khd->qhk", q, k) * scale
    parts = [(0, 1), (1, 3)]
    outs, lses = [], []
    for a, b in parts:
        sp = s[..., a:b]
        lses.append(torch.logsumexp(sp, -1))
        outs.append(torch.einsum("qhk,khd->qhd", torch.softmax(sp, -1), v[a:b]))
    mo, ml = forkdec.ops.merge_states(torch.stack(outs, 1), torch.stack(lses, 1))
    torch.testing.assert_close(mo, torch.einsum("qhk,khd->qhd", torch.softmax(s, -1), v))
    torch.testing.assert_close(ml, torch.logsumexp(s, -1))


def test_append_kv_writes_the_slots():
    k_cache = torch.zeros(3, 4, 2, 32)
    v_cache = torch.zeros(3, 4, 2, 32)
    k, v = torch.randn(2, 2, 32), torch.randn(2, 2, 32)
    forkdec.ops.append_kv(k_cache, v_cache, k, v, torch.tensor([9, 2]))
    torch.testing.assert_close(k_cache[2, 1], k[0])
    torch.testing.assert_close(v_cache[0, 2], v[1])
    assert int((k_cache != 0).any(-1).any(-1).sum()) == 2
    with pytest.raises(ValueError, match="^slots: "):
        forkdec.ops.append_kv(k_cache, v_cache, k, v, torch.tensor([12, 0]))


def _good():
    f = random_forest([5], [[3]], [[2]], page_size=4, generator=torch.Generator().manual_seed(5))
    lv = f.levels[1]
    return dict(q=f.q, qo_indptr=lv.qo_indptr, k_cache=f.k_cache, v_cache=f.v_cache, kv_indptr=lv.kv_indptr,
                kv_indices=lv.kv_indices, kv_last_page_len=lv.kv_last_page_len)


BAD = [
    ("q", lambda a: dict(a, q=a["q"][:, :4])),                              # 4 % 3 != 0
    ("q", lambda a: dict(a, q=torch.randn(2, 9, 48), k_cache=torch.randn(4, 4, 3, 48),
                         v_cache=torch.randn(4, 4, 3, 48))),                # head dim 48
    ("k_cache", lambda a: dict(a, k_cache=a["k_cache"].half(), v_cache=a["v_cache"].half())),
    ("qo_indptr", lambda a: dict(a, qo_indptr=torch.tensor([0, 5], dtype=torch.int32))),
    ("qo_indptr", lambda a: dict(a, qo_indptr=torch.tensor([1, 2], dtype=torch.int32))),
    ("kv_indptr", lambda a: dict(a, kv_indptr=torch.tensor([0, 9], dtype=torch.int32))),
    ("kv_indptr", lambda a: dict(a, kv_indptr=torch.tensor([0, 1, 0], dtype=torch.int32))),
    ("kv_indices", lambda a: dict(a, kv_indices=a["kv_indices"] + 100)),
    ("kv_last_page_len", lambda a: dict(a, kv_last_page_len=torch.tensor([5], dtype=torch.int32))),
    ("kv_last_page_len", lambda a: dict(a, kv_last_page_len=torch.tensor([0], dtype=torch.int32))),
    ("custom_mask", lambda a: dict(a, custom_mask=torch.ones(5, dtype=torch.bool))),
    ("custom_mask", lambda a: dict(a, custom_mask=torch.ones(5, dtype=torch.uint8))),
    ("sm_scale", lambda a: dict(a, sm_scale=-1.0)),
]


@pytest.mark.parametrize("arg,mutate", BAD, ids=[f"{a}-{i}" for i, (a, _) in enumerate(BAD)])
def test_bad_input_names_the_argument(arg, mutate):
    with pytest.raises(ValueError, match=f"^{arg}: "):
        forkdec.ops.attention(**mutate(_good()))


def test_cascade_rejects_an_empty_level_list_and_names_the_level():
    a = _good()
    with pytest.raises(ValueError, match="^levels: "):
        forkdec.ops.cascade_attention(a["q"], a["k_cache"], a["v_cache"], [])
    bad = CascadeLevel(a["qo_indptr"], a["kv_indptr"], a["kv_indices"] + 100, a["kv_last_page_len"])
    with pytest.raises(ValueError, match=r"^levels\[0\]\.kv_indices: "):
        forkdec.ops.cascade_attention(a["q"], a["k_cache"], a["v_cache"], [bad])
