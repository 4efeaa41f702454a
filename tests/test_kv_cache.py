"""QuantizedKVCache against an independent reconstruction of what it must hold.

A tiny random LlamaModel supplies the weights. One sequence is fed in uneven
chunks; at every layer of every step the cache's attention must equal
reference attention over K and V rebuilt here from the same inputs: the
oldest whole pages quantized (fp16-rounded values, quantize/dequantize), the
rest (the window, at least R tokens) rounded to fp16, per family's rule.
"""
from __future__ import annotations

import pytest
import torch

from forkdec import reference
from forkdec.cache import make_attend, make_kv_cache
from forkdec.cache import StepBatch
from forkdec.models.config import ModelConfig
from forkdec.models.llama import LlamaModel, _rotate
from forkdec.ops import CascadeLevel
from forkdec.xquant import dequantize, latent_factors, quantize
from forkdec.xquant.accounting import bytes_held
from forkdec.xquant.calibration import ATTR, calibrated_factors
from forkdec.xquant.kinds import parse_kind

CFG = ModelConfig("llama", vocab_size=64, hidden_size=128, intermediate_size=96, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=32, max_position_embeddings=1024)
CHUNKS = [50, 50, 70, 1, 1, 64, 30]


def tiny_model(seed: int = 0, bias: bool = False, vocab_size: int = 64) -> LlamaModel:
    cfg = ModelConfig(**{**CFG.__dict__, "attention_bias": bias, "vocab_size": vocab_size})
    m = LlamaModel(cfg)
    g = torch.Generator().manual_seed(seed)
    for p in m.parameters():
        p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if p.dim() == 1 and p.shape[0] == 128 else 0.0))
    return m


def fake_q(qt_input: torch.Tensor, bits: int, group: int, axis: str) -> torch.Tensor:
    """Quantize-dequantize page by page (64-token pages), as the cache stores flushed pages."""
    out = []
    for page in qt_input.split(64):
        out.append(dequantize(quantize(page, bits, group, axis)))
    return torch.cat(out) if out else qt_input


def expected_kv(kind, model, layer, xs, residuals, ks, vs, nq, positions):
    """K, V [n, Hkv, D] fp32 the cache must attend over: tokens < nq quantized, the rest fp16-rounded."""
    hkv, d, hq = CFG.num_kv_heads, CFG.head_dim, CFG.num_heads
    lay = model.layers[layer]
    wk = lay.qkv[hq * d:(hq + hkv) * d].t().float()
    wv = lay.qkv[(hq + hkv) * d:].t().float()
    bk = 0 if lay.qkv_bias is None else lay.qkv_bias[hq * d:(hq + hkv) * d].float()
    bv = 0 if lay.qkv_bias is None else lay.qkv_bias[(hq + hkv) * d:].float()
    r16 = lambda t: t.half().float()  # noqa: E731  the window's storage rounding
    cos, sin = (t[:, None, :] for t in model._rope_angles(positions))  # fp32 [T, 1, D/2]

    def keys(x, w, b):
        return _rotate((x @ w + b).view(-1, hkv, d), cos.float(), sin.float())

    b, g = kind.bits, kind.group_size
    if kind.family == "kivi":
        k, v = r16(ks[layer].reshape(-1, hkv * d)), r16(vs[layer].reshape(-1, hkv * d))
        k = torch.cat([fake_q(k[:nq], b, g, "channel"), k[nq:]])
        v = torch.cat([fake_q(v[:nq], b, g, "token"), v[nq:]])
        return k.view(-1, hkv, d), v.view(-1, hkv, d)
    if kind.family == "xquant":
        x = r16(xs[layer])
        x = torch.cat([fake_q(x[:nq], b, g, "channel"), x[nq:]])
        return keys(x, wk, bk), (x @ wv + bv).view(-1, hkv, d)
    if kind.family == "xquant-latent":
        (dk, uk), (dv, uv) = latent_factors(wk), latent_factors(wv)
        if kind.calibrated:  # factors from the stored moments (checked on their own in test_kv_calibration)
            m = getattr(lay, ATTR)
            (dk, uk), (dv, uv) = calibrated_factors(wk, kind.rank, m), calibrated_factors(wv, kind.rank_v, m)
        elif kind.rank:  # truncated: the top-R singular directions (latent_factors sorts them descending)
            r, rv = kind.rank, kind.rank_v
            assert float(uk.norm(dim=1)[r - 1]) >= float(uk.norm(dim=1)[r])
            dk, uk, dv, uv = dk[:, :r], uk[:r], dv[:, :rv], uv[:rv]
        sk, sv = uk.norm(dim=1), uv.norm(dim=1)  # the cache caches X·U·Σ and maps back with Bᵀ
        dk, uk, dv, uv = dk * sk, uk / sk[:, None], dv * sv, uv / sv[:, None]
        lk, lv = r16(xs[layer].float() @ dk), r16(xs[layer].float() @ dv)
        lk = torch.cat([fake_q(lk[:nq], b, g, "channel"), lk[nq:]])
        lv = torch.cat([fake_q(lv[:nq], b, g, "token"), lv[nq:]])
        return keys(lk, uk, bk), (lv @ uv + bv).view(-1, hkv, d)
    # xquant-cl: closed loop over layers on the unit-RMS residual stream, X = norm weight * it
    unit = [r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + CFG.rms_norm_eps) for r in residuals]
    acc = None
    for j in range(layer + 1):
        u = r16(unit[j][:nq])
        delta = u if acc is None else u - acc
        deq = fake_q(delta, b, g, "channel")
        acc = deq if acc is None else acc + deq
    x = lay.attn_norm.float() * torch.cat([acc, r16(unit[layer][nq:])])
    return keys(x, wk, bk), (x @ wv + bv).view(-1, hkv, d)


