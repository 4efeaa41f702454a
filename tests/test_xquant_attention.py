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


# ---- the cpu backend (C++ kernel) ----------------------------------------------------------------

from forkdec.backends import unavailable_reason  # noqa: E402
from forkdec.ops.xquant import page_args  # noqa: E402

CPU_REASON = unavailable_reason("cpu", "xquant_attention", torch.device("cpu"))
needs_cpu = pytest.mark.skipif(CPU_REASON is not None, reason=str(CPU_REASON))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_each_backend_matches_attention_over_rematerialized_kv(backend):
    """The independent check above, for each backend explicitly (auto picks cpu when it is built)."""
    if backend == "cpu" and CPU_REASON is not None:
        pytest.skip(CPU_REASON)
    xq, indptr, indices, last, start, wk, wv, g = _setup(4, "channel", [64, 32, 96])
    qo_indptr = torch.tensor([0, 2, 3, 7], dtype=torch.int32)
    q = torch.randn(7, HQ, D, generator=g)
    cos, sin = _rope_tables(256, D)
    out, lse = forkdec.ops.xquant_attention(q, qo_indptr, xq, xq, indptr, indices, last, start, wk, wv, cos, sin,
                                            causal=True, return_lse=True, backend=backend)
    want, want_lse = _expected(q, qo_indptr, xq, indptr, indices, last, start, wk, wv, None, None, True, None)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lse, want_lse, rtol=1e-4, atol=1e-4)


@needs_cpu
def test_cpu_shared_prompt_equals_per_path_requests():
    """64 paths' queries as one request over a shared prompt (each page rematerialized once) equal
    the same queries as 64 requests over the same pages, and a split over threads changes nothing."""
    xq, indptr, indices, last, start, wk, wv, g = _setup(4, "channel", [256], start=[5])
    q = torch.randn(64, HQ, D, generator=g)
    cos, sin = _rope_tables(300, D)
    shared = forkdec.ops.xquant_attention(q, torch.tensor([0, 64], dtype=torch.int32), xq, xq, indptr, indices,
                                          last, start, wk, wv, cos, sin, return_lse=True, backend="cpu")
    n = indptr[1]
    per_path = forkdec.ops.xquant_attention(
        q, torch.arange(65, dtype=torch.int32), xq, xq, torch.arange(65, dtype=torch.int32) * n,
        indices[:n].repeat(64), last.repeat(64), start.repeat(64), wk, wv, cos, sin, return_lse=True, backend="cpu")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one_thread = forkdec.ops.xquant_attention(q, torch.tensor([0, 64], dtype=torch.int32), xq, xq, indptr,
                                                  indices, last, start, wk, wv, cos, sin, return_lse=True,
                                                  backend="cpu")
    finally:
        torch.set_num_threads(previous)
    for a, b in [(shared, per_path), (shared, one_thread)]:
        torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a[1], b[1], rtol=1e-5, atol=1e-5)


@needs_cpu
def test_cpu_op_checks_bounds_on_direct_calls():
    """torch.ops.forkdec.xquant_attention (no Python validation) refuses what would read out of bounds."""
    xq, indptr, indices, last, start, wk, wv, g = _setup(4, "token", [40])
    cos, sin = _rope_tables(64, D)
    q = torch.randn(1, HQ, D)
    qo = torch.tensor([0, 1], dtype=torch.int32)

    def call(**over):
        a = dict(xk=page_args(xq), xv=page_args(xq), indices=indices, start=start, cos=cos, last=last, wk=wk)
        a.update(over)
        return torch.ops.forkdec.xquant_attention(q, qo, *a["xk"], *a["xv"], xq.page_size, indptr, a["indices"],
                                                  a["last"], a["start"], a["wk"], wv, None, None, a["cos"], sin,
                                                  False, None, 0.2)

    call()
    codes, scale, zero, bits, gs, axis, w = page_args(xq)
    for over, pattern in [(dict(indices=indices + 100), "kv_indices"), (dict(start=torch.tensor([30])), "kv_start_pos"),
                          (dict(last=torch.tensor([33], dtype=torch.int32)), "kv_last_page_len"),
                          (dict(xk=(codes, scale, zero, 5, gs, axis, w)), "xk_bits"),
                          (dict(xk=(codes[:, :-1], scale, zero, bits, gs, axis, w)), "codes"),
                          (dict(xk=(codes, scale.float(), zero, bits, gs, axis, w)), "xk_scale"),
                          (dict(xk=(codes, scale, None, bits, gs, axis, w)), "xk_zero"),
                          (dict(wk=wk[:-1]), "wk"), (dict(cos=cos[:, :4]), "rope_cos")]:
        with pytest.raises(RuntimeError, match=pattern):
            call(**over)


