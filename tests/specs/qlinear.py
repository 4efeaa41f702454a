"""Harness spec for qlinear: products with GGUF block weights (Q4_0, Q4_1, Q8_0).

Weights are real GGUF bytes (gguf.quants.quantize of Gaussian matrices) packed by
forkdec.qweight.pack_gguf. The reference multiplies the exact fp32 activations; the
cpu backend first rounds them to int8 per block of 32 (scale max|x| / 127), as
llama.cpp does, which moves each output by about 0.5% of its typical size
(rms of the relative error ~ 1 / (127 * sqrt(12)) per element, averaging over K).
Tolerance: normwise relative error <= 2e-2 (4x that) and every element within 6%
of the output's largest magnitude, plus one rounding to a half dtype.
"""
from __future__ import annotations

import numpy as np
import torch

import forkdec
from forkdec import reference
from forkdec.ops.qlinear import BACKENDS
from forkdec.qweight import pack_gguf
from harness import SPECS, Case, OpSpec

GGML = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 8}


def gguf_weight(qtype: str, n: int, k: int, g: torch.Generator):
    """A packed QuantizedWeight quantized from a Gaussian [n, k] matrix by gguf's own quantizer."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    w = (torch.randn(n, k, generator=g) * 0.05).numpy()
    raw = quantize(w, GGMLQuantizationType(GGML[qtype]))
    return pack_gguf(np.ascontiguousarray(raw), GGML[qtype], (n, k), name=f"test.{qtype}")


def _case(id, qtype, x_shape, n, view=None, bias=False, out_dtype=None, triton=True):
    def make(dtype, g):
        x = torch.randn(x_shape, generator=g).to(dtype)
        if view is not None:
            x = view(x)
        k = x.shape[-1]
        kwargs = {"out_dtype": out_dtype}
        if bias:
            kwargs["bias"] = torch.randn(n, generator=g).to(dtype)
        return (x, gguf_weight(qtype, n, k, g)), kwargs
    return Case(id, make, triton=triton)


CASES = [
    _case("decode_q4_1_1x960x576", "Q4_1", (1, 576), 960, triton=False),
    _case("decode_q8_0_lm_head_2x700x576_fp32_out", "Q8_0", (2, 576), 700, out_dtype=torch.float32, triton=False),
    _case("batch_q4_0_32x96x1536", "Q4_0", (32, 1536), 96, triton=False),
    _case("prefill_q4_1_70x64x256", "Q4_1", (70, 256), 64, triton=False),
    _case("q4_0_5x33x96_tail3", "Q4_0", (5, 96), 33),
    _case("q4_1_3x17x64_tail2", "Q4_1", (3, 64), 17),
    _case("q8_0_2x9x160_tail1", "Q8_0", (2, 160), 9),
    _case("q8_0_4x40x128_bias", "Q8_0", (4, 128), 40, bias=True),
    _case("q4_1_3d_2x3x128", "Q4_1", (2, 3, 128), 24),
    _case("q4_1_strided_rows", "Q4_1", (6, 256), 20, view=lambda x: x[::2]),
    _case("q4_0_transposed", "Q4_0", (64, 5), 8, view=lambda x: x.t()),
    _case("q8_0_rows0", "Q8_0", (0, 64), 8),
]


def compare(out, ref, dtype):
    assert out.dtype == ref.dtype and out.shape == ref.shape, (out.dtype, ref.dtype, out.shape, ref.shape)
    if out.numel() == 0:
        return
    a, b = out.float(), ref.float()
    half = 0.0 if out.dtype == torch.float32 else (8e-3 if out.dtype == torch.bfloat16 else 1e-3)
    rel = (a - b).norm() / b.norm().clamp_min(1e-30)
    assert rel <= 2e-2 + half, f"normwise relative error {rel:.3g}"
    worst = (a - b).abs().max() / b.abs().max().clamp_min(1e-30)
    assert worst <= 6e-2 + 2 * half, f"largest error {worst:.3g} of max|ref|"


SPECS.append(OpSpec("qlinear", forkdec.ops.qlinear, reference.qlinear, BACKENDS, CASES, compare))
