"""Harness spec for forkdec.ops.softmax."""
from __future__ import annotations

import torch

import forkdec
from forkdec import reference
from forkdec.ops.softmax import BACKENDS
from harness import SPECS, Case, OpSpec


def _randn(shape, dtype, g, scale=4.0):
    return (torch.randn(shape, generator=g) * scale).to(dtype)


def _case(id, shape, dim=-1, view=None, temperature=None, triton=True, fill=None):
    def make(dtype, g):
        x = fill(dtype) if fill else _randn(shape, dtype, g)
        if view is not None:
            x = view(x)
        t = temperature(x, dim, g) if callable(temperature) else temperature
        return (x,), {"dim": dim, "temperature": t}
    return Case(id, make, triton)


def _row_temperatures(x, dim, g):
    rows_shape = x.movedim(dim, -1).shape[:-1]
    return torch.rand(rows_shape, generator=g) * 2 + 0.1


CASES = [
    _case("1x1", (1, 1)),
    _case("3x17", (3, 17)),
    _case("5x1000", (5, 1000)),
    _case("2x4097", (2, 4097)),
    _case("33x333", (33, 333), triton=False),
    _case("rows0", (0, 7)),
    _case("cols0", (4, 0)),
    _case("scalar", ()),
    _case("vector", (19,)),
    _case("dim0", (37, 5), dim=0),
    _case("3d_dim1", (3, 29, 4), dim=1),
    _case("transposed", (31, 6), view=lambda x: x.t()),
    _case("strided_cols", (4, 66), view=lambda x: x[:, ::2]),
    _case("sliced_rows", (9, 130), view=lambda x: x[2:7, 3:120]),
    _case("temperature_0.7", (6, 257), temperature=0.7),
    _case("row_temperature", (6, 257), temperature=_row_temperatures),
    _case("row_temperature_dim0", (40, 3), dim=0, temperature=_row_temperatures),
    _case("extremes", None, fill=lambda dt: torch.tensor(
        [[1e30, -1e30, 0.0], [-float("inf"), 1.0, 2.0], [-float("inf")] * 3, [float("nan"), 0.0, 1.0]]
    ).to(dt) if dt == torch.float32 else torch.tensor([[-float("inf"), 1.0, 2.0], [-float("inf")] * 3]).to(dt)),
    _case("large_equal", None, fill=lambda dt: torch.full((2, 3001), 60000.0 if dt == torch.float16 else 1e30).to(dt)),
]


def compare(out, ref, dtype):
    assert out.dtype == torch.float32, out.dtype
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert out.is_contiguous()
    # fp32 output from the same (possibly fp16/bf16) inputs: one tolerance for all.
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-7, equal_nan=True)


SPECS.append(OpSpec("softmax", forkdec.ops.softmax, reference.softmax, BACKENDS, CASES, compare))
