"""Harness specs for xquant_attention: random quantized X̂ page stores (docs/xquant.md)."""
from __future__ import annotations

import math

import torch

import forkdec
from forkdec import reference
from forkdec.ops.xquant import BACKENDS
from forkdec.xquant.pages import QuantizedPages
from harness import SPECS, Case, OpSpec


def rope_tables(max_pos: int, d: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    inv = base ** (-torch.arange(0, d, 2).float() / d)
    ang = torch.arange(max_pos).float()[:, None] * inv[None]
    return torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)


def _store(kind, num_pages, page_size, width, g):
    """A page store of random X: ("q", bits, group_size, axis) quantized, or ("f", dtype) float pages."""
    x = torch.randn(num_pages, page_size, width, generator=g)
    x[..., 3] *= 6  # an outlier channel, as real activations have
    if kind[0] == "f":
        return x.to(kind[1])
    _, bits, group_size, axis = kind
    pages = QuantizedPages.empty(num_pages, page_size, width, bits, group_size, axis)
    for p in range(num_pages):
        pages.write(p, x[p])
    return pages


def _page_table(lens, page_size, num_pages, g):
    needed = [math.ceil(n / page_size) for n in lens]
    assert sum(needed) <= num_pages
    indices = torch.randperm(num_pages, generator=g)[:sum(needed)].to(torch.int32)
    indptr = torch.tensor([0] + torch.tensor(needed, dtype=torch.int64).cumsum(0).tolist(), dtype=torch.int32)
    last = torch.tensor([(n - 1) % page_size + 1 if n else 0 for n in lens], dtype=torch.int32)
    return indptr, indices, last


# (id, kv lens, qo lens, page_size, hq, hkv, d, k store, v store ("same" = raw X), Wk, Wv,
#  causal, mask ("bool"/"packed"/None), bias, triton-sized)
CASES = [
    ("decode_gqa3_x4bit_channel", [128, 64, 0, 192], [1, 3, 2, 5], 64, 9, 3, 64, ("q", 4, 64, "channel"), "same",
     96, 96, False, None, True, True),
    ("prefill_causal_token3", [50, 7, 33], [5, 7, 1], 16, 4, 2, 32, ("q", 3, 32, "token"), "same", 64, 64, True,
     None, False, True),
    ("latent_sep_kv_2bit_8bit", [96, 64], [2, 1], 32, 6, 2, 32, ("q", 2, 32, "channel"), ("q", 8, 32, "token"),
     64, 96, False, None, True, True),
    ("packed_mask_p1", [9, 0, 5], [3, 2, 2], 1, 4, 4, 32, ("f", torch.float32), "same", 48, 48, False, "packed",
     False, True),
    ("bool_mask_causal_f16_window", [40, 17], [4, 3], 16, 8, 2, 64, ("f", torch.float16), ("f", torch.bfloat16),
     37, 53, True, "bool", True, True),
    ("many_queries_shared_prompt", [256], [70], 64, 9, 3, 64, ("q", 4, 64, "channel"), "same", 128, 128, False,
     None, False, False),
    ("wide_heads_d128", [320, 64], [2, 1], 64, 4, 1, 128, ("q", 4, 128, "token"), ("q", 4, 64, "channel"), 128, 64,
     False, None, True, False),
    ("empty_batch_rows", [0, 0], [2, 0], 16, 2, 1, 32, ("q", 4, 32, "token"), "same", 32, 32, True, None, False,
     True),
]


def _case(row):
    (id, lens, qo, page_size, hq, hkv, d, kstore, vstore, wk_w, wv_w, causal, mask, bias, triton) = row

    def make(dtype, g):
        num_pages = sum(math.ceil(n / page_size) for n in lens) + 2
        xk = _store(kstore, num_pages, page_size, wk_w, g)
        xv = xk if vstore == "same" else _store(vstore, num_pages, page_size, wv_w, g)
        indptr, indices, last = _page_table(lens, page_size, num_pages, g)
        qo_indptr = torch.tensor([0] + torch.tensor(qo).cumsum(0).tolist(), dtype=torch.int32)
        # A non-contiguous q: every other row of a wider tensor.
        q = torch.randn(2 * int(qo_indptr[-1]), hq, d, generator=g).to(dtype)[::2]
        wk = torch.randn(wk_w, hkv * d, generator=g) / math.sqrt(wk_w)
        wv = torch.randn(wv_w, hkv * d, generator=g) / math.sqrt(wv_w)
        start = torch.randint(0, 40, (len(lens),), generator=g, dtype=torch.int32)
        cos, sin = rope_tables(int(start.max()) + max(lens) + 1, d)
        kwargs = {"causal": causal, "sm_scale": 0.3, "return_lse": True}
        if bias:
            kwargs["bk"] = torch.randn(hkv * d, generator=g)
            kwargs["bv"] = torch.randn(hkv * d, generator=g)
        if mask is not None:
            m = torch.rand(sum(a * b for a, b in zip(qo, lens)), generator=g) < 0.6
            if mask == "packed":
                pad = torch.zeros((-m.numel()) % 8, dtype=torch.bool)
                bits = torch.cat([m, pad]).reshape(-1, 8).to(torch.uint8)
                m = (bits << torch.arange(8, dtype=torch.uint8)).sum(-1, dtype=torch.uint8)
            kwargs["custom_mask"] = m
        return (q, qo_indptr, xk, xv, indptr, indices, last, start, wk, wv, cos, sin), kwargs
    return Case(id, make, triton)


def compare_states(out, ref, dtype):
    (o, lse), (ro, rlse) = out, ref
    assert o.dtype == ro.dtype and o.shape == ro.shape and lse.dtype == torch.float32 and lse.shape == rlse.shape
    # K and V come out of GEMMs up to 128 wide in a different summation order.
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(o.float(), ro.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(lse, rlse, rtol=1e-4, atol=2e-4)


SPECS.append(OpSpec("xquant_attention", forkdec.ops.xquant_attention, reference.xquant_attention, BACKENDS,
                    [_case(r) for r in CASES], compare_states))
