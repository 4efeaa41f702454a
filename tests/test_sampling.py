"""Sampling semantics beyond the harness: the filtered distribution on hand-made
cases, statistical agreement of the draws with it, reproducibility, row_ids,
agreement between backends and instruction sets, and bad input.

Statistical tests: N draws from one row (fanned out with row_ids), a Pearson
chi-square against N * filtered_probs (tokens with expected count < 5 pooled
into one bin), rejected above the chi-square quantile at 1e-6 (Wilson-Hilferty
approximation). With fixed seeds a correct sampler passes deterministically; a
token of probability q whose frequency is off by a relative d adds about
N q d^2 to the statistic, so at N = 40k whole-distribution errors such as a
temperature off by 10% fail by far (test_the_chi_square_check_can_fail), while
sub-percent biases on single tokens would not. Tokens with filtered probability
0 must never be drawn: that part is exact and catches a wrong filter boundary
regardless of N.
"""
import math
import zlib

import pytest
import torch

import forkdec
from forkdec import reference
from forkdec.ops.sampling import draw_uniforms

needs_ext = pytest.mark.skipif(forkdec._extension.load() is None,
                               reason=f"C++ extension unavailable: {forkdec._extension.error()}")
needs_triton = pytest.mark.skipif(forkdec.backends.unavailable_reason("triton", "sample", torch.device("cpu"))
                                  is not None, reason="triton cannot run here (not installed or no interpreter)")


def _cpu_isas():
    ext = forkdec._extension.load()
    return list(ext.available_cpu_isas()) if ext is not None else []


@pytest.fixture
def cpu_isa():
    ext = forkdec._extension.load()
    previous = ext.cpu_isa() if ext is not None else None
    yield lambda isa: ext.set_cpu_isa(isa)
    if previous is not None:
        ext.set_cpu_isa(previous)


# ---- the filtered distribution on cases worked out by hand ---------------------------------------

def _logits_of(probs):
    return torch.tensor(probs, dtype=torch.float64).log().float()[None, :]


def test_filtered_probs_top_p_keeps_the_smallest_prefix_reaching_p():
    x = _logits_of([0.1, 0.4, 0.2, 0.3])
    # sorted: 0.4, 0.3 | 0.2, 0.1: mass above 0.2 is 0.7 >= 0.6, above 0.3 is 0.4 < 0.6
    probs = reference.filtered_probs(x, top_p=0.6)
    torch.testing.assert_close(probs, torch.tensor([[0, 4 / 7, 0, 3 / 7]]), atol=1e-6, rtol=0)


def test_filtered_probs_top_k_keeps_every_token_tied_with_the_kth():
    x = torch.tensor([[1.0, 2.0, 2.0, 0.0, 2.0, 1.5]])
    probs = reference.filtered_probs(x, top_k=2)
    assert (probs[0] > 0).tolist() == [False, True, True, False, True, False]
    torch.testing.assert_close(probs[0, [1, 2, 4]], torch.full((3,), 1 / 3))


def test_filtered_probs_top_p_keeps_tie_groups_whole():
    x = torch.tensor([[3.0, 3.0, 1.0, 3.0]])
    # every 3.0 has no strictly larger mass, so all three stay whatever p is
    assert (reference.filtered_probs(x, top_p=0.01)[0] > 0).tolist() == [True, True, False, True]


def test_filtered_probs_top_p_is_over_the_top_k_renormalized_distribution():
    x = _logits_of([0.35, 0.3, 0.2, 0.15])
    # over all four, p = 0.7 keeps 3 tokens (0.35 + 0.3 = 0.65 < 0.7);
    # after top-k 2 the masses are 0.538, 0.462: the second has 0.538 above it.
    assert (reference.filtered_probs(x, top_p=0.7)[0] > 0).tolist() == [True, True, True, False]
    assert (reference.filtered_probs(x, top_k=2, top_p=0.7)[0] > 0).tolist() == [True, True, False, False]
    assert (reference.filtered_probs(x, top_k=2, top_p=0.5)[0] > 0).tolist() == [True, False, False, False]


