"""ContiguousAttention: a single-sequence causal `attend` for LlamaModel, without an engine.

Each layer's K/V live in one growing buffer viewed as a single page
([1, capacity, Hkv, D]), so `forkdec.ops.attention` runs on it unchanged.
Used by tests, examples and greedy decoding of one sequence.
"""
from __future__ import annotations

import torch
from torch import Tensor

from forkdec.ops.attention import attention


class ContiguousAttention:
    """Causal attention for one sequence whose tokens arrive in order.

    Call it as `attend(layer, q, k, v)`: the T new tokens' k/v [T, Hkv, D] are
    appended after the ones already held, and q [T, Hq, D] attends causally to
    all of them. Layer 0 advances the length; every layer must be called once
    per forward, in order. `reset()` forgets the sequence.
    """

    def __init__(self, num_layers: int, *, backend: str = "auto", initial_capacity: int = 256) -> None:
        self.num_layers = num_layers
        self.backend = backend
        self.length = 0  # tokens held before the current forward
        self._new = 0
        self._capacity = initial_capacity
        self._k: list[Tensor | None] = [None] * num_layers
        self._v: list[Tensor | None] = [None] * num_layers

    def reset(self) -> None:
        self.length, self._new = 0, 0
        self._k = [None] * self.num_layers
        self._v = [None] * self.num_layers

    def _ensure(self, layer: int, like: Tensor, needed: int) -> None:
        buf = self._k[layer]
        if buf is not None and buf.shape[1] >= needed:
            return
        capacity = max(self._capacity, needed)
        while capacity < needed:
            capacity *= 2
        if buf is not None and buf.shape[1] < needed:
            capacity = max(capacity, 2 * buf.shape[1])
        shape = (1, capacity, like.shape[1], like.shape[2])
        k = torch.zeros(shape, dtype=like.dtype, device=like.device)
        v = torch.zeros(shape, dtype=like.dtype, device=like.device)
        if buf is not None:
            k[:, : self.length] = buf[:, : self.length]
            v[:, : self.length] = self._v[layer][:, : self.length]
        self._k[layer], self._v[layer] = k, v
        self._capacity = max(self._capacity, capacity)

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if layer == 0:
            self.length += self._new  # the previous forward's tokens are now history
            self._new = k.shape[0]
        start, t = self.length, k.shape[0]
        total = start + t
        self._ensure(layer, k, total)
        self._k[layer][0, start:total] = k
        self._v[layer][0, start:total] = v
        if t == 0:
            return q.new_zeros(q.shape)
        dev = q.device
        qo_indptr = torch.tensor([0, t], dtype=torch.int32, device=dev)
        kv_indptr = torch.tensor([0, 1], dtype=torch.int32, device=dev)
        kv_indices = torch.zeros(1, dtype=torch.int32, device=dev)
        last = torch.tensor([total], dtype=torch.int32, device=dev)
        # Only the filled prefix: the page is `total` tokens long as far as the kernel knows.
        k_cache = self._k[layer][:, :total]
        v_cache = self._v[layer][:, :total]
        return attention(q.contiguous(), qo_indptr, k_cache, v_cache, kv_indptr, kv_indices, last,
                         causal=True, backend=self.backend)

    @property
    def num_tokens(self) -> int:
        """Tokens held, including the latest forward's."""
        return self.length + self._new


def contiguous_attend(num_layers: int, *, backend: str = "auto") -> ContiguousAttention:
    """A fresh single-sequence causal `attend` (see ContiguousAttention)."""
    return ContiguousAttention(num_layers, backend=backend)
