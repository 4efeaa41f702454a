"""Harness specs for the fused decoder-layer ops: rms_norm, add_rms_norm, rope_qkv, silu_and_mul."""
from __future__ import annotations

import torch

import forkdec
from forkdec import reference
from forkdec.ops.layer_ops import BACKENDS
from harness import SPECS, Case, OpSpec


def _randn(shape, dtype, g, scale=1.0):
    return (torch.randn(shape, generator=g) * scale).to(dtype)


def _wide(x, g):
    """A non-contiguous view of x: every other row of a tensor twice as tall."""
    pad = torch.empty_like(x)
    return torch.stack([x, pad], 1).reshape(-1, *x.shape[1:])[::2]


# ---- rms_norm / add_rms_norm -----------------------------------------------------------

def _norm_case(id, shape, view=None, weight_dtype=None, residual=False, scale=1.0):
    def make(dtype, g):
        x = _randn(shape, dtype, g, scale)
        if view is not None:
            x = view(x, g)
        w = (1 + 0.5 * torch.randn(x.shape[-1], generator=g)).to(weight_dtype or dtype)
        args = (x,) if not residual else (x, _randn(x.shape, dtype, g, scale))
        return (*args, w), {"eps": 1e-5}
    return Case(id, make)


NORM_SHAPES = [("1x1", (1, 1)), ("32x576", (32, 576)), ("3x17", (3, 17)), ("7x64", (7, 64)),
               ("rows0", (0, 33)), ("3d", (2, 5, 49))]


def _norm_cases(residual):
    cases = [_norm_case(id, shape, residual=residual) for id, shape in NORM_SHAPES]
    cases += [_norm_case("strided_rows", (9, 100), view=_wide, residual=residual),
              _norm_case("transposed", (40, 6), view=lambda x, g: x.t(), residual=residual),
              _norm_case("fp32_weight", (5, 130), weight_dtype=torch.float32, residual=residual),
              _norm_case("large_values", (4, 300), scale=1e3, residual=residual)]
    return cases


def _close(a, b, dtype):
    """One rounding of fp32 math: fp32 to a few ulps; half types to one ulp, on almost every element."""
    assert a.dtype == b.dtype and a.shape == b.shape and a.is_contiguous(), (a.dtype, b.dtype, a.shape, b.shape)
    if dtype == torch.float32:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        return
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-3
    torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)
    if a.numel():  # fp32 rounding differences flip a half-type rounding only rarely
        assert (a == b).float().mean() > 0.98, (a == b).float().mean()


def compare_one(out, ref, dtype):
    _close(out, ref, dtype)


def compare_many(out, ref, dtype):
    assert len(out) == len(ref)
    for a, b in zip(out, ref):
        _close(a, b, dtype)


SPECS.append(OpSpec("rms_norm", forkdec.ops.rms_norm, reference.rms_norm, BACKENDS, _norm_cases(False), compare_one))
SPECS.append(OpSpec("add_rms_norm", forkdec.ops.add_rms_norm, reference.add_rms_norm, BACKENDS, _norm_cases(True),
                    compare_many))


# ---- rope_qkv ------------------------------------------------------------------------------

def _rope_case(id, t, hq, hkv, d, view=None, max_pos=4096):
    def make(dtype, g):
        qkv = _randn((t, (hq + 2 * hkv) * d), dtype, g, 2.0)
        if view is not None:
            qkv = view(qkv, g)
        pos = torch.randint(0, max_pos, (t,), generator=g).float()
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2).float() / d))
        angles = pos[:, None] * inv_freq[None, :]
        return (qkv, angles.cos(), angles.sin(), hq, hkv), {}
    return Case(id, make)


ROPE_CASES = [_rope_case("smollm_decode", 32, 9, 3, 64), _rope_case("one_token", 1, 1, 1, 2),
              _rope_case("odd_half", 5, 3, 1, 38), _rope_case("mha_d128", 3, 4, 4, 128),
              _rope_case("t0", 0, 2, 1, 16), _rope_case("strided_rows", 7, 6, 2, 48, view=_wide),
              _rope_case("column_slice", 4, 2, 1, 32, view=lambda x, g: torch.cat([x, x[:, :7]], 1)[:, :x.shape[1]])]

SPECS.append(OpSpec("rope_qkv", forkdec.ops.rope_qkv, reference.rope_qkv, BACKENDS, ROPE_CASES, compare_many))


# ---- silu_and_mul --------------------------------------------------------------------------

def _silu_case(id, shape, view=None, scale=3.0):
    def make(dtype, g):
        x = _randn(shape, dtype, g, scale)
        return (view(x, g) if view is not None else x,), {}
    return Case(id, make)


SILU_CASES = [_silu_case("32x3072", (32, 3072)), _silu_case("1x2", (1, 2)), _silu_case("3x34", (3, 34)),
              _silu_case("rows0", (0, 10)), _silu_case("3d", (2, 3, 70)),
              _silu_case("strided_rows", (6, 50), view=_wide), _silu_case("transposed", (20, 4), view=lambda x, g: x.t()),
              _silu_case("large", (4, 64), scale=60.0)]

SPECS.append(OpSpec("silu_and_mul", forkdec.ops.silu_and_mul, reference.silu_and_mul, BACKENDS, SILU_CASES,
                    compare_one))
