"""Tree verification over a quantized cache: the pieces QuantizedKVCache needs.

A verification step feeds each path's root and draft nodes; they are the newest
tokens of the path, so they sit in its full-precision window. Every tree query
sees all tokens cached before the step (quantized or in the window) and, among
the step's own tokens, what the tree mask allows. For the X-caching families
the cache attends to the step's own tokens as a separate part: their K and V
are rebuilt from the window rows at their true positions (root + depth; the
slots they occupy are consecutive, their positions are not) and attended with
the mask's columns over them; everything older is attended as in a decode step,
unmasked. KIVI caches K after RoPE, so its window part simply takes the mask's
columns over the window.
"""
from __future__ import annotations

import torch
from torch import Tensor

from forkdec.reference.xquant import rotate_half_rope
from forkdec.validation import require, validation_enabled


def unpack_bits(mask: Tensor, numel: int) -> Tensor:
    """A flat mask, bool or bit-packed uint8 (little bit order, forkdec.tree.pack_bits), as numel bools."""
    if mask.dtype == torch.bool:
        return mask.reshape(-1)
    shifts = torch.arange(8, dtype=torch.uint8, device=mask.device)
    return ((mask.reshape(-1, 1) >> shifts) & 1).reshape(-1)[:numel].bool()


def mask_columns(mask: Tensor, qo_lens: list[int], kv_lens: list[int], first: list[int]) -> Tensor:
    """Request b's columns first[b]: of a tree-masked level's custom mask, as one flat bool mask.

    Request b has qo_lens[b] queries and kv_lens[b] keys, its last qo_lens[b] keys being
    the step's own tokens. With validation on, every query must see every older key
    (ValueError naming `levels` otherwise): the parts before first[b] are attended unmasked.
    """
    flat = unpack_bits(mask, sum(q * k for q, k in zip(qo_lens, kv_lens)))
    blocks, offset = [], 0
    for q, k, f in zip(qo_lens, kv_lens, first):
        block = flat[offset:offset + q * k].view(q, k)
        offset += q * k
        if validation_enabled():
            require(bool(block[:, :k - q].all()), "levels",
                    "a quantized cache's custom mask must let every query see the tokens cached before the step")
        blocks.append(block[:, f:].reshape(-1))
    return torch.cat(blocks) if blocks else torch.zeros(0, dtype=torch.bool)


def slot_positions(positions: Tensor, qo_indptr: Tensor) -> Tensor:
    """Positions the step's slots stand for once a path's tokens are consecutive: request b's
    j-th row (its slot follows the previous row's) gets the position of its first row plus j.
    Page start positions are set from these, so accepted nodes, moved to the slots after the root,
    have the positions plain decoding gives them; tree nodes' own positions (root + depth) differ."""
    counts = (qo_indptr[1:] - qo_indptr[:-1]).long()
    first = torch.repeat_interleave(qo_indptr[:-1].long(), counts)
    return positions[first] + torch.arange(positions.numel()) - first


def rope_keys(x: Tensor, w: Tensor, bias: Tensor | None, cos: Tensor, sin: Tensor, head_dim: int) -> Tensor:
    """K = RoPE(x · w + bias) [T, Hkv, D] fp32 at the positions of cos/sin [T, D]: what
    xquant_attention rematerializes from a window row."""
    y = x.float() @ w + (0 if bias is None else bias)
    return rotate_half_rope(y.view(x.shape[0], -1, head_dim), cos, sin)


def values(x: Tensor, w: Tensor, bias: Tensor | None, head_dim: int) -> Tensor:
    """V = x · w + bias [T, Hkv, D] fp32."""
    y = x.float() @ w + (0 if bias is None else bias)
    return y.view(x.shape[0], -1, head_dim)
