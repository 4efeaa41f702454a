"""Reference attention over a paged KV cache, state merging and cascades.

Plain PyTorch, one request at a time, fp32 accumulation: obviously correct,
never fast. Conventions (docs/attention.md): NHD layout, pages
[num_pages, page_size, Hkv, D], ragged queries by qo_indptr, LSE in natural log.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class PageTable:
    """Which pages hold each request's KV: pages kv_indices[kv_indptr[b]:kv_indptr[b+1]],
    all full except the last, which holds kv_last_page_len[b] tokens."""
    kv_indptr: Tensor        # [B + 1] int32
    kv_indices: Tensor       # [nnz_pages] int32
    kv_last_page_len: Tensor  # [B] int32

    def kv_len(self, b: int, page_size: int) -> int:
        pages = int(self.kv_indptr[b + 1] - self.kv_indptr[b])
        return 0 if pages == 0 else (pages - 1) * page_size + int(self.kv_last_page_len[b])

    def gather(self, cache: Tensor, b: int) -> Tensor:
        """[kv_len, Hkv, D] keys (or values) of request b, in token order."""
        pages = self.kv_indices[int(self.kv_indptr[b]):int(self.kv_indptr[b + 1])].long()
        return cache[pages].reshape(-1, *cache.shape[2:])[: self.kv_len(b, cache.shape[1])]


def unpack_mask(custom_mask: Tensor, numel: int) -> Tensor:
    """Bool mask from either a bool mask or its little-bit-order uint8 packing
    (bit i of the flattened mask is bit i % 8 of byte i // 8)."""
    if custom_mask.dtype == torch.bool:
        return custom_mask.reshape(-1)
    bits = (custom_mask.reshape(-1, 1).to(torch.int32) >> torch.arange(8, device=custom_mask.device)) & 1
    return bits.reshape(-1)[:numel].bool()


def attention(q: Tensor, qo_indptr: Tensor, k_cache: Tensor, v_cache: Tensor, kv_indptr: Tensor,
              kv_indices: Tensor, kv_last_page_len: Tensor, *, causal: bool = False,
              custom_mask: Tensor | None = None, sm_scale: float | None = None,
              return_lse: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Attention of ragged queries over paged KV; see forkdec.ops.attention."""
    total_q, hq, d = q.shape
    hkv = k_cache.shape[2]
    scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    table = PageTable(kv_indptr, kv_indices, kv_last_page_len)
    out = torch.zeros(total_q, hq, d, dtype=torch.float32, device=q.device)
    lse = torch.full((total_q, hq), -math.inf, dtype=torch.float32, device=q.device)
    mask_offset = 0
    mask = None
    if custom_mask is not None:
        sizes = [(int(qo_indptr[b + 1] - qo_indptr[b]), table.kv_len(b, k_cache.shape[1]))
                 for b in range(qo_indptr.numel() - 1)]
        mask = unpack_mask(custom_mask, sum(a * c for a, c in sizes))
    for b in range(qo_indptr.numel() - 1):
        q0, q1 = int(qo_indptr[b]), int(qo_indptr[b + 1])
        k = table.gather(k_cache, b).float().repeat_interleave(hq // hkv, dim=1)  # [kv, Hq, D]
        v = table.gather(v_cache, b).float().repeat_interleave(hq // hkv, dim=1)
        qo_len, kv_len = q1 - q0, k.shape[0]
        visible = torch.ones(qo_len, kv_len, dtype=torch.bool, device=q.device)
        if causal:
            i = torch.arange(qo_len, device=q.device).unsqueeze(1)
            j = torch.arange(kv_len, device=q.device).unsqueeze(0)
            visible &= j <= kv_len - qo_len + i
        if mask is not None:
            visible &= mask[mask_offset: mask_offset + qo_len * kv_len].reshape(qo_len, kv_len)
            mask_offset += qo_len * kv_len
        if qo_len == 0 or kv_len == 0:
            continue
        s = torch.einsum("qhd,khd->hqk", q[q0:q1].float(), k) * scale
        s = s.masked_fill(~visible, -math.inf)
        row_lse = torch.logsumexp(s, dim=-1)                      # [Hq, qo]
        p = torch.exp(s - row_lse.unsqueeze(-1)).nan_to_num(0.0)  # rows with no key: all 0
        out[q0:q1] = torch.einsum("hqk,khd->qhd", p, v)
        lse[q0:q1] = row_lse.transpose(0, 1)
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out


def merge_state(o_a: Tensor, lse_a: Tensor, o_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """Merge two attention states over disjoint key sets; see forkdec.ops.merge_state."""
    o, lse = merge_states(torch.stack([o_a, o_b], dim=1), torch.stack([lse_a, lse_b], dim=1))
    return o.to(o_a.dtype), lse


def merge_states(o: Tensor, lse: Tensor) -> tuple[Tensor, Tensor]:
    """Merge n states: o [T, n, H, D], lse [T, n, H] -> ([T, H, D] in o's dtype, [T, H] fp32)."""
    lse = lse.float()
    merged = torch.logsumexp(lse, dim=1)                               # -inf where every side is empty
    weight = torch.exp(lse - merged.unsqueeze(1)).nan_to_num(0.0)      # [T, n, H]
    out = (o.float() * weight.unsqueeze(-1)).sum(dim=1)
    return out.to(o.dtype), merged


def cascade_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, levels: list, *,
                      sm_scale: float | None = None,
                      return_lse: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Attention over the union of each query's keys across levels, level by level,
    merged by LSE; see forkdec.ops.cascade_attention."""
    states = [attention(q, lv.qo_indptr, k_cache, v_cache, lv.kv_indptr, lv.kv_indices,
                        lv.kv_last_page_len, causal=lv.causal, custom_mask=lv.custom_mask,
                        sm_scale=sm_scale, return_lse=True) for lv in levels]
    o = torch.stack([s[0].float() for s in states], dim=1)
    lse = torch.stack([s[1] for s in states], dim=1)
    out, merged = merge_states(o, lse)
    out = out.to(q.dtype)
    return (out, merged) if return_lse else out


def append_kv(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, slots: Tensor) -> None:
    """Write k, v [N, Hkv, D] into the caches at slots [N] (slot = page * page_size + offset)."""
    page_size = k_cache.shape[1]
    pages, offsets = slots.long() // page_size, slots.long() % page_size
    k_cache[pages, offsets] = k.to(k_cache.dtype)
    v_cache[pages, offsets] = v.to(v_cache.dtype)