@needs_cpu
def test_cpu_float_window_in_bf16_matches_reference():
    """Full-precision window pages stored in bf16, q in bf16."""
    g = torch.Generator().manual_seed(3)
    window = torch.randn(3, 16, W, generator=g).bfloat16()
    q = torch.randn(4, HQ, D, generator=g).bfloat16()
    wk, wv = torch.randn(W, HKV * D, generator=g) / 8, torch.randn(W, HKV * D, generator=g) / 8
    cos, sin = _rope_tables(200, D)
    args = (q, torch.tensor([0, 4], dtype=torch.int32), window, window, torch.tensor([0, 3], dtype=torch.int32),
            torch.tensor([2, 0, 1], dtype=torch.int32), torch.tensor([5], dtype=torch.int32),
            torch.tensor([100], dtype=torch.int32), wk, wv, cos, sin)
    out, lse = forkdec.ops.xquant_attention(*args, causal=True, return_lse=True, backend="cpu")
    want, want_lse = forkdec.ops.xquant_attention(*args, causal=True, return_lse=True, backend="reference")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), want.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(lse, want_lse, rtol=1e-4, atol=1e-4)


@needs_cpu
def test_torch_compile_fullgraph_traces_the_op():
    torch._dynamo.reset()
    xq, indptr, indices, last, start, wk, wv, g = _setup(4, "token", [40])
    cos, sin = _rope_tables(64, D)
    q = torch.randn(2, HQ, D, generator=g)
    qo = torch.tensor([0, 2], dtype=torch.int32)
    codes, scale, zero, bits, gs, axis, w = page_args(xq)

    def f(q):
        out, lse = torch.ops.forkdec.xquant_attention(q * 2, qo, codes, scale, zero, bits, gs, axis, w, codes, scale,
                                                      zero, bits, gs, axis, w, xq.page_size, indptr, indices, last,
                                                      start, wk, wv, None, None, cos, sin, False, None, 0.2)
        return out + 1, lse

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out, lse = compiled(q)
    want, want_lse = forkdec.ops.xquant_attention(q * 2, qo, xq, xq, indptr, indices, last, start, wk, wv, cos, sin,
                                                  sm_scale=0.2, return_lse=True, backend="reference")
    torch.testing.assert_close(out, want + 1, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lse, want_lse, rtol=1e-4, atol=1e-4)


def test_gpu_xquant_bench_plumbing_runs_on_cpu(capsys):
    """bench/gpu_xquant.py --dry-run: every implementation once on a tiny CPU input, and the roofline."""
    from forkdec.bench import gpu_xquant
    assert gpu_xquant.main(["--dry-run", "--models", "smollm2"]) == 0
    printed = capsys.readouterr().out
    assert "Roofline estimate" in printed and "ran, output (3, 4, 32)" in printed


def test_gpu_xquant_roofline_counts_bytes_and_flops():
    """The estimate's inputs, by hand for SmolLM2: bf16 K/V 768 bytes per token, 4-bit raw X 576 * (0.5 + 4/64)
    = 324, latents 2 * 192 * 0.5625 = 216; raw X adds 4 * 576 * 192 FLOPs per token."""
    from forkdec.bench import gpu_xquant as gx
    m = gx.MODELS["smollm2"]
    assert gx.cache_bytes_per_token(m, "bf16 K/V") == 768
    assert gx.cache_bytes_per_token(m, "raw X") == 324
    assert gx.cache_bytes_per_token(m, "latent") == 216
    assert gx.remat_flops_per_token(m, "raw X") == 4 * 576 * 192
    assert gx.remat_flops_per_token(m, "bf16 K/V") == 0


