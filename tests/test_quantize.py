"""XQuant's quantization format: bit packing is a bijection, round trips stay within
one step, both axes group the right elements, bad formats name the argument."""
import itertools

import pytest
import torch

from forkdec.xquant import BITS, GROUP_SIZES, dequantize, pack_codes, quantize, unpack_codes


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_packing_round_trips_every_code_at_every_position(bits, group_size):
    levels = 1 << bits
    # Row r holds code (r + i) % levels at position i: every code visits every position.
    codes = ((torch.arange(levels)[:, None] + torch.arange(group_size)[None, :]) % levels).to(torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.shape == (levels, group_size * bits // 8)  # no wasted bits
    assert torch.equal(unpack_codes(packed, bits, group_size), codes)


def test_packing_is_little_endian():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0]], dtype=torch.uint8)  # 3-bit, 24 bits
    want = sum(int(c) << (3 * i) for i, c in enumerate(codes[0]))
    assert pack_codes(codes, 3)[0].tolist() == list(want.to_bytes(3, "little"))


def _groups_of(x, group_size, axis):
    """Index sets of the groups, straight from the definition."""
    t, h = x.shape
    if axis == "token":
        return [[(i, j) for j in range(c, c + group_size)] for i in range(t) for c in range(0, h, group_size)]
    return [[(i, j) for i in range(b, b + group_size)] for b in range(0, t, group_size) for j in range(h)]


@pytest.mark.parametrize("bits,group_size,axis", list(itertools.product(BITS, GROUP_SIZES, ("token", "channel"))))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_within_half_a_step(bits, group_size, axis, dtype):
    g = torch.Generator().manual_seed(bits * 1000 + group_size)
    t, h = (3, 2 * group_size) if axis == "token" else (2 * group_size, 5)
    x = (torch.randn(t, h, generator=g) * torch.logspace(-2, 2, h)).to(dtype)
    x[0, :group_size if axis == "token" else 1] = 1.2345  # a constant group (scale 0) where it fits
    qt = quantize(x, bits, group_size, axis)
    y = dequantize(qt)
    xf = x.float()
    for gi, idx in enumerate(_groups_of(xf, group_size, axis)):
        rows, cols = zip(*idx)
        vals = xf[list(rows), list(cols)]
        step = float(qt.scale[gi])
        fp16_slack = 2 ** -10 * float(vals.abs().max())  # the fp16 zero's rounding
        err = (y[list(rows), list(cols)] - vals).abs().max()
        assert err <= step / 2 * (1 + 1e-3) + fp16_slack, (gi, float(err), step)
        hi = float(vals.max())
        assert step * ((1 << bits) - 1) >= hi - float(qt.zero[gi]) - 1e-6  # the range is covered
    assert qt.nbytes() == x.numel() * bits // 8 + 4 * x.numel() // group_size


def test_extremes_of_fp16_range():
    x = torch.tensor([[-65504.0] * 16 + [65504.0] * 16])
    y = dequantize(quantize(x, 4, 32))
    assert torch.isfinite(y).all() and (y - x).abs().max() <= 65504 * 2 / 15 / 2 + 64


@pytest.mark.parametrize("kwargs,name", [
    (dict(bits=5, group_size=32), "bits"), (dict(bits=4, group_size=48), "group_size"),
    (dict(bits=4, group_size=32, axis="head"), "axis")])
def test_bad_format_names_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        quantize(torch.zeros(32, 64), **kwargs)


def test_bad_tensor_names_x():
    with pytest.raises(ValueError, match="x.*multiple of group_size"):
        quantize(torch.zeros(2, 72), 4, 32)
    with pytest.raises(ValueError, match="x.*multiple of group_size"):
        quantize(torch.zeros(40, 8), 4, 32, "channel")
    with pytest.raises(ValueError, match="x"):
        quantize(torch.tensor([[float("nan")] * 32]), 4, 32)
    with pytest.raises(ValueError, match="x"):
        quantize(torch.full((1, 32), 1e6), 4, 32)
