"""QuantizedWeight: a matrix in one of GGUF's block formats, packed for the qlinear kernels.

GGUF stores a [N, K] matrix as N rows of K/32 blocks; each block holds 32 codes and
fp16 constants (Q4_0: d, value = (q - 8) d; Q4_1: d, m, value = q d + m; Q8_0: d,
value = q d with signed q). `pack_gguf` rearranges the stored bytes once, without
changing any value, into tiles of 16 output features (rows) so that one 64-byte
vector holds 4 consecutive codes of each of 16 features: an integer dot product
(VNNI vpdpbusd) of that vector with 4 activation codes broadcast to every lane then
advances 16 outputs at once, and a block's scaling is one fp32 multiply-add per 16
outputs. Per tile t (features 16t .. 16t + 15; features past N are zeros) and block b:
- codes, uint8: 4-bit formats 4 vectors v of 64 bytes, byte 4f + e of vector v holding
  code[f, 4v + e] in its low nibble and code[f, 16 + 4v + e] in its high nibble
  (256 bytes); Q8_0 8 vectors g, byte 4f + e = code[f, 4g + e] (512 bytes). Codes are
  unsigned: 4-bit q in 0..15, 8-bit q + 128.
- scale d and offset c, fp16, 16 each (feature order), with value = code * d + c
  (Q4_0: c = -8 d, Q4_1: c = m, Q8_0: c = -128 d): GGUF's own fp16 constants.
The layout is described for the C++ side in csrc/cpu/qlinear.h.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

BLOCK = 32  # elements per GGUF block
TILE = 16  # output features per packed tile
# ggml type id -> (name, bits, bytes per block)
FORMATS = {2: ("Q4_0", 4, 18), 3: ("Q4_1", 4, 20), 8: ("Q8_0", 8, 34)}


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

    codes uint8 [tiles, k / 32 * 16 * 32 * bits / 8], scale and offset fp16
    [tiles, k / 32 * 16] with tiles = ceil(n / 16); qtype: 'Q4_0', 'Q4_1' or 'Q8_0';
    k: the input width (a multiple of 32); n: the output features.
    """
    codes: Tensor
    scale: Tensor
    offset: Tensor
    bits: int
    k: int
    qtype: str
    n: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.k)

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def nbytes(self) -> int:
        """Bytes a full product reads: codes plus fp16 constants (padding features excluded)."""
        return self.n * (self.k * self.bits // 8 + 2 * (self.k // BLOCK) * 2)

    def rows(self, index: Tensor) -> "QuantizedWeight":
        """The rows `index` (int64 [r]) as a new QuantizedWeight (rows are independent)."""
        return _tiled(*_blocks(self, index), self.bits, self.k, self.qtype)

    def __getitem__(self, rows) -> Tensor:
        """fp32 values of the rows `rows` (a slice or an index tensor), for code that
        reads part of a matrix the way it would index a dense one."""
        index = torch.arange(self.n, device=self.device)[rows]
        return dequantize(self, index.reshape(-1)).reshape(*index.shape, self.k)

    def to(self, device: torch.device | str) -> "QuantizedWeight":
        return QuantizedWeight(self.codes.to(device), self.scale.to(device), self.offset.to(device), self.bits,
                               self.k, self.qtype, self.n)


def _tiled(codes: Tensor, d: Tensor, c: Tensor, bits: int, k: int, qtype: str) -> QuantizedWeight:
    """Tile per-row blocks (codes uint8 [n, k / 32, 32] in element order, d and c fp16
    [n, k / 32]) into the packed layout."""
    n, nb = codes.shape[0], k // BLOCK
    tiles = -(-n // TILE)
    pad = tiles * TILE - n
    codes = torch.nn.functional.pad(codes, (0, 0, 0, 0, 0, pad))
    d, c = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (d, c))
    codes = codes.reshape(tiles, TILE, nb, BLOCK)
    if bits == 4:  # element i and i + 16 share a byte; vector v holds elements 4v .. 4v + 3
        codes = codes[..., :16] | (codes[..., 16:] << 4)
    groups = codes.shape[-1] // 4
    codes = codes.reshape(tiles, TILE, nb, groups, 4).permute(0, 2, 3, 1, 4)  # [tiles, nb, vector, feature, 4]
    consts = [t.reshape(tiles, TILE, nb).transpose(1, 2).reshape(tiles, nb * TILE).contiguous() for t in (d, c)]
    return QuantizedWeight(codes.reshape(tiles, -1).contiguous(), consts[0], consts[1], bits, k, qtype, n)


def _blocks(weight: QuantizedWeight, rows: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The inverse of _tiled for the rows `rows` (int64 [r], all when None): codes uint8
    [r, k / 32, 32] in element order, d and c fp16 [r, k / 32]."""
    nb = weight.k // BLOCK
    if rows is None:
        rows = torch.arange(weight.n, device=weight.device)
    tile, f = rows // TILE, rows % TILE
    tiles = weight.codes.shape[0]
    groups = weight.bits  # 64-byte vectors per block: 8 for Q8_0, 4 for the 4-bit formats
    codes = weight.codes.reshape(tiles, nb, groups, TILE, 4)[tile, :, :, f, :]  # [r, nb, vector, 4]
    if weight.bits == 4:
        codes = torch.cat([(codes & 0x0F).reshape(-1, nb, 16), (codes >> 4).reshape(-1, nb, 16)], dim=-1)
    codes = codes.reshape(-1, nb, BLOCK)
    d, c = (t.reshape(tiles, nb, TILE)[tile, :, f] for t in (weight.scale, weight.offset))
    return codes, d, c


def concat_rows(weights: list[QuantizedWeight]) -> QuantizedWeight:
    """Stack matrices of one format and width along n (fused q/k/v, gate/up)."""
    first = weights[0]
    if any(w.bits != first.bits or w.k != first.k or w.qtype != first.qtype for w in weights):
        raise ValueError("weights: concat_rows needs one format and one width, got "
                         + ", ".join(f"{w.qtype} [{w.shape[0]}, {w.k}]" for w in weights))
    parts = [_blocks(w) for w in weights]
    return _tiled(*(torch.cat([p[i] for p in parts]) for i in range(3)), first.bits, first.k, first.qtype)


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
    d = blocks[..., 0:2].contiguous().view(torch.float16).reshape(n, nb)
    if qtype == "Q8_0":
        codes = blocks[..., 2:].contiguous() ^ 0x80  # signed q -> unsigned q + 128
        offset = (-128.0 * d.float()).half()
    else:
        qs = blocks[..., 4:] if qtype == "Q4_1" else blocks[..., 2:]
        codes = torch.cat([qs & 0x0F, qs >> 4], dim=-1)  # element i: low nibble of byte i, i + 16: high
        offset = blocks[..., 2:4].contiguous().view(torch.float16).reshape(n, nb) if qtype == "Q4_1" \
            else (-8.0 * d.float()).half()
    if bool((torch.isinf(offset) & torch.isfinite(d)).any()):
        raise ValueError(f"{name}: a {qtype} block scale is too large for its fp16 offset "
                         f"({'-128' if bits == 8 else '-8'} x scale overflows)")
    return _tiled(codes, d, offset, bits, k, qtype)


def dequantize(weight: QuantizedWeight, rows: Tensor | None = None) -> Tensor:
    """fp32 [n, k] values of a packed matrix (or of its rows `rows`, int64 [r] -> [r, k])."""
    codes, d, c = _blocks(weight, rows)
    values = codes.float() * d.float()[..., None] + c.float()[..., None]
    return values.reshape(codes.shape[0], weight.k)