def drive(kind_name: str, bias: bool = False, model: LlamaModel | None = None):
    """Feed CHUNKS through a cache of kind_name (over `model`, default tiny_model(bias=bias)),
    checking every layer of every step."""
    kind = parse_kind(kind_name)
    model = tiny_model(bias=bias) if model is None else model
    g = torch.Generator().manual_seed(1)
    n = sum(CHUNKS)
    L, h, hq, hkv, d = CFG.num_layers, CFG.hidden_size, CFG.num_heads, CFG.num_kv_heads, CFG.head_dim
    xs = [torch.randn(n, h, generator=g) for _ in range(L)]
    residuals = [torch.randn(n, h, generator=g) * 3 for _ in range(L)]
    ks = [torch.randn(n, hkv, d, generator=g) for _ in range(L)]
    vs = [torch.randn(n, hkv, d, generator=g) for _ in range(L)]
    cache = make_kv_cache(kind_name, model, 16)
    p = cache.page_size
    alloc = cache.allocator
    assert alloc.reserve(8)
    pages = [alloc.alloc() for _ in range(8)][::-1]  # not in order: page ids must not matter
    table = torch.tensor(pages, dtype=torch.int32)
    start, nq = 0, 0
    for c in CHUNKS:
        end = start + c
        pos = torch.arange(start, end)
        used = -(-end // p)
        level = CascadeLevel(torch.tensor([0, c], dtype=torch.int32), torch.tensor([0, used], dtype=torch.int32),
                             table[:used], torch.tensor([end - (used - 1) * p], dtype=torch.int32), causal=True)
        batch = StepBatch(torch.zeros(c, dtype=torch.int64), pos, table.long()[pos // p] * p + pos % p, [level])
        attend = make_attend(batch, cache, prefill=True, backend="reference")
        assert attend.needs_layer_input
        for layer in range(L):
            q = torch.randn(c, hq, d, generator=g)
            out = attend(layer, q, ks[layer][start:end], vs[layer][start:end], x=xs[layer][start:end],
                         residual=residuals[layer][start:end])
            k, v = expected_kv(kind, model, layer, [t[:end] for t in xs], [t[:end] for t in residuals],
                               [t[:end] for t in ks], [t[:end] for t in vs], nq, torch.arange(end))
            # KIVI attends in the window's dtype, as the fp16 kind does: q and the output round to fp16
            qw = q.half().float() if kind.family == "kivi" else q
            want = reference.attention(qw, torch.tensor([0, c], dtype=torch.int32), k.unsqueeze(1), v.unsqueeze(1),
                                       torch.tensor([0, end], dtype=torch.int32),
                                       torch.arange(end, dtype=torch.int32), torch.tensor([1], dtype=torch.int32),
                                       causal=True)
            tol = 2e-3 if kind.family == "kivi" else 2e-4
            torch.testing.assert_close(out, want, atol=tol, rtol=tol)
        fp = end - nq
        while fp >= kind.residual + p:  # the flush rule, restated
            nq, fp = nq + p, fp - p
        assert int(cache.quant.sum()) == nq // p
        # memory held equals the accounting formula for one sequence of `end` tokens
        assert cache.bytes_used == bytes_held(kind, CFG, end, model_dtype=torch.float32)
        start = end
    alloc.free(pages)
    assert cache.bytes_used == 0 and not bool(cache.quant.any())
    return nq


@pytest.mark.parametrize("kind", ["xquant-4-r64", "xquant-8-r0", "xquant-latent-3-g32-r64", "xquant-latent-2-r0",
                                  "xquant-latent-3-k32-g32-r64", "xquant-latent-2-k21-v32-g32-r0",
                                  "xquant-cl-2-r0", "xquant-cl-4-g32-r64", "kivi-2-r64", "kivi-4-g32-r0"])
def test_cache_attends_over_what_it_must_hold(kind):
    assert drive(kind) > 0  # some pages were quantized


def test_qkv_bias_is_applied():
    drive("xquant-latent-4-r0", bias=True)


def test_window_keeps_at_least_r_tokens():
    # R = 128 with 64-token pages: nothing is flushed before 192 tokens
    kind = parse_kind("kivi-4")
    assert drive("kivi-4") == sum(CHUNKS) - kind.residual - (sum(CHUNKS) - kind.residual) % 64


def test_weights_of_the_wrong_shape_name_model():
    model = tiny_model()
    model.layers[1].qkv = torch.nn.Parameter(torch.zeros(10, 128), requires_grad=False)
    with pytest.raises(ValueError, match=r"^model: "):
        make_kv_cache("xquant-4", model, 4)


def test_group_not_dividing_the_width_names_kv():
    with pytest.raises(ValueError, match=r"^kv: "):
        make_kv_cache("xquant-latent-4-g128", tiny_model(), 4)  # latent V: 64 channels per token


def test_quantized_page_cannot_take_new_tokens():
    cache = make_kv_cache("kivi-4-r0", tiny_model(), 4)
    cache.allocator.reserve(1)
    page = cache.allocator.alloc()
    cache.quant[page] = True
    level = CascadeLevel(torch.tensor([0, 1], dtype=torch.int32), torch.tensor([0, 1], dtype=torch.int32),
                         torch.tensor([page], dtype=torch.int32), torch.tensor([1], dtype=torch.int32), causal=True)
    batch = StepBatch(torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64),
                      torch.tensor([page * 64]), [level])
    with pytest.raises(ValueError, match=r"^slots: "):
        make_attend(batch, cache, prefill=False)


@pytest.mark.parametrize("cap, sizes", [(None, [4, 4, 4, 4, 8, 8, 8]), (5, [4, 4, 4, 4, 5, 6, 7])])
def test_window_pool_doubles_up_to_its_cap_then_grows_a_slot_at_a_time(cap, sizes):
    cache = make_kv_cache("kivi-4-r0", tiny_model(), 8, max_window_slots=cap)
    grown = []
    for _ in sizes:
        cache._slot()
        grown.append(next(iter(cache.fp.values())).shape[1])
    assert grown == sizes


def test_window_pool_cap_below_one_names_max_window_slots():
    with pytest.raises(ValueError, match=r"^max_window_slots: "):
        make_kv_cache("kivi-4-r0", tiny_model(), 8, max_window_slots=0)


def test_truncated_rank_approximates_k_and_v():
    # rank 32 of 64: K, V are the best rank-32 approximations, so the latents are half as wide and
    # the projection error is exactly the dropped singular values' energy (Eckart-Young)
    from forkdec.xquant.weights import layer_weights
    model, kind = tiny_model(), parse_kind("xquant-latent-8-k32-g32")
    w = layer_weights(kind, model.layers[0], CFG)
    assert tuple(w.down_k.shape) == (128, 32) and tuple(w.wk.shape) == (32, 64)
    hq, hkv, d = CFG.num_heads, CFG.num_kv_heads, CFG.head_dim
    wk = model.layers[0].qkv[hq * d:(hq + hkv) * d].t().float()
    s = torch.linalg.svdvals(wk.double())
    err = (w.down_k.double() @ w.wk.double() - wk.double()).norm()
    assert float(err) == pytest.approx(float(s[32:].norm()), rel=1e-4)
    assert float(err) > 0.1 * float(s.norm())  # a real approximation on random weights, not exact
