"""A fast reader of GGUF metadata and tensor infos, over a memory map of the file.

gguf.GGUFReader builds a numpy view per string: on SmolLM2's 49k tokens and 49k
merges that took 4-12 s on the development machine, against well under a second
here. Dequantization is still the gguf package's (gguf.quants.dequantize).

Format (GGUF v2/v3, little-endian): magic "GGUF", version u32, tensor count u64,
key/value count u64; key/values (string key, u32 type, value); tensor infos
(string name, u32 n_dims, u64 dims[n_dims] innermost first, u32 ggml type, u64
offset); then the tensor data, aligned to `general.alignment` (default 32).
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

# GGUF value types -> struct format of one scalar; 8 is string, 9 array.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8",
          12: "<f8"}
_STRING, _ARRAY = 8, 9


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order: outermost first (the file lists innermost first)
    ggml_type: int
    offset: int  # absolute, in the file
    nbytes: int


class GGUFFile:
    """Metadata (`fields`: key -> int/float/bool/str/list) and tensors of a GGUF file.

    Raises ValueError naming the path when the file is missing, not GGUF, or cut short.
    `tensor_data(info)` gives a tensor's raw bytes as uint8 [rows, bytes per row].
    """

    def __init__(self, path: str) -> None:
        self.path = path
        if not os.path.isfile(path):
            raise ValueError(f"model: no such file {path!r}")
        with open(path, "rb") as f:
            try:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except ValueError as e:  # empty file
                raise ValueError(f"model: {path!r} is not a GGUF file ({e})") from e
        try:
            self._parse()
        except (struct.error, IndexError, UnicodeDecodeError, OverflowError, KeyError) as e:
            raise ValueError(f"model: {path!r} is not a readable GGUF file "
                             f"(truncated or corrupt metadata: {type(e).__name__}: {e})") from e

    def _parse(self) -> None:
        import gguf

        buf, path = self._map, self.path
        if buf[:4] != b"GGUF":
            raise ValueError(f"model: {path!r} is not a GGUF file (bad magic {bytes(buf[:4])!r})")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        if version not in (2, 3):
            raise ValueError(f"model: {path!r} has GGUF version {version}; versions 2 and 3 are supported")
        pos = 24
        # Counts come from the file: bound them by its size before looping.
        if n_kv > len(buf) or n_tensors > len(buf):
            raise ValueError(f"model: {path!r} is corrupt (counts {n_kv} key/values, {n_tensors} tensors)")
        self.fields: dict[str, Any] = {}
        for _ in range(n_kv):
            key, pos = self._string(pos)
            (kind,), pos = struct.unpack_from("<I", buf, pos), pos + 4
            self.fields[key], pos = self._value(kind, pos)
        infos = []
        for _ in range(n_tensors):
            name, pos = self._string(pos)
            (n_dims,), pos = struct.unpack_from("<I", buf, pos), pos + 4
            if n_dims > 8:
                raise ValueError(f"model: {path!r} is corrupt (tensor {name!r} has {n_dims} dims)")
            dims = struct.unpack_from(f"<{n_dims}Q", buf, pos)
            pos += 8 * n_dims
            kind, offset = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            infos.append((name, dims, kind, offset))
        align = int(self.fields.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT))
        start = (pos + align - 1) // align * align
        size = len(buf)
        self.tensors: list[TensorInfo] = []
        for name, dims, kind, offset in infos:
            try:
                block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(kind)]
            except (ValueError, KeyError) as e:
                raise ValueError(f"model: tensor {name!r} in {path!r} has unknown ggml type {kind}") from e
            count = int(np.prod(dims, dtype=np.int64)) if dims else 1
            nbytes = count // block * type_size
            info = TensorInfo(name, tuple(int(d) for d in reversed(dims)), kind, start + offset, nbytes)
            if info.offset + nbytes > size:
                raise ValueError(f"model: {path!r} is truncated: tensor {name!r} ends at byte "
                                 f"{info.offset + nbytes}, the file has {size}")
            self.tensors.append(info)

    def _string(self, pos: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", self._map, pos)
        end = pos + 8 + n
        if end > len(self._map):
            raise IndexError(f"string of {n} bytes at {pos} runs past the end")
        return self._map[pos + 8:end].decode("utf-8"), end

    def _value(self, kind: int, pos: int) -> tuple[Any, int]:
        if kind in _SCALARS:
            fmt = _SCALARS[kind]
            return struct.unpack_from(fmt, self._map, pos)[0], pos + struct.calcsize(fmt)
        if kind == _STRING:
            return self._string(pos)
        if kind == _ARRAY:
            item, n = struct.unpack_from("<IQ", self._map, pos)
            pos += 12
            if item in _NUMPY:
                dt = np.dtype(_NUMPY[item])
                if pos + n * dt.itemsize > len(self._map):
                    raise IndexError(f"array of {n} items at {pos} runs past the end")
                values = np.frombuffer(self._map, dtype=dt, count=n, offset=pos).tolist()
                return values, pos + n * dt.itemsize
            if n > len(self._map):
                raise IndexError(f"array of {n} items at {pos} cannot fit")
            out = []
            for _ in range(n):
                v, pos = self._value(item, pos)
                out.append(v)
            return out, pos
        raise KeyError(f"unknown GGUF value type {kind} at byte {pos}")

    def field(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)

    def tensor_data(self, info: TensorInfo) -> np.ndarray:
        """Raw bytes of `info` as uint8 [rows, bytes per row] (what gguf.quants.dequantize takes)."""
        rows = int(np.prod(info.shape[:-1], dtype=np.int64)) if len(info.shape) > 1 else 1
        data = np.frombuffer(self._map, dtype=np.uint8, count=info.nbytes, offset=info.offset)
        return data.reshape(rows, info.nbytes // rows if rows else 0)