def test_filtered_probs_min_p_is_relative_to_the_max_and_temperature_scales_first():
    x = _logits_of([0.5, 0.2, 0.05, 0.25])
    assert (reference.filtered_probs(x, min_p=0.3)[0] > 0).tolist() == [True, True, False, True]
    assert (reference.filtered_probs(x, min_p=0.45)[0] > 0).tolist() == [True, False, False, True]
    # t = 0.5 squares the ratios: 0.25 / 0.5 = 0.5 -> 0.25 < 0.3
    assert (reference.filtered_probs(x, temperature=0.5, min_p=0.3)[0] > 0).tolist() == [True, False, False, False]


def test_filtered_probs_greedy_is_one_hot_on_the_first_max():
    x = torch.tensor([[1.0, 5.0, -2.0, 5.0]])
    assert reference.filtered_probs(x, temperature=0.0).tolist() == [[0.0, 1.0, 0.0, 0.0]]


def test_filtered_probs_matches_plain_softmax_without_filters():
    x = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 3
    torch.testing.assert_close(reference.filtered_probs(x, temperature=0.7), torch.softmax(x / 0.7, -1))


# ---- statistical agreement of the draws with filtered_probs -------------------------------------

def _chi_square_quantile(df, z=4.753):  # z: one-sided normal quantile at 1e-6
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def _assert_matches(tokens, probs):
    """tokens [N] drawn from probs [V]: exact on zero-probability tokens, chi-square elsewhere."""
    n = tokens.numel()
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    assert counts.numel() == probs.numel(), "a token out of range"
    drawn_impossible = ((probs == 0) & (counts > 0)).nonzero().flatten().tolist()
    assert not drawn_impossible, f"drew filtered-out tokens {drawn_impossible[:10]}"
    expected = probs.double() * n
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum().reshape(1)])
    exp = torch.cat([expected[big], expected[~big].sum().reshape(1)])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    df = obs.numel() - 1
    if df == 0:
        return
    chi2 = float(((obs - exp) ** 2 / exp).sum())
    assert chi2 < _chi_square_quantile(df), f"chi-square {chi2:.1f} over {df} degrees of freedom"


def _row(kind, vocab, g):
    if kind == "randn":
        return torch.randn(1, vocab, generator=g) * 2.5
    if kind == "ties":  # many exact ties at every threshold
        return torch.randint(-3, 4, (1, vocab), generator=g).float()
    if kind == "neg_inf":
        x = torch.randn(1, vocab, generator=g) * 2.5
        x[torch.rand(1, vocab, generator=g) < 0.7] = -float("inf")
        x[0, vocab // 2] = 1.0
        return x
    raise AssertionError(kind)


FILTERS = {
    "none": {},
    "temperature": {"temperature": 0.6},
    "top_k": {"top_k": 20},
    "top_p": {"top_p": 0.7},
    "min_p": {"min_p": 0.05},
    "combined": {"temperature": 1.3, "top_k": 50, "top_p": 0.9, "min_p": 0.01},
}


def _draw(backend, x, n, seed, **filters):
    """n draws from the single row x with row_ids fan-out (the reference in chunks: it copies rows)."""
    if backend != "reference":
        return forkdec.ops.sample(x, row_ids=torch.zeros(n, dtype=torch.long), seed=seed, backend=backend, **filters)
    u = draw_uniforms(n, x.device, seed=seed)
    chunk = max(1, 2_000_000 // x.shape[1])
    return torch.cat([reference.sample(x.expand(u[i:i + chunk].numel(), -1), u[i:i + chunk], **filters)
                      for i in range(0, n, chunk)])


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_ext)])
@pytest.mark.parametrize("vocab", [1000, 4099])
@pytest.mark.parametrize("kind", ["randn", "ties", "neg_inf"])
@pytest.mark.parametrize("filters", list(FILTERS), ids=list(FILTERS))
def test_draws_follow_filtered_probs(backend, vocab, kind, filters):
    g = torch.Generator().manual_seed(zlib.crc32(f"{vocab}/{kind}/{filters}".encode()))
    x = _row(kind, vocab, g)
    n = 40_000 if backend == "cpu" else 6_000  # the reference sorts every copied row: slow
    tokens = _draw(backend, x, n, seed=vocab + len(kind), **FILTERS[filters])
    _assert_matches(tokens, reference.filtered_probs(x, **FILTERS[filters])[0])


