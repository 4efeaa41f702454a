"""Harness spec for forkdec.ops.sample.

Every case passes a seed, so a backend and the reference consume the same
uniforms (drawn by the Python face). Greedy cases must match exactly; sampled
cases must match exactly too on these fixed inputs: backends may only differ
where u * total lands within rounding of a boundary between two tokens (or a
top-p mass within rounding of p), which none of these seeds hits. The
statistical tests (tests/test_sampling.py) check the distributions themselves.
"""
from __future__ import annotations

import torch

import forkdec
from forkdec import reference
from forkdec.ops.sampling import BACKENDS, SampleOutput, draw_uniforms
from harness import SPECS, Case, OpSpec


def sample_reference(logits, *, seed, row_ids=None, **filters):
    """forkdec.reference.sample on the uniforms the face draws for `seed`."""
    rows = logits.shape[0] if row_ids is None else row_ids.numel()
    return reference.sample(logits, draw_uniforms(rows, logits.device, seed=seed), row_ids=row_ids, **filters)


def _randn(shape, dtype, g, scale=3.0):
    return (torch.randn(shape, generator=g) * scale).to(dtype)


def _ties(shape, dtype, g):
    # Small integers: many exact ties, at the top and at every threshold.
    return torch.randint(-4, 5, shape, generator=g).to(dtype)


def _with_neg_inf(shape, dtype, g):
    x = _randn(shape, dtype, g)
    x[torch.rand(shape, generator=g) < 0.6] = -float("inf")
    x[:, 0] = 0.0  # every row keeps a finite logit
    return x


def _case(id, shape, fill=_randn, view=None, triton=True, row_ids=None, **filters):
    def make(dtype, g):
        x = fill(shape, dtype, g)
        if view is not None:
            x = view(x)
        kwargs = {"seed": 1234}
        for name, value in filters.items():
            kwargs[name] = value(x, g) if callable(value) else value
        if row_ids is not None:
            kwargs["row_ids"] = row_ids(x, g)
        return (x,), kwargs
    return Case(id, make, triton)


def _per_row(low, high, integer=False):
    def make(x, g):
        rows = x.shape[0]
        if integer:
            return torch.randint(low, high + 1, (rows,), generator=g)
        return low + (high - low) * torch.rand(rows, generator=g)
    return make


def _fan_out(x, g):
    return torch.tensor([0, 0, 0, 1, 1, 0, 2, 2, 2, 2])[: 10 if x.shape[0] > 2 else 5] % x.shape[0]


CASES = [
    # greedy: exact
    _case("greedy_1x1", (1, 1), temperature=0.0),
    _case("greedy_3x17", (3, 17), temperature=0.0),
    _case("greedy_5x1000", (5, 1000), temperature=0.0, triton=False),
    _case("greedy_ties", (6, 33), fill=_ties, temperature=0.0),
    _case("greedy_neg_inf", (4, 50), fill=_with_neg_inf, temperature=0.0),
    # sampled with fixed uniforms
    _case("plain_3x17", (3, 17)),
    _case("plain_4x1000", (4, 1000), triton=False),
    _case("temperature_0.6", (3, 257), temperature=0.6),
    _case("top_k_5", (3, 100), top_k=5),
    _case("top_k_50_V4099", (2, 4099), top_k=50, triton=False),
    _case("top_k_ties", (5, 40), fill=_ties, top_k=3),
    _case("top_k_ge_vocab", (2, 9), top_k=20),
    _case("top_p_0.8", (3, 100), top_p=0.8),
    _case("top_p_ties", (5, 40), fill=_ties, top_p=0.5),
    _case("top_p_0.9_V1000", (2, 1000), top_p=0.9, triton=False),
    _case("min_p_0.1", (3, 100), min_p=0.1),
    _case("combined", (3, 200), temperature=0.8, top_k=40, top_p=0.85, min_p=0.02),
    _case("combined_neg_inf", (3, 64), fill=_with_neg_inf, top_k=10, top_p=0.9, min_p=0.01),
    _case("per_row_params", (4, 80), temperature=_per_row(0.3, 1.5), top_k=_per_row(0, 10, integer=True),
          top_p=_per_row(0.5, 1.0), min_p=_per_row(0.0, 0.2)),
    _case("greedy_and_sampled_rows", (4, 30), temperature=lambda x, g: torch.tensor([0.0, 1.0, 0.0, 0.7])),
    _case("row_ids_fan_out", (3, 60), row_ids=_fan_out, top_k=20, top_p=0.9),
    _case("row_ids_per_output_params", (2, 60), row_ids=_fan_out,
          temperature=lambda x, g: torch.rand(5, generator=g) + 0.2),
    _case("row_ids_empty", (2, 10), row_ids=lambda x, g: torch.zeros(0, dtype=torch.long)),
    _case("rows0", (0, 7)),
    _case("transposed", (50, 3), view=lambda x: x.t(), top_k=7),
    _case("strided_cols", (3, 130), view=lambda x: x[:, ::2], top_p=0.7),
    _case("sliced_rows", (9, 130), view=lambda x: x[2:7, 3:120], top_k=9, temperature=0.0),
]


