"""Reference quantized linear layer: dequantize the stored weights, then an fp32 matmul."""
from __future__ import annotations

import torch
from torch import Tensor

from forkdec.qweight import QuantizedWeight, dequantize


def qlinear(x: Tensor, weight: QuantizedWeight, bias: Tensor | None = None,
            out_dtype: torch.dtype | None = None) -> Tensor:
    """x [..., K] @ dequantize(weight).T (+ bias) in fp32, rounded once to out_dtype
    (x's dtype when None). The activations are not quantized: this is the exact
    product the kernels approximate."""
    y = torch.nn.functional.linear(x.float(), dequantize(weight).to(x.device),
                                   None if bias is None else bias.float())
    return y.to(out_dtype or x.dtype)