@needs_cpu
def test_kernel_backends_name_an_unsupported_dtype():
    xq, indptr, indices, last, start, wk, wv, g = _setup(4, "token", [40])
    cos, sin = _rope_tables(64, D)
    qo = torch.tensor([0, 1], dtype=torch.int32)
    with pytest.raises(ValueError, match="q"):
        forkdec.ops.xquant_attention(torch.randn(1, HQ, D, dtype=torch.float64), qo, xq, xq, indptr, indices, last,
                                     start, wk, wv, cos, sin, backend="cpu")
    window = torch.randn(2, 32, W, dtype=torch.float64)
    with pytest.raises(ValueError, match="xk_pages"):
        forkdec.ops.xquant_attention(torch.randn(1, HQ, D), qo, window, window, indptr,
                                     torch.tensor([1, 0], dtype=torch.int32), last, start, wk, wv, cos, sin,
                                     backend="cpu")


@pytest.mark.skipif(unavailable_reason("triton", "xquant_attention", torch.device("cpu")) is not None,
                    reason=str(unavailable_reason("triton", "xquant_attention", torch.device("cpu"))))
@pytest.mark.parametrize("splits", [1, 3])
def test_triton_split_kv_matches_reference(splits):
    """The Triton kernel with each request's keys split into chunks merged by LSE (decode on a GPU)."""
    from forkdec.triton_kernels import xquant as kernels
    xq, indptr, indices, last, start, wk, wv, g = _setup(3, "channel", [96, 64, 0, 32])
    qo_indptr = torch.tensor([0, 2, 3, 4, 7], dtype=torch.int32)
    q = torch.randn(7, HQ, D, generator=g)
    bk, bv = torch.randn(HKV * D, generator=g), torch.randn(HKV * D, generator=g)
    cos, sin = _rope_tables(256, D)
    out, lse = kernels.xquant_attention(q, qo_indptr, *page_args(xq), *page_args(xq), xq.page_size, indptr, indices,
                                        last, start, wk, wv, bk, bv, cos, sin, True, None, 0.2, num_splits=splits)
    want, want_lse = forkdec.ops.xquant_attention(q, qo_indptr, xq, xq, indptr, indices, last, start, wk, wv, cos,
                                                  sin, bk=bk, bv=bv, causal=True, sm_scale=0.2, return_lse=True,
                                                  backend="reference")
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lse, want_lse, rtol=1e-4, atol=1e-4)


@needs_cpu
def test_cpu_bench_runs_quick(tmp_path):
    """bench/xquant_attention.py --quick: the script runs end to end and writes its table."""
    from forkdec.bench import xquant_attention as bench
    assert bench.run(["--quick", "--rounds", "1", "--threads", "1", "--out", str(tmp_path)]) == 0
    report = (tmp_path / "xquant_attention.md").read_text()
    assert "raw X 4-bit ch64" in report and "latent 192+192 4-bit" in report


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_queries_that_see_no_key_get_zero_and_minus_inf(backend):
    """Causal with more queries than keys: the first queries see nothing (out 0, lse -inf), the rest
    match the reference."""
    reason = unavailable_reason(backend, "xquant_attention", torch.device("cpu"))
    if reason is not None:
        pytest.skip(reason)
    g = torch.Generator().manual_seed(5)
    window = torch.randn(1, 16, W, generator=g)
    q = torch.randn(5, HQ, D, generator=g)
    wk, wv = torch.randn(W, HKV * D, generator=g) / 8, torch.randn(W, HKV * D, generator=g) / 8
    cos, sin = _rope_tables(32, D)
    args = (q, torch.tensor([0, 5], dtype=torch.int32), window, window, torch.tensor([0, 1], dtype=torch.int32),
            torch.tensor([0], dtype=torch.int32), torch.tensor([3], dtype=torch.int32),
            torch.tensor([2], dtype=torch.int32), wk, wv, cos, sin)
    out, lse = forkdec.ops.xquant_attention(*args, causal=True, return_lse=True, backend=backend)
    assert torch.equal(out[:2], torch.zeros_like(out[:2])) and bool((lse[:2] == -math.inf).all())
    assert bool(torch.isfinite(lse[2:]).all())
    want, want_lse = forkdec.ops.xquant_attention(*args, causal=True, return_lse=True, backend="reference")
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lse, want_lse, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(unavailable_reason("triton", "xquant_attention", torch.device("cpu")) is not None,
                    reason=str(unavailable_reason("triton", "xquant_attention", torch.device("cpu"))))
