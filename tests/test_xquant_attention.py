"""XQuant attention equals attention over K and V rematerialized from the same X̂,
computed here independently (complex-number RoPE, dense K/V in a paged cache)."""
import math

import pytest
import torch

import forkdec
from forkdec.xquant.pages import QuantizedPages

HQ, HKV, D, W = 6, 2, 32, 64


def _rope_tables(max_pos, d, base=10000.0):
    inv = base ** (-torch.arange(0, d, 2).float() / d)
    ang = torch.arange(max_pos).float()[:, None] * inv[None]
    return torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)


def _rope_complex(x, pos, base=10000.0):
    """RoPE as a complex rotation of (x[:D/2], x[D/2:]) pairs: an independent formulation."""
    d = x.shape[-1]
    inv = base ** (-torch.arange(0, d, 2).float() / d)
    z = torch.complex(x[..., : d // 2], x[..., d // 2:]) * torch.polar(torch.ones_like(inv), pos[:, None] * inv)[:, None]
    return torch.cat([z.real, z.imag], -1)


def _setup(bits, axis, lens, page_size=32, group_size=32, seed=0, start=None):
    g = torch.Generator().manual_seed(seed)
    pages_needed = [math.ceil(n / page_size) for n in lens]
    num_pages = sum(pages_needed) + 2
    perm = torch.randperm(num_pages, generator=g)
    x_all = torch.randn(num_pages, page_size, W, generator=g)
    xq = QuantizedPages.empty(num_pages, page_size, W, bits, group_size, axis)
    for p in range(num_pages):
        xq.write(p, x_all[p])
    indptr = torch.tensor([0] + list(torch.tensor(pages_needed).cumsum(0)), dtype=torch.int32)
    indices = perm[: int(indptr[-1])].to(torch.int32)
    last = torch.tensor([(n - 1) % page_size + 1 if n else 0 for n in lens], dtype=torch.int32)
    start = torch.tensor(start or [3 * i for i in range(len(lens))], dtype=torch.int32)
    wk, wv = torch.randn(W, HKV * D, generator=g) / 8, torch.randn(W, HKV * D, generator=g) / 8
    return xq, indptr, indices, last, start, wk, wv, g


def _expected(q, qo_indptr, xq, indptr, indices, last, start, wk, wv, bk, bv, causal, mask):
    """Dense K/V from dequantized X̂ into an ordinary paged cache, then forkdec.ops.attention."""
    deq = xq.read(torch.arange(xq.num_pages))                           # [P, page, W]
    k = (deq @ wk + (0 if bk is None else bk)).reshape(xq.num_pages, xq.page_size, HKV, D)
    v = (deq @ wv + (0 if bv is None else bv)).reshape(xq.num_pages, xq.page_size, HKV, D)
    # RoPE at each request's positions, page by page, into the request's own copy of its pages.
    kc, vc, new_idx = [k.new_zeros(0, xq.page_size, HKV, D)], [v.new_zeros(0, xq.page_size, HKV, D)], []
    n = 0
    for b in range(indptr.numel() - 1):
        for j, p in enumerate(indices[int(indptr[b]):int(indptr[b + 1])].tolist()):
            pos = int(start[b]) + j * xq.page_size + torch.arange(xq.page_size).float()
            kc.append(_rope_complex(k[p], pos)[None]), vc.append(v[p][None])
            new_idx.append(n)
            n += 1
    kc, vc = torch.cat(kc), torch.cat(vc)
    return forkdec.ops.attention(q, qo_indptr, kc, vc, indptr, torch.tensor(new_idx, dtype=torch.int32), last,
                                 causal=causal, custom_mask=mask, return_lse=True, backend="reference")


@pytest.mark.parametrize("bits,axis", [(4, "token"), (3, "channel"), (8, "token"), (2, "channel")])
@pytest.mark.parametrize("causal", [False, True])
def test_matches_attention_over_rematerialized_kv(bits, axis, causal):
    lens = [64, 96, 0, 32] if axis == "channel" else [50, 7, 0, 33]
    xq, indptr, indices, last, start, wk, wv, g = _setup(bits, axis, lens)
    qo = [min(3, n) if causal else 3 for n in lens]
    qo_indptr = torch.tensor([0] + list(torch.tensor(qo).cumsum(0)), dtype=torch.int32)
    q = torch.randn(int(qo_indptr[-1]), HQ, D, generator=g)
    bk, bv = torch.randn(HKV * D, generator=g), torch.randn(HKV * D, generator=g)
    cos, sin = _rope_tables(512, D)
    out, lse = forkdec.ops.xquant_attention(q, qo_indptr, xq, xq, indptr, indices, last, start, wk, wv, cos, sin,
                                            bk=bk, bv=bv, causal=causal, return_lse=True)
    want, want_lse = _expected(q, qo_indptr, xq, indptr, indices, last, start, wk, wv, bk, bv, causal, None)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lse, want_lse, rtol=1e-4, atol=1e-4)


def test_as_a_cascade_level_with_a_full_precision_window():
    """Quantized prompt pages as one level, full-precision X pages as another, merged by LSE,
    equal one attention over all the rematerialized keys."""
    xq, indptr, indices, last, start, wk, wv, g = _setup(4, "channel", [64], start=[0])
    window = torch.randn(2, 32, W, generator=g)                  # 40 newest tokens at positions 64..103
    q = torch.randn(5, HQ, D, generator=g)
    cos, sin = _rope_tables(256, D)
    qo = torch.tensor([0, 5], dtype=torch.int32)
    o1, l1 = forkdec.ops.xquant_attention(q, qo, xq, xq, indptr, indices, last, start, wk, wv, cos, sin,
                                          return_lse=True)
    wi = torch.tensor([0, 2], dtype=torch.int32)
    o2, l2 = forkdec.ops.xquant_attention(q, qo, window, window, wi, torch.tensor([1, 0], dtype=torch.int32),
                                          torch.tensor([8], dtype=torch.int32), torch.tensor([64], dtype=torch.int32),
                                          wk, wv, cos, sin, causal=True, return_lse=True)
    out, lse = forkdec.ops.merge_state(o1, l1, o2, l2)
    x = torch.cat([xq.read(indices).reshape(-1, W), window[1], window[0, :8]])  # [104, W] in token order
    k = _rope_complex((x @ wk).reshape(-1, HKV, D), torch.arange(104).float())
    v = (x @ wv).reshape(-1, HKV, D)
    want, want_lse = forkdec.ops.attention(q, qo, k[None], v[None], torch.tensor([0, 1], dtype=torch.int32),
                                           torch.tensor([0], dtype=torch.int32), torch.tensor([104], dtype=torch.int32),
                                           causal=True, return_lse=True, backend="reference")
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lse, want_lse, rtol=1e-4, atol=1e-4)