@needs_triton
@pytest.mark.parametrize("filters", ["none", "combined"])
def test_triton_draws_follow_filtered_probs_on_a_tiny_row(filters):
    # The interpreter runs each output row's ~70 row reductions in Python: few, short rows.
    x = _row("ties", 12, torch.Generator().manual_seed(3))
    tokens = _draw("triton", x, 200, seed=11, **FILTERS[filters])
    _assert_matches(tokens, reference.filtered_probs(x, **FILTERS[filters])[0])


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits_are_sampled_from_their_own_values(dtype):
    x = (torch.randn(1, 1000, generator=torch.Generator().manual_seed(5)) * 3).to(dtype)
    tokens = _draw("cpu", x, 40_000, seed=2, top_k=100, top_p=0.95)
    _assert_matches(tokens, reference.filtered_probs(x, top_k=100, top_p=0.95)[0])


def test_the_chi_square_check_can_fail():
    x = torch.randn(1, 200, generator=torch.Generator().manual_seed(1)) * 2
    tokens = _draw("reference", x, 20_000, seed=3)
    with pytest.raises(AssertionError, match="chi-square"):
        _assert_matches(tokens, reference.filtered_probs(x, temperature=1.1)[0])
    with pytest.raises(AssertionError, match="filtered-out"):
        _assert_matches(tokens, reference.filtered_probs(x, top_k=100)[0])


# ---- backends agree given the same uniforms ---------------------------------------------------------

@needs_ext
@pytest.mark.parametrize("filters", list(FILTERS), ids=list(FILTERS))
def test_cpu_and_reference_agree_token_by_token(filters):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(64, 4099, generator=g) * 3
    cpu = forkdec.ops.sample(x, seed=99, backend="cpu", **FILTERS[filters])
    ref = forkdec.ops.sample(x, seed=99, backend="reference", **FILTERS[filters])
    # Exact except where u * total falls within rounding of a token boundary
    # (probability ~1e-6 per draw): none in these 64 rows.
    assert torch.equal(cpu, ref), (cpu != ref).nonzero().flatten().tolist()


@needs_ext
def test_every_instruction_set_gives_the_same_tokens(cpu_isa):
    x = torch.randn(16, 5000, generator=torch.Generator().manual_seed(8)) * 3
    per_isa = {}
    for isa in _cpu_isas():
        cpu_isa(isa)
        per_isa[isa] = [forkdec.ops.sample(x, seed=1, backend="cpu", **FILTERS[f]) for f in FILTERS]
    first = next(iter(per_isa.values()))
    for isa, tokens in per_isa.items():
        assert all(torch.equal(a, b) for a, b in zip(tokens, first)), isa


@needs_ext
def test_greedy_ties_go_to_the_lowest_index_on_every_backend():
    x = torch.tensor([[0.0, 3.0, 3.0, -1.0], [2.0, 2.0, 2.0, 2.0], [-float("inf"), 1.0, -float("inf"), 1.0]])
    for backend in forkdec.backends.available_backends("sample"):
        assert forkdec.ops.sample(x, temperature=0.0, backend=backend).tolist() == [1, 0, 1], backend


# ---- reproducibility and randomness sources --------------------------------------------------------

@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_ext)])
def test_same_seed_same_tokens_and_generator_equals_seed(backend):
    x = torch.randn(32, 1000, generator=torch.Generator().manual_seed(0)) * 2
    a = forkdec.ops.sample(x, seed=5, top_p=0.9, backend=backend)
    b = forkdec.ops.sample(x, seed=5, top_p=0.9, backend=backend)
    c = forkdec.ops.sample(x, generator=torch.Generator().manual_seed(5), top_p=0.9, backend=backend)
    d = forkdec.ops.sample(x, seed=6, top_p=0.9, backend=backend)
    assert torch.equal(a, b) and torch.equal(a, c)
    assert not torch.equal(a, d)
    torch.manual_seed(5)
    e = forkdec.ops.sample(x, top_p=0.9, backend=backend)
    assert torch.equal(a, e)  # no seed, no generator: torch's default generator