def compare(out, ref, dtype):
    assert out.dtype == torch.int64, out.dtype
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert torch.equal(out, ref), (out.tolist(), ref.tolist())


SPECS.append(OpSpec("sample", forkdec.ops.sample, sample_reference, BACKENDS, CASES, compare))


# ---- sample_with_logprobs: the same tokens, plus per-token signals -------------------------------------

def signals_reference(logits, *, seed, row_ids=None, top_logprobs=20, **filters):
    """forkdec.reference.sample_with_logprobs on the uniforms the face draws for `seed`."""
    rows = logits.shape[0] if row_ids is None else row_ids.numel()
    num_top = 0 if top_logprobs is None else top_logprobs
    out = reference.sample_with_logprobs(logits, draw_uniforms(rows, logits.device, seed=seed), num_top=num_top,
                                         row_ids=row_ids, **filters)
    return SampleOutput(*out[:4], out[4] if num_top else None)


def _signals_case(id, shape, fill=_randn, top=20, triton=True, **kw):
    case = _case(id, shape, fill=fill, triton=triton, **kw)

    def make(dtype, g):
        args, kwargs = case.make(dtype, g)
        kwargs["top_logprobs"] = top(args[0]) if callable(top) else top
        return args, kwargs
    return Case(id, make, triton)


SIGNAL_CASES = [
    _signals_case("plain_3x17", (3, 17), top=5),
    _signals_case("top_20_4x300", (4, 300)),
    _signals_case("top_20_V4099", (2, 4099), triton=False),
    _signals_case("greedy", (3, 50), temperature=0.0, top=3),
    _signals_case("filtered", (3, 200), temperature=0.7, top_k=30, top_p=0.9, top=20),
    _signals_case("ties", (5, 40), fill=_ties, top=7),  # ties in the top k: the lower id first
    _signals_case("neg_inf_fill", (4, 50), fill=_with_neg_inf, top=40),  # fewer finite logits than k
    _signals_case("k_is_vocab", (2, 9), top=9),
    _signals_case("logprobs_only", (3, 33), top=None),
    _signals_case("row_ids_fan_out", (3, 60), row_ids=_fan_out, top=4),
    _signals_case("strided", (50, 3), view=lambda x: x.t(), top=6),
    _signals_case("rows0", (0, 7), top=3),
]

# Logprobs: fp32 log-sum-exp, summed in a different order per backend (lanes,
# blocks, double combine): 2e-5 absolute plus 1e-5 relative. Ids and tokens
# exactly (ties broken by lower id on every backend).
SIGNAL_ATOL, SIGNAL_RTOL = 2e-5, 1e-5


def compare_signals(out, ref, dtype):
    compare(out.tokens, ref.tokens, dtype)
    torch.testing.assert_close(out.logprobs, ref.logprobs, atol=SIGNAL_ATOL, rtol=SIGNAL_RTOL, equal_nan=True)
    assert out.top_ids.shape == ref.top_ids.shape and out.top_ids.dtype == torch.int64
    assert torch.equal(out.top_ids, ref.top_ids), (out.top_ids.tolist(), ref.top_ids.tolist())
    torch.testing.assert_close(out.top_logprobs, ref.top_logprobs, atol=SIGNAL_ATOL, rtol=SIGNAL_RTOL)
    assert (out.confidence is None) == (ref.confidence is None)
    if ref.confidence is not None:
        torch.testing.assert_close(out.confidence, ref.confidence, atol=SIGNAL_ATOL, rtol=SIGNAL_RTOL)


SPECS.append(OpSpec("sample_with_logprobs", forkdec.ops.sample_with_logprobs, signals_reference, BACKENDS,
                    SIGNAL_CASES, compare_signals))
