"""Plain-PyTorch baselines for shared-prompt decode attention, on dense tensors.

- `sdpa_flat`: every path attends over its own copy of [prompt + own tokens]
  (how n samples of one prompt are usually batched), one SDPA call.
- `prefix_suffix`: the cascade decomposition in plain PyTorch: one batched
  matmul of all paths' queries against the prompt, per-path attention over own
  tokens, merged by LSE.
Both are given their KV already dense and contiguous (their best case).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from forkdec.testing import Forest


def dense_inputs(f: Forest) -> dict[str, Tensor]:
    """Dense tensors for one prompt whose paths all have the same lengths:
    q [P, Hq, qo, D], prompt_k/v [Hkv, L, D], own_k/v [P, Hkv, S, D], flat_k/v [P, Hkv, L+S, D]."""
    from forkdec.reference.attention import PageTable

    prompt, own = f.levels
    paths = own.qo_indptr.numel() - 1
    qo = f.qo_lens[0][0]
    hq, d = f.q.shape[1:]
    pt = PageTable(prompt.kv_indptr, prompt.kv_indices, prompt.kv_last_page_len)
    ot = PageTable(own.kv_indptr, own.kv_indices, own.kv_last_page_len)
    prompt_k, prompt_v = (pt.gather(c, 0).transpose(0, 1).contiguous() for c in (f.k_cache, f.v_cache))
    own_k = torch.stack([ot.gather(f.k_cache, b) for b in range(paths)]).transpose(1, 2).contiguous()
    own_v = torch.stack([ot.gather(f.v_cache, b) for b in range(paths)]).transpose(1, 2).contiguous()
    q = f.q.reshape(paths, qo, hq, d).transpose(1, 2).contiguous()
    flat_k = torch.cat([prompt_k.expand(paths, -1, -1, -1), own_k], 2).contiguous()
    flat_v = torch.cat([prompt_v.expand(paths, -1, -1, -1), own_v], 2).contiguous()
    return dict(q=q, prompt_k=prompt_k, prompt_v=prompt_v, own_k=own_k, own_v=own_v, flat_k=flat_k, flat_v=flat_v)


def sdpa_flat(q: Tensor, flat_k: Tensor, flat_v: Tensor, mask: Tensor | None = None) -> Tensor:
    """q [P, Hq, qo, D] over per-path KV [P, Hkv, L+S, D] -> [P, Hq, qo, D]."""
    return F.scaled_dot_product_attention(q, flat_k, flat_v, attn_mask=mask, enable_gqa=True)


def prefix_suffix(q: Tensor, prompt_k: Tensor, prompt_v: Tensor, own_k: Tensor, own_v: Tensor) -> Tensor:
    """Decode (qo = 1): prompt attended once for all paths, own tokens per path, LSE merge."""
    paths, hq, qo, d = q.shape
    hkv = prompt_k.shape[0]
    g = hq // hkv
    scale = d ** -0.5
    # prompt: [Hkv, P*g*qo, D] @ [Hkv, D, L]
    qp = q.reshape(paths, hkv, g * qo, d).transpose(0, 1).reshape(hkv, paths * g * qo, d)
    s = torch.bmm(qp, prompt_k.transpose(1, 2)) * scale
    lse_p = torch.logsumexp(s, -1, keepdim=True)
    o_p = torch.bmm(torch.exp(s - lse_p), prompt_v)                  # [Hkv, P*g*qo, D]
    o_p = o_p.reshape(hkv, paths, g * qo, d).transpose(0, 1)         # [P, Hkv, g*qo, D]
    lse_p = lse_p.reshape(hkv, paths, g * qo, 1).transpose(0, 1)
    # own tokens: [P, Hkv, g*qo, D] @ [P, Hkv, D, S]
    qs = q.reshape(paths, hkv, g * qo, d)
    s = torch.matmul(qs, own_k.transpose(2, 3)) * scale
    lse_s = torch.logsumexp(s, -1, keepdim=True)
    o_s = torch.matmul(torch.exp(s - lse_s), own_v)
    lse = torch.logaddexp(lse_p, lse_s)
    out = o_p * torch.exp(lse_p - lse) + o_s * torch.exp(lse_s - lse)
    return out.reshape(paths, hq, qo, d)