def test_a_given_generator_advances():
    x = torch.zeros(1, 1000)
    g = torch.Generator().manual_seed(0)
    first = forkdec.ops.sample(x, generator=g, backend="reference")
    second = forkdec.ops.sample(x, generator=g, backend="reference")
    assert not torch.equal(first, second)


# ---- row_ids ------------------------------------------------------------------------------------------

@needs_ext
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_row_ids_draw_like_copied_rows_each_with_its_own_uniform(backend):
    x = torch.randn(3, 500, generator=torch.Generator().manual_seed(4))
    ids = torch.tensor([2, 0, 2, 2, 1, 0, 2])
    fanned = forkdec.ops.sample(x, row_ids=ids, seed=3, top_k=30, backend=backend)
    copied = forkdec.ops.sample(x[ids], seed=3, top_k=30, backend=backend)
    assert torch.equal(fanned, copied)
    flat = forkdec.ops.sample(torch.zeros(1, 1000), row_ids=torch.zeros(64, dtype=torch.long), seed=0,
                              backend=backend)
    assert flat.unique().numel() > 50  # independent draws, not one token repeated


@needs_ext
def test_row_ids_with_per_output_parameters_group_correctly():
    x = torch.randn(2, 300, generator=torch.Generator().manual_seed(6)) * 2
    ids = torch.tensor([0, 1, 0, 0, 1, 0])
    t = torch.tensor([0.0, 1.0, 0.5, 0.0, 1.0, 0.5])
    k = torch.tensor([0, 5, 5, 0, 0, 5])
    args = dict(row_ids=ids, temperature=t, top_k=k, seed=4)
    cpu = forkdec.ops.sample(x, backend="cpu", **args)
    assert torch.equal(cpu, forkdec.ops.sample(x, backend="reference", **args))
    assert cpu[0] == cpu[3] == x[0].argmax()


# ---- rows that leave no token, and bad input ----------------------------------------------------------

@pytest.mark.parametrize("backend", forkdec.backends.available_backends("sample"))
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_row_with_no_token_is_an_error_not_token_0(backend, temperature):
    x = torch.zeros(3, 20)
    x[1] = -float("inf")
    with pytest.raises(ValueError, match="logits: row 1"):
        forkdec.ops.sample(x, temperature=temperature, top_k=4, backend=backend)
    with forkdec.validation(False), pytest.raises(ValueError, match="logits"):
        forkdec.ops.sample(x, temperature=temperature, backend=backend)


@pytest.mark.parametrize("backend", forkdec.backends.available_backends("sample"))
def test_overflowing_temperature_is_an_error(backend):
    x = torch.tensor([[3e38, 0.0, -1.0]])
    with pytest.raises(ValueError, match="logits"):
        forkdec.ops.sample(x, temperature=1e-3, backend=backend)


X = torch.zeros(2, 10)
BAD = [
    (dict(logits=torch.tensor([[0.0, float("nan")]])), "logits"),
    (dict(logits=torch.tensor([[0.0, float("inf")]])), "logits"),
    (dict(logits=torch.zeros(2, 3, dtype=torch.int32)), "logits"),
    (dict(logits=torch.zeros(10)), "logits"),
    (dict(logits=torch.zeros(2, 0)), "logits"),
    (dict(top_k=-1), "top_k"),
    (dict(top_k=2.5), "top_k"),
    (dict(top_k=torch.tensor([1.0, 2.0])), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_p=torch.tensor([0.5, 0.0])), "top_p"),
    (dict(min_p=1.0), "min_p"),
    (dict(min_p=-0.1), "min_p"),
    (dict(temperature=-1.0), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=torch.tensor([1.0, -1.0])), "temperature"),
    (dict(temperature=torch.ones(3)), "temperature"),
    (dict(top_p=torch.ones(1)), "top_p"),
    (dict(row_ids=torch.tensor([0, 2])), "row_ids"),
    (dict(row_ids=torch.tensor([-1])), "row_ids"),
    (dict(row_ids=torch.tensor([0.0])), "row_ids"),
    (dict(row_ids=torch.tensor([0, 1, 1]), top_k=torch.ones(2, dtype=torch.long)), "top_k"),
    (dict(seed=1, generator=torch.Generator()), "seed"),
    (dict(seed="1"), "seed"),
]


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_ext)])
@pytest.mark.parametrize("kwargs,arg", BAD, ids=[f"{a}-{i}" for i, (_, a) in enumerate(BAD)])
def test_bad_input_raises_value_error_naming_the_argument(kwargs, arg, backend):
    kwargs = dict(kwargs)
    logits = kwargs.pop("logits", X)
    with pytest.raises(ValueError, match=f"^{arg}:"):
        forkdec.ops.sample(logits, backend=backend, **kwargs)


