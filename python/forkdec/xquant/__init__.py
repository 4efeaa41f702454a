"""XQuant: cache low-bit layer inputs X, rematerialize K and V in attention (arXiv 2508.10395)."""
from forkdec.xquant.latent import latent_factors
from forkdec.xquant.quantize import (AXES, BITS, GROUP_SIZES, QuantizedTensor, dequantize, pack_codes, quantize,
                                     unpack_codes)

__all__ = ["AXES", "BITS", "GROUP_SIZES", "latent_factors", "QuantizedTensor", "dequantize", "pack_codes", "quantize", "unpack_codes"]
