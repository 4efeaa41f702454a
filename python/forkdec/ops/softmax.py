"""Two-Pass Softmax (Dukhan & Ablavatski, arXiv 2001.04438).

Pass 1 sums exp(x_i) per row as a (mantissa, exponent) pair, so no running max
is formed and no finite input overflows; pass 2 recomputes and scales. The C++
CPU kernel also has the classic three-pass control (`softmax_three_pass`).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from forkdec import _extension, reference
from forkdec.backends import resolve
from forkdec.validation import require, validation_enabled

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BACKENDS = ("reference", "cpu", "triton", "cuda")


def softmax(x: Tensor, dim: int = -1, *, temperature: float | Tensor | None = None,
            backend: str = "auto") -> Tensor:
    """Softmax of `x / temperature` along `dim`, computed in two passes.

    x: any shape, fp32 / fp16 / bf16, any strides.
    temperature: None (1.0), a positive float, or a tensor with one positive value
        per row: shaped like `x` without `dim`, or flat in the row order of
        `x.movedim(dim, -1)`.
    Returns a new contiguous fp32 tensor shaped like `x`, equal to
    `torch.softmax(x.float() / temperature, dim)`: -inf entries give 0, a row of
    only -inf gives NaN, NaN propagates to its row. No finite input overflows.
    """
    if validation_enabled():
        _validate(x, dim, temperature)
    name = resolve(backend, "softmax", x.device, BACKENDS)
    if name == "reference":
        return reference.softmax(x, dim, temperature)
    scalar, rows = _split_temperature(temperature)
    if name == "triton":
        return torch.ops.forkdec.softmax_triton(x, dim, scalar, rows)
    return torch.ops.forkdec.softmax(x, dim, scalar, rows)


def softmax_three_pass(x: Tensor, dim: int = -1, *, temperature: float | Tensor | None = None) -> Tensor:
    """The three-pass CPU control (max, sum of exp, scale); same contract as `softmax`."""
    if validation_enabled():
        _validate(x, dim, temperature)
    resolve("cpu", "softmax_three_pass", x.device, ("cpu",))
    scalar, rows = _split_temperature(temperature)
    return torch.ops.forkdec.softmax_three_pass(x, dim, scalar, rows)


def _split_temperature(temperature: float | Tensor | None) -> tuple[float, Tensor | None]:
    if isinstance(temperature, Tensor):
        return 1.0, temperature.reshape(-1).float().contiguous()
    return (1.0 if temperature is None else float(temperature)), None


def _validate(x: Tensor, dim: int, temperature: float | Tensor | None) -> None:
    require(isinstance(x, Tensor), "x", f"expected a tensor, got {type(x).__name__}")
    require(x.dtype in DTYPES, "x", f"dtype {x.dtype} is not supported; expected one of fp32, fp16, bf16")
    ndim = max(x.dim(), 1)
    require(isinstance(dim, int) and -ndim <= dim < ndim, "dim",
            f"{dim} is out of range for a tensor with {x.dim()} dimensions")
    if temperature is None:
        return
    if isinstance(temperature, Tensor):
        rows = x.numel() // max(x.shape[dim], 1) if x.dim() else 1
        require(temperature.is_floating_point(), "temperature", f"tensor dtype {temperature.dtype} is not floating point")
        require(temperature.device == x.device, "temperature", f"is on {temperature.device}, x on {x.device}")
        require(temperature.numel() == rows, "temperature",
                f"needs one value per row ({rows} rows for x of shape {tuple(x.shape)} and dim {dim}), "
                f"got shape {tuple(temperature.shape)}")
        require(not bool(torch.isnan(temperature).any()), "temperature", "contains NaN")
        require(bool((temperature > 0).all()), "temperature", "must be positive")
        return
    require(isinstance(temperature, (int, float)) and not isinstance(temperature, bool), "temperature",
            f"expected a positive float or a tensor, got {type(temperature).__name__}")
    require(not math.isnan(temperature), "temperature", "is NaN")
    require(temperature > 0, "temperature", f"must be positive, got {temperature}")


# torch.compile support: fake (meta) implementations of the C++ ops.
def _softmax_fake(x: Tensor, dim: int, temperature: float, row_temperature: Tensor | None) -> Tensor:
    return torch.empty(x.shape, dtype=torch.float32, device=x.device)


if _extension.load() is not None:
    torch.library.register_fake("forkdec::softmax")(_softmax_fake)
    torch.library.register_fake("forkdec::softmax_three_pass")(_softmax_fake)


@torch.library.custom_op("forkdec::softmax_triton", mutates_args=())
def _softmax_triton(x: Tensor, dim: int, temperature: float, row_temperature: Tensor | None) -> Tensor:
    from forkdec.triton_kernels.softmax import softmax_rows

    moved = x.movedim(dim, -1) if x.dim() else x.reshape(1)
    out = torch.empty(moved.shape, dtype=torch.float32, device=x.device)
    cols = moved.shape[-1]
    rows = moved.numel() // cols if cols else 0
    if rows and cols:
        x2d = moved.reshape(rows, cols)  # a view when the rows have one stride
        if x2d.stride(-1) != 1:
            x2d = x2d.contiguous()
        inv_rows = None if row_temperature is None else row_temperature.reciprocal().contiguous()
        softmax_rows(x2d, 1.0 / temperature, inv_rows, out.view(rows, cols))
    return out.movedim(-1, dim).contiguous() if x.dim() else out.reshape(())


_softmax_triton.register_fake(_softmax_fake)