def test_triton_half_precision_dots_stay_close():
    """The fp16 tensor-core path a GPU takes for fp16/bf16 q, forced here: within fp16 rounding."""
    from forkdec.triton_kernels import xquant as kernels
    xq, indptr, indices, last, start, wk, wv, g = _setup(4, "token", [50, 33])
    qo_indptr = torch.tensor([0, 3, 4], dtype=torch.int32)
    q = torch.randn(4, HQ, D, generator=g).to(torch.bfloat16)
    cos, sin = _rope_tables(128, D)
    out, lse = kernels.xquant_attention(q, qo_indptr, *page_args(xq), *page_args(xq), xq.page_size, indptr, indices,
                                        last, start, wk, wv, None, None, cos, sin, False, None, 0.2, half_dot=True)
    want, want_lse = forkdec.ops.xquant_attention(q, qo_indptr, xq, xq, indptr, indices, last, start, wk, wv, cos,
                                                  sin, sm_scale=0.2, return_lse=True, backend="reference")
    torch.testing.assert_close(out.float(), want.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(lse, want_lse, rtol=1e-2, atol=1e-2)


@pytest.mark.skipif(unavailable_reason("triton", "xquant_attention", torch.device("cpu")) is not None,
                    reason=str(unavailable_reason("triton", "xquant_attention", torch.device("cpu"))))
def test_triton_head_dim_96_matches_reference():
    """d96 (allowed by HEAD_DIMS) runs padded to 128 with masks: the padding lanes must
    neither read past a head's weights, bias and RoPE table nor write past its output."""
    from forkdec.triton_kernels import xquant as kernels
    d, hkv, hq, width, page = 96, 2, 4, 64, 16
    g = torch.Generator().manual_seed(96)
    xq = QuantizedPages.empty(5, page, width, 4, 32, "token")
    for p in range(5):
        xq.write(p, torch.randn(page, width, generator=g))
    indptr = torch.tensor([0, 2, 4], dtype=torch.int32)
    indices = torch.tensor([3, 0, 4, 1], dtype=torch.int32)
    last = torch.tensor([9, 16], dtype=torch.int32)
    start = torch.tensor([0, 7], dtype=torch.int32)
    qo_indptr = torch.tensor([0, 2, 5], dtype=torch.int32)
    q = torch.randn(5, hq, d, generator=g)
    wk, wv = torch.randn(width, hkv * d, generator=g) / 6, torch.randn(width, hkv * d, generator=g) / 6
    bk, bv = torch.randn(hkv * d, generator=g), torch.randn(hkv * d, generator=g)
    cos, sin = _rope_tables(64, d)
    want = forkdec.ops.xquant_attention(q, qo_indptr, xq, xq, indptr, indices, last, start, wk, wv, cos, sin, bk=bk,
                                        bv=bv, causal=True, return_lse=True, backend="reference")
    for splits in (1, 2):
        out, lse = kernels.xquant_attention(q, qo_indptr, *page_args(xq), *page_args(xq), page, indptr, indices,
                                            last, start, wk, wv, bk, bv, cos, sin, True, None, 1 / math.sqrt(d),
                                            num_splits=splits)
        torch.testing.assert_close(out, want[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(lse, want[1], rtol=1e-4, atol=1e-4)