@pytest.mark.parametrize("backend", forkdec.backends.available_backends("sample"))
def test_check_nan_false_skips_the_scan(backend):
    x = torch.tensor([[0.0, float("nan"), 1.0], [0.0, 1.0, 2.0]])
    with pytest.raises(ValueError, match="logits: contains NaN"):
        forkdec.ops.sample(x, backend=backend)
    try:  # unspecified, but a token in range or the no-token error, never a crash
        tokens = forkdec.ops.sample(x, check_nan=False, seed=0, backend=backend)
        assert 0 <= int(tokens[0]) < 3
    except ValueError as e:
        assert "logits: row 0" in str(e)


@needs_ext
def test_direct_torch_op_rejects_bad_parameters_without_crashing():
    x = torch.zeros(2, 5)
    u = torch.rand(2)
    with pytest.raises(ValueError, match="top_p"):
        torch.ops.forkdec.sample(x, u, None, 1.0, None, 0, None, 1.5, None, 0.0, None)
    with pytest.raises(ValueError, match="row_ids"):
        torch.ops.forkdec.sample(x, u, torch.tensor([0, 5]), 1.0, None, 0, None, 1.0, None, 0.0, None)
    with pytest.raises(ValueError, match="uniforms"):
        torch.ops.forkdec.sample(x, torch.rand(3), None, 1.0, None, 0, None, 1.0, None, 0.0, None)


@needs_ext
def test_auto_picks_cpu_and_torch_compile_fullgraph_traces_the_op():
    x = torch.randn(4, 100)
    u = draw_uniforms(4, x.device, seed=0)

    def f(x, u):
        return torch.ops.forkdec.sample(x * 2, u, None, 0.7, None, 10, None, 0.9, None, 0.0, None) + 1

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x, u), f(x, u))
    assert torch.equal(forkdec.ops.sample(x, seed=0), forkdec.ops.sample(x, seed=0, backend="cpu"))


# ---- benchmark plumbing (tiny sizes: benchmarks measure nothing in tests) --------------------------

@needs_ext
def test_sampling_bench_writes_its_report(tmp_path):
    from forkdec.cli import main

    assert main(["bench", "sampling", "--shapes", "3x1000", "--rounds", "1", "--out", str(tmp_path)]) == 0
    report = (tmp_path / "sampling.md").read_text()
    assert "3x1000" in report and "torch.argmax" in report and "top_k 50" in report


def test_gpu_sampling_bench_plumbing_runs_on_cpu():
    from forkdec.bench import gpu_sampling

    assert gpu_sampling.main(["--dry-run"]) == 0


def test_the_benchmark_baseline_samples_the_same_distribution():
    from forkdec.bench.sampling import torch_sample

    x = torch.randn(1, 300, generator=torch.Generator().manual_seed(2)) * 2
    tokens = torch_sample(x, 0.8, 50, 0.9, torch.Generator().manual_seed(0), num_samples=20_000)[0]
    _assert_matches(tokens, reference.filtered_probs(x, temperature=0.8, top_k=50, top_p=0.9)[0])


@needs_ext
def test_cpu_tokens_do_not_depend_on_the_thread_count():
    x = torch.randn(40, 3000, generator=torch.Generator().manual_seed(9)) * 3
    ids = torch.randint(0, 40, (200,), generator=torch.Generator().manual_seed(1))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = forkdec.ops.sample(x, row_ids=ids, seed=4, top_k=30, top_p=0.9, backend="cpu")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, forkdec.ops.sample(x, row_ids=ids, seed=4, top_k=30, top_p=0.9, backend="cpu"))


