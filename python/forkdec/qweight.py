"""QuantizedWeight: a matrix in one of GGUF's block formats, packed for the qlinear kernels.

GGUF stores a [N, K] matrix as N rows of K/32 blocks; each block holds 32 codes and
fp16 constants (Q4_0: d, value = (q - 8) d; Q4_1: d, m, value = q d + m; Q8_0: d,
value = q d with signed q). `pack_gguf` rearranges the stored bytes once, without
changing any value:
- rows are padded to k_padded, a multiple of 128 (a "superblock" of 4 blocks), with
  zero blocks;
- inside a superblock the 32-element chunks run in the order of blocks 0, 2, 1, 3, so
  that a 64-byte vector of 4-bit codes carries chunks 0-1 in its low nibbles and 2-3
  in its high nibbles (byte i = code[i] | code[64 + i] << 4); 8-bit codes are stored
  in chunk order as unsigned q + 128;
- each chunk has an fp32 scale d and offset c with value = code * d + c
  (Q4_0: c = -8 d, Q4_1: c = m, Q8_0: c = -128 d), in chunk order.
The layout is described for the C++ side in csrc/cpu/qlinear.h.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

BLOCK = 32
SUPERBLOCK = 128
# ggml type id -> (name, bits, bytes per block)
FORMATS = {2: ("Q4_0", 4, 18), 3: ("Q4_1", 4, 20), 8: ("Q8_0", 8, 34)}
_CHUNK_ORDER = [0, 2, 1, 3]  # block of each chunk within a superblock (its own inverse)


def ggml_type_name(ggml_type: int) -> str:
    """'Q4_K', 'F16', ... for a ggml type id (the id itself if gguf does not know it)."""
    try:
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType(int(ggml_type)).name
    except (ImportError, ValueError):
        return str(ggml_type)


def supported(ggml_type: int) -> bool:
    return int(ggml_type) in FORMATS


@dataclass
class QuantizedWeight:
    """A packed [n, k] matrix (module docstring).

    codes uint8 [n, k_padded * bits / 8], scale and offset fp32 [n, k_padded / 32];
    qtype: 'Q4_0', 'Q4_1' or 'Q8_0'; k: the logical input width (a multiple of 32).
    """
    codes: Tensor
    scale: Tensor
    offset: Tensor
    bits: int
    k: int
    qtype: str

    @property
    def shape(self) -> tuple[int, int]:
        return (self.codes.shape[0], self.k)

    @property
    def k_padded(self) -> int:
        return self.scale.shape[1] * BLOCK

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def nbytes(self) -> int:
        """Bytes a full product reads: codes plus constants (padding excluded)."""
        n, k = self.shape
        return n * (k * self.bits // 8 + 2 * (k // BLOCK) * 4)

    def rows(self, index: Tensor) -> "QuantizedWeight":
        """The rows `index` (int64 [r]) as a new QuantizedWeight (rows are independent)."""
        return QuantizedWeight(self.codes[index].contiguous(), self.scale[index].contiguous(),
                               self.offset[index].contiguous(), self.bits, self.k, self.qtype)

    def __getitem__(self, rows) -> Tensor:
        """fp32 values of the rows `rows` (a slice or an index tensor), for code that
        reads part of a matrix the way it would index a dense one."""
        index = torch.arange(self.codes.shape[0], device=self.device)[rows]
        return dequantize(self, index.reshape(-1)).reshape(*index.shape, self.k)

    def to(self, device: torch.device | str) -> "QuantizedWeight":
        return QuantizedWeight(self.codes.to(device), self.scale.to(device), self.offset.to(device), self.bits,
                               self.k, self.qtype)


def concat_rows(weights: list[QuantizedWeight]) -> QuantizedWeight:
    """Stack matrices of one format and width along n (fused q/k/v, gate/up)."""
    first = weights[0]
    if any(w.bits != first.bits or w.k != first.k or w.qtype != first.qtype for w in weights):
        raise ValueError("weights: concat_rows needs one format and one width, got "
                         + ", ".join(f"{w.qtype} [{w.shape[0]}, {w.k}]" for w in weights))
    return QuantizedWeight(torch.cat([w.codes for w in weights]), torch.cat([w.scale for w in weights]),
                           torch.cat([w.offset for w in weights]), first.bits, first.k, first.qtype)


def pack_gguf(raw: np.ndarray | Tensor, ggml_type: int, shape: tuple[int, int], name: str = "weight") -> QuantizedWeight:
    """Pack the stored bytes of a GGUF matrix (uint8 [n, k / 32 * block bytes], as
    gguf's reader returns them) of shape (n, k). Raises ValueError naming `name` and
    the type for a format without kernels or bytes that do not fit the shape."""
    ggml_type = int(ggml_type)
    if ggml_type not in FORMATS:
        raise ValueError(f"{name}: GGUF type {ggml_type_name(ggml_type)} has no qlinear kernel "
                         f"(supported: {', '.join(f[0] for f in FORMATS.values())})")
    qtype, bits, block_bytes = FORMATS[ggml_type]
    n, k = int(shape[0]), int(shape[1])
    if k <= 0 or k % BLOCK:
        raise ValueError(f"{name}: {qtype} rows must hold a positive multiple of {BLOCK} values, got {k}")
    data = torch.from_numpy(np.array(raw, dtype=np.uint8, copy=True)) if isinstance(raw, np.ndarray) else raw
    nb = k // BLOCK
    if data.dtype != torch.uint8 or data.numel() != n * nb * block_bytes:
        raise ValueError(f"{name}: expected {n * nb * block_bytes} bytes of {qtype} for shape ({n}, {k}), "
                         f"got {data.numel()} of {data.dtype}")
    blocks = data.reshape(n, nb, block_bytes)
    d = blocks[..., 0:2].contiguous().view(torch.float16).float().reshape(n, nb)
    if qtype == "Q8_0":
        codes = blocks[..., 2:].contiguous() ^ 0x80  # signed q -> unsigned q + 128
        offset = -128.0 * d
    else:
        qs = blocks[..., 4:] if qtype == "Q4_1" else blocks[..., 2:]
        codes = torch.cat([qs & 0x0F, qs >> 4], dim=-1)  # element i: low nibble of byte i, i + 16: high
        offset = blocks[..., 2:4].contiguous().view(torch.float16).float().reshape(n, nb) if qtype == "Q4_1" \
            else -8.0 * d
    kp = -(-k // SUPERBLOCK) * SUPERBLOCK
    pad = kp // BLOCK - nb
    codes = torch.nn.functional.pad(codes, (0, 0, 0, pad))
    d, offset = (torch.nn.functional.pad(t, (0, pad)) for t in (d, offset))
    order = torch.tensor(_CHUNK_ORDER)
    codes = codes.reshape(n, kp // SUPERBLOCK, 4, BLOCK)[:, :, order].reshape(n, kp // SUPERBLOCK, 128)
    d = d.reshape(n, -1, 4)[:, :, order].reshape(n, -1).contiguous()
    offset = offset.reshape(n, -1, 4)[:, :, order].reshape(n, -1).contiguous()
    if bits == 4:
        codes = codes[..., :64] | (codes[..., 64:] << 4)
    return QuantizedWeight(codes.reshape(n, -1).contiguous(), d, offset, bits, k, qtype)


def dequantize(weight: QuantizedWeight, rows: Tensor | None = None) -> Tensor:
    """fp32 [n, k] values of a packed matrix (or of its rows `rows`, int64 [r] -> [r, k])."""
    codes, d, c = weight.codes, weight.scale, weight.offset
    if rows is not None:
        codes, d, c = codes[rows], d[rows], c[rows]
    n, kp = codes.shape[0], weight.k_padded
    codes = codes.reshape(n, kp // SUPERBLOCK, -1)
    if weight.bits == 4:
        codes = torch.cat([codes & 0x0F, codes >> 4], dim=-1)
    values = codes.reshape(n, -1, BLOCK).float() * d[..., None] + c[..., None]
    order = torch.tensor(_CHUNK_ORDER, device=values.device)
    values = values.reshape(n, kp // SUPERBLOCK, 4, BLOCK)[:, :, order].reshape(n, kp)
    return values[:, : weight.k]
