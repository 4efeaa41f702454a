"""Uniform asymmetric low-bit quantization with bit-packed codes.

Groups of `group_size` values share one fp16 scale and one fp16 zero (the
group's min): code = round((x - zero) / scale), clamped to [0, 2^bits - 1];
x̂ = code * scale + zero. Axis "token" groups along the last (hidden) dim of
each token of x [T, H]; axis "channel" groups `group_size` consecutive tokens
of one channel (KIVI's key layout). Codes are packed little-endian into a
bit stream per group: a group takes group_size * bits / 8 bytes, no padding
(3-bit included, since every supported group size is a multiple of 8).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from forkdec.validation import require

BITS = (2, 3, 4, 8)
GROUP_SIZES = (32, 64, 128)
AXES = ("token", "channel")
FP16_MAX = 65504.0


@dataclass
class QuantizedTensor:
    """x [T, H] quantized: codes uint8 [num_groups, group_size * bits / 8],
    scale and zero fp16 [num_groups]; groups ordered as `_grouped` lays them out."""
    codes: Tensor
    scale: Tensor
    zero: Tensor
    bits: int
    group_size: int
    axis: str
    shape: tuple[int, int]

    def nbytes(self) -> int:
        return self.codes.numel() + 2 * self.scale.numel() + 2 * self.zero.numel()


def _grouped(x: Tensor, group_size: int, axis: str) -> Tensor:
    """[T, H] -> [num_groups, group_size]: token groups row-major, channel groups
    as (token block, channel) pairs with the block's tokens contiguous."""
    t, h = x.shape
    if axis == "token":
        return x.reshape(t * h // group_size, group_size)
    return x.reshape(t // group_size, group_size, h).transpose(1, 2).reshape(-1, group_size)


def _ungrouped(g: Tensor, shape: tuple[int, int], group_size: int, axis: str) -> Tensor:
    t, h = shape
    if axis == "token":
        return g.reshape(t, h)
    return g.reshape(t // group_size, h, group_size).transpose(1, 2).reshape(t, h)


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """codes uint8 [N, G] (each < 2^bits) -> uint8 [N, G * bits / 8], little-endian bit stream."""
    if bits == 8:
        return codes.contiguous()
    n, g = codes.shape
    shifts = torch.arange(bits, dtype=torch.uint8)
    stream = ((codes.unsqueeze(-1) >> shifts) & 1).reshape(n, g * bits // 8, 8)
    return (stream << torch.arange(8, dtype=torch.uint8)).sum(-1, dtype=torch.uint8)


def unpack_codes(packed: Tensor, bits: int, group_size: int) -> Tensor:
    """Inverse of pack_codes: uint8 [N, G * bits / 8] -> uint8 [N, G]."""
    if bits == 8:
        return packed
    n = packed.shape[0]
    if 8 % bits == 0:  # 2 and 4 bits: whole codes per byte, lowest bits first; no bit stream needed
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        return ((packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).reshape(n, group_size)
    stream = ((packed.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(n, group_size, bits)
    return (stream << torch.arange(bits, dtype=torch.uint8)).sum(-1, dtype=torch.uint8)


def validate_format(bits: int, group_size: int, axis: str) -> None:
    require(bits in BITS, "bits", f"must be one of {BITS}, got {bits!r}")
    require(group_size in GROUP_SIZES, "group_size", f"must be one of {GROUP_SIZES}, got {group_size!r}")
    require(axis in AXES, "axis", f"must be one of {AXES}, got {axis!r}")


def quantize(x: Tensor, bits: int, group_size: int, axis: str = "token") -> QuantizedTensor:
    """Quantize x [T, H] (fp32/fp16/bf16, finite, |x| <= 65504). Axis "token" needs
    H % group_size == 0, axis "channel" T % group_size == 0 (a cache quantizes whole
    groups and keeps the rest in its full-precision window). Error per element is
    at most half a step (scale / 2) plus the fp16 rounding of the zero point."""
    validate_format(bits, group_size, axis)
    require(x.dim() == 2 and x.is_floating_point(), "x", f"expected a float [T, H] tensor, got {x.dtype} {tuple(x.shape)}")
    dim = 1 if axis == "token" else 0
    require(x.shape[dim] % group_size == 0, "x",
            f"{'hidden' if axis == 'token' else 'token'} size {x.shape[dim]} is not a multiple of group_size {group_size}")
    xf = x.float()
    require(bool(torch.isfinite(xf).all()) and (xf.numel() == 0 or float(xf.abs().max()) <= FP16_MAX), "x",
            "must be finite and within fp16 range (scales and zeros are fp16)")
    g = _grouped(xf, group_size, axis)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    levels = (1 << bits) - 1
    zero = lo.half()
    # The fp16 scale must still cover the range above the rounded zero.
    scale = ((hi - zero.float()) / levels).half()
    scale = torch.where(scale.float() * levels < hi - zero.float(), torch.nextafter(scale, scale.new_tensor(FP16_MAX)), scale)
    inv = torch.where(scale.float() > 0, 1.0 / scale.float(), 0.0)
    codes = torch.round((g - zero.float()) * inv).clamp_(0, levels).to(torch.uint8)
    return QuantizedTensor(pack_codes(codes, bits), scale.squeeze(-1), zero.squeeze(-1), bits, group_size, axis,
                           tuple(x.shape))


def dequantize(qt: QuantizedTensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """x̂ [T, H] in `dtype`."""
    codes = unpack_codes(qt.codes, qt.bits, qt.group_size).float()
    g = codes * qt.scale.float().unsqueeze(-1) + qt.zero.float().unsqueeze(-1)
    return _ungrouped(g, qt.shape, qt.group_size, qt.axis).to(dtype)