# ---- sample_with_logprobs: per-token signals ------------------------------------------------------

def _signal_backends():
    return ["reference", pytest.param("cpu", marks=needs_ext), pytest.param("triton", marks=needs_triton)]


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_ext)])
@pytest.mark.parametrize("filters", ["none", "combined"])
def test_sample_with_logprobs_draws_follow_filtered_probs(backend, filters):
    """Exact in distribution: 40k draws (row_ids fan-out, seed fixed) against
    filtered_probs, chi-square at 1e-6 as above; and the same tokens as `sample`."""
    g = torch.Generator().manual_seed(zlib.crc32(f"signals-{filters}".encode()))
    x = _row("randn", 1000, g)
    n = 40_000
    ids = torch.zeros(n, dtype=torch.long)
    out = forkdec.ops.sample_with_logprobs(x, row_ids=ids, seed=11, backend=backend, top_logprobs=20,
                                           **FILTERS[filters])
    _assert_matches(out.tokens, reference.filtered_probs(x, **FILTERS[filters])[0])
    plain = forkdec.ops.sample(x, row_ids=ids, seed=11, backend=backend, **FILTERS[filters])
    assert torch.equal(out.tokens, plain)
    # one row: every output carries its signals
    lse = torch.logsumexp(x[0], 0)
    torch.testing.assert_close(out.logprobs, x[0, out.tokens] - lse, atol=2e-5, rtol=1e-5)
    assert torch.equal(out.top_ids, out.top_ids[:1].expand(n, -1))


def test_signals_on_a_hand_worked_row():
    # probabilities 0.5, 0.25, 0.125, 0.125: top-2 logprobs log .5, log .25, confidence -(log .5 + log .25) / 2
    x = torch.tensor([[0.125, 0.5, 0.25, 0.125]]).log() + 3.0  # a shift changes nothing
    for backend in forkdec.backends.available_backends("sample_with_logprobs"):
        out = forkdec.ops.sample_with_logprobs(x, top_logprobs=2, temperature=0.0, seed=0, backend=backend)
        assert out.tokens.tolist() == [1]
        torch.testing.assert_close(out.logprobs, torch.tensor([math.log(0.5)]))
        torch.testing.assert_close(out.top_logprobs, torch.tensor([[math.log(0.5), math.log(0.25)]]))
        assert out.top_ids.tolist() == [[1, 2]]
        torch.testing.assert_close(out.confidence, torch.tensor([-(math.log(0.5) + math.log(0.25)) / 2]))
        # ties: ids 0 and 3 have the same logit; the lower id comes first
        out = forkdec.ops.sample_with_logprobs(x, top_logprobs=4, seed=0, backend=backend)
        assert out.top_ids.tolist() == [[1, 2, 0, 3]]


def test_signals_do_not_depend_on_the_temperature_or_filters():
    x = torch.randn(3, 300, generator=torch.Generator().manual_seed(3))
    for backend in forkdec.backends.available_backends("sample_with_logprobs"):
        a = forkdec.ops.sample_with_logprobs(x, seed=5, backend=backend)
        b = forkdec.ops.sample_with_logprobs(x, seed=5, temperature=0.3, top_k=5, top_p=0.5, backend=backend)
        torch.testing.assert_close(a.top_logprobs, b.top_logprobs)
        torch.testing.assert_close(a.confidence, b.confidence)
        torch.testing.assert_close(b.logprobs, torch.log_softmax(x, -1).gather(1, b.tokens[:, None])[:, 0])


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_ext)])
def test_signals_agree_across_instruction_sets_and_dtypes(backend, cpu_isa):
    g = torch.Generator().manual_seed(9)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = (torch.randn(4, 5003, generator=g) * 3).to(dtype)
        ref = reference.sample_with_logprobs(x, draw_uniforms(4, x.device, seed=2), num_top=20)
        isas = _cpu_isas() if backend == "cpu" else [None]
        for isa in isas:
            if isa is not None:
                cpu_isa(isa)
            out = forkdec.ops.sample_with_logprobs(x, seed=2, backend=backend)
            assert torch.equal(out.tokens, ref[0]) and torch.equal(out.top_ids, ref[3]), (isa, dtype)
            torch.testing.assert_close(out.logprobs, ref[1], atol=2e-5, rtol=1e-5)
            torch.testing.assert_close(out.confidence, ref[4], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_ext)])
