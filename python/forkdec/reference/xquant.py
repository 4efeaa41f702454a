"""Reference XQuant attention: rematerialize K and V from cached X̂, then attend.

Plain PyTorch, one request at a time: dequantize the request's pages, K = RoPE(X̂k·wk + bk)
at the tokens' positions, V = X̂v·wv + bv, then reference attention.
"""
from __future__ import annotations

import torch
from torch import Tensor

from forkdec.reference.attention import PageTable, attention
from forkdec.xquant.pages import QuantizedPages


def rotate_half_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE in the rotate-half layout: x [T, H, D], cos/sin [T, D] (halves repeated)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos[:, None] + torch.cat([-x2, x1], dim=-1) * sin[:, None]


def _read(pages_store: QuantizedPages | Tensor, pages: Tensor) -> Tensor:
    if isinstance(pages_store, QuantizedPages):
        return pages_store.read(pages)
    return pages_store[pages.long()].float()


def rematerialize(x_pages: QuantizedPages | Tensor, table: PageTable, b: int, w: Tensor, bias: Tensor | None,
                  num_kv_heads: int, positions: Tensor | None = None, rope_cos: Tensor | None = None,
                  rope_sin: Tensor | None = None) -> Tensor:
    """[kv_len, Hkv, D] fp32 keys (with positions and RoPE tables) or values of request b."""
    page_size = x_pages.page_size if isinstance(x_pages, QuantizedPages) else x_pages.shape[1]
    kv_len = table.kv_len(b, page_size)
    pages = table.kv_indices[int(table.kv_indptr[b]):int(table.kv_indptr[b + 1])]
    x = _read(x_pages, pages).reshape(-1, w.shape[0])[:kv_len]
    y = x @ w.float() + (0 if bias is None else bias.float())
    y = y.reshape(kv_len, num_kv_heads, w.shape[1] // num_kv_heads)
    if positions is not None:
        y = rotate_half_rope(y, rope_cos[positions].float(), rope_sin[positions].float())
    return y


def xquant_attention(q: Tensor, qo_indptr: Tensor, xk_pages: QuantizedPages | Tensor,
                     xv_pages: QuantizedPages | Tensor, kv_indptr: Tensor, kv_indices: Tensor,
                     kv_last_page_len: Tensor, kv_start_pos: Tensor, wk: Tensor, wv: Tensor, rope_cos: Tensor,
                     rope_sin: Tensor, *, bk: Tensor | None = None, bv: Tensor | None = None, causal: bool = False,
                     custom_mask: Tensor | None = None, sm_scale: float | None = None,
                     return_lse: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """See forkdec.ops.xquant_attention."""
    d = q.shape[-1]
    hkv = wk.shape[1] // d
    table = PageTable(kv_indptr, kv_indices, kv_last_page_len)
    ks, vs, lens = [], [], []
    for b in range(qo_indptr.numel() - 1):
        page_size = xk_pages.page_size if isinstance(xk_pages, QuantizedPages) else xk_pages.shape[1]
        kv_len = table.kv_len(b, page_size)
        pos = int(kv_start_pos[b]) + torch.arange(kv_len, device=q.device)
        ks.append(rematerialize(xk_pages, table, b, wk, bk, hkv, pos, rope_cos, rope_sin))
        vs.append(rematerialize(xv_pages, table, b, wv, bv, hkv))
        lens.append(kv_len)
    # The rematerialized K/V of all requests as one token-level (page_size 1) cache.
    k = torch.cat(ks).unsqueeze(1) if ks else q.new_zeros(0, 1, hkv, d, dtype=torch.float32)
    v = torch.cat(vs).unsqueeze(1) if vs else q.new_zeros(0, 1, hkv, d, dtype=torch.float32)
    lens_t = torch.tensor(lens, dtype=torch.int32, device=q.device)
    indptr = torch.cat([lens_t.new_zeros(1), lens_t.cumsum(0, dtype=torch.int32)])
    out, lse = attention(q.float(), qo_indptr, k, v, indptr, torch.arange(int(indptr[-1]), dtype=torch.int32),
                         torch.ones_like(lens_t), causal=causal, custom_mask=custom_mask, sm_scale=sm_scale,
                         return_lse=True)
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out