def test_bad_input_names_the_argument():
    xq, indptr, indices, last, start, wk, wv, g = _setup(4, "channel", [64])
    cos, sin = _rope_tables(128, D)
    q = torch.randn(1, HQ, D)
    qo = torch.tensor([0, 1], dtype=torch.int32)
    args = [q, qo, xq, xq, indptr, indices, last, start, wk, wv, cos, sin]

    def call(**over):
        a = list(args)
        for i, name in enumerate(["q", "qo_indptr", "xk_pages", "xv_pages", "kv_indptr", "kv_indices",
                                  "kv_last_page_len", "kv_start_pos", "wk", "wv", "rope_cos", "rope_sin"]):
            a[i] = over.get(name, a[i])
        return forkdec.ops.xquant_attention(*a)

    for over, name in [(dict(wk=wk[:-1]), "wk"), (dict(wv=wv[:, :-1]), "wv"), (dict(q=torch.randn(1, 5, D)), "q"),
                       (dict(kv_start_pos=torch.tensor([100])), "kv_start_pos"),
                       (dict(kv_indices=indices + 50), "kv_indices"),
                       (dict(kv_last_page_len=torch.tensor([7], dtype=torch.int32)), "kv_last_page_len"),
                       (dict(rope_cos=cos[:, :-2]), "rope_cos")]:
        with pytest.raises(ValueError, match=name):
            call(**over)
    with pytest.raises(ValueError, match="page_size"):
        QuantizedPages.empty(4, 48, W, 4, 32, "channel")