@pytest.mark.parametrize("k", [0, -1, 11, True, 2.0])
def test_top_logprobs_outside_1_to_vocab_is_a_value_error(backend, k):
    x = torch.randn(2, 10)
    with pytest.raises(ValueError, match="^top_logprobs:"):
        forkdec.ops.sample_with_logprobs(x, top_logprobs=k, backend=backend)


def test_logprobs_only_returns_no_confidence():
    x = torch.randn(2, 10)
    out = forkdec.ops.sample_with_logprobs(x, top_logprobs=None, seed=1, backend="reference")
    assert out.confidence is None and out.top_ids.shape == (2, 0)


@needs_ext
def test_direct_signals_op_rejects_a_bad_num_top():
    x, u = torch.randn(2, 10), torch.rand(2)
    with pytest.raises(ValueError, match="num_top"):
        torch.ops.forkdec.sample_with_logprobs(x, u, None, 1.0, None, 0, None, 1.0, None, 0.0, None, 11)


_COMPILE_SCRIPT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import forkdec.triton_kernels.sampling as k

for dtype in ("fp32", "bf16", "fp16"):
    sample = {"x_ptr": "*" + dtype, "row_ids_ptr": "*i64", "u_ptr": "*fp32", "t_ptr": "*fp32", "k_ptr": "*i64",
              "p_ptr": "*fp32", "min_p_ptr": "*fp32", "out_ptr": "*i64", "vocab": "i32", "x_row_stride": "i32",
              "BLOCK": "constexpr"}
    signals = {"x_ptr": "*" + dtype, "row_ids_ptr": "*i64", "tokens_ptr": "*i64", "logprob_ptr": "*fp32",
               "top_lp_ptr": "*fp32", "top_id_ptr": "*i64", "conf_ptr": "*fp32", "vocab": "i32",
               "x_row_stride": "i32", "num_top": "i32", "BLOCK": "constexpr", "TOP": "constexpr"}
    for arch in (80, 90):
        options = {"num_warps": 8, **k.FLOAT_OPTIONS}
        for fn, sig, const in ((k._sample_kernel, sample, {"BLOCK": 4096}),
                               (k._signals_kernel, signals, {"BLOCK": 4096, "TOP": 32})):
            c = triton.compile(ASTSource(fn, sig, constexprs=const), target=GPUTarget("cuda", arch, 32),
                               options=options)
            ptx = c.asm["ptx"]
            assert "cubin" in c.asm
            assert "div.full" not in ptx and "div.approx" not in ptx, "an approximate division"
            assert "fma.rn.f32" not in ptx, "FMA contraction despite enable_fp_fusion=False"
print("compiled")
"""


def test_triton_sampling_kernels_compile_for_sm80_and_sm90_with_exact_float_options():
    """Triton's real compiler (to cubin, no GPU needed): the sampling and signals
    kernels compile for sm_80 / sm_90, with IEEE division and no FMA contraction
    (FLOAT_OPTIONS), so a GPU rounds as the interpreter and the CPU do (exp stays
    the GPU's approximate one: tolerances in tests/specs/sampling.py)."""
    import importlib.util
    import os
    import subprocess
    import sys

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], capture_output=True, text=True, env=env,
                         timeout=600)
    assert run.returncode == 0 and "compiled" in run.stdout, run.stdout[-2000:] + run.stderr[-4000:]


@needs_ext
def test_signals_op_schema_and_fake_tensor_agree():
    x, u = torch.randn(3, 50), torch.rand(3)
    for op, ids in ((torch.ops.forkdec.sample_with_logprobs.default, None),
                    (torch.ops.forkdec.sample_with_logprobs.default, torch.tensor([0, 0, 2]))):
        result = torch.library.opcheck(op, (x, u, ids, 1.0, None, 0, None, 1.0, None, 0.0, None, 5),
                                       test_utils=("test_schema", "test_faketensor"))
        assert set(result.values()) == {"SUCCESS"}, result
