"""Linear layers on GGUF block-quantized weights (Q4_0, Q4_1, Q8_0), as stored.

    w = pack_gguf(raw_bytes, ggml_type, (n, k), name="blk.0.ffn_up.weight")   # once, at load
    y = qlinear(x, w)                                                         # x [..., k] -> [..., n]

Backends: reference (dequantize, fp32 matmul), cpu (activations quantized per block of
32 to int8 inside the op, integer dot products: VNNI, or AVX2/AVX-512BW; threads over
output features), triton (weight-only: activations stay float, the weights are
dequantized inside the kernel). The cpu backend's activation rounding makes each
output differ from the exact product by at most sum_b (d_x,b / 2) * sum |w_b|
(d_x,b = max|x_b| / 127, the block's scale): about 0.5% of a typical output.
"""
from __future__ import annotations

import torch
from torch import Tensor

from forkdec import _extension, reference
from forkdec.backends import resolve
from forkdec.qweight import QuantizedWeight, concat_rows, dequantize, pack_gguf
from forkdec.validation import require, validation_enabled

__all__ = ["QuantizedWeight", "concat_rows", "dequantize", "pack_gguf", "qlinear"]

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BACKENDS = ("reference", "cpu", "triton")


def qlinear(x: Tensor, weight: QuantizedWeight, bias: Tensor | None = None, *,
            out_dtype: torch.dtype | None = None, backend: str = "auto") -> Tensor:
    """x [..., K] (fp32/fp16/bf16, any strides) times a packed weight [N, K] transposed,
    plus bias [N] if given -> [..., N] in out_dtype (x's dtype when None)."""
    if validation_enabled():
        _validate(x, weight, bias, out_dtype)
    name = resolve(backend, "qlinear", x.device, BACKENDS)
    if name == "reference":
        return reference.qlinear(x, weight, bias, out_dtype)
    op = torch.ops.forkdec.qlinear_triton if name == "triton" else torch.ops.forkdec.qlinear
    return op(x, weight.codes, weight.scale, weight.offset, weight.bits, weight.k, weight.n, bias, out_dtype)


def _validate(x: Tensor, weight: QuantizedWeight, bias: Tensor | None, out_dtype: torch.dtype | None) -> None:
    require(isinstance(weight, QuantizedWeight), "weight",
            f"expected a QuantizedWeight (forkdec.ops.qlinear.pack_gguf), got {type(weight).__name__}")
    require(isinstance(x, Tensor), "x", f"expected a tensor, got {type(x).__name__}")
    require(x.dtype in DTYPES, "x", f"dtype {x.dtype} is not supported; expected fp32, fp16 or bf16")
    require(x.dim() >= 1 and x.shape[-1] == weight.k, "x", f"must be [..., {weight.k}], got {tuple(x.shape)}")
    require(weight.device == x.device, "weight", f"is on {weight.device}, x on {x.device}")
    if bias is not None:
        require(isinstance(bias, Tensor) and tuple(bias.shape) == (weight.shape[0],) and bias.dtype in DTYPES
                and bias.device == x.device, "bias", f"must be a float tensor [{weight.shape[0]}] on {x.device}")
    require(out_dtype is None or out_dtype in DTYPES, "out_dtype", f"must be fp32, fp16 or bf16, got {out_dtype}")


def _fake(x: Tensor, codes: Tensor, scale: Tensor, offset: Tensor, bits: int, k: int, n: int, bias: Tensor | None,
          out_dtype: torch.dtype | None) -> Tensor:
    return x.new_empty((*x.shape[:-1], n), dtype=out_dtype or x.dtype)


if _extension.load() is not None:
    torch.library.register_fake("forkdec::qlinear")(_fake)


@torch.library.custom_op("forkdec::qlinear_triton", mutates_args=())
def _qlinear_triton(x: Tensor, codes: Tensor, scale: Tensor, offset: Tensor, bits: int, k: int, n: int,
                    bias: Tensor | None, out_dtype: torch.dtype | None) -> Tensor:
    from forkdec.triton_kernels.qlinear import qlinear_rows

    out = _fake(x, codes, scale, offset, bits, k, n, bias, out_dtype)
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if x2.shape[0] and n:
        qlinear_rows(x2, codes, scale, offset, bits, k, None if bias is None else bias.float().contiguous(),
                     out.view(-1, n))
    return out


_qlinear_triton.register_fake(_fake)
