"""XQuant attention (arXiv 2508.10395): K and V rematerialized from cached low-bit X̂.

The cache holds, per token, a quantized input X̂k (and X̂v; the same pages for
raw X, separate latent pages for the SVD variant) instead of K and V. Attention
computes K = RoPE(X̂k·wk + bk) at the tokens' positions and V = X̂v·wv + bv.
Conventions as in docs/attention.md; returns an attention state (out, lse)
that merges with other levels (`merge_state`) like any cascade level.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from forkdec import _extension, reference
from forkdec.backends import resolve
from forkdec.ops.attention import HEAD_DIMS, validate_page_table
from forkdec.validation import require, validation_enabled
from forkdec.xquant.pages import QuantizedPages

BACKENDS = ("reference", "cpu", "triton")
AXIS_IDS = {"token": 0, "channel": 1}
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _pages_shape(x_pages: QuantizedPages | Tensor, name: str) -> tuple[int, int, int]:
    if isinstance(x_pages, QuantizedPages):
        return x_pages.num_pages, x_pages.page_size, x_pages.width
    require(isinstance(x_pages, Tensor) and x_pages.dim() == 3 and x_pages.is_floating_point(), name,
            "must be QuantizedPages or a float [num_pages, page_size, W] tensor")
    return tuple(x_pages.shape)


def xquant_attention(q: Tensor, qo_indptr: Tensor, xk_pages: QuantizedPages | Tensor,
                     xv_pages: QuantizedPages | Tensor, kv_indptr: Tensor, kv_indices: Tensor,
                     kv_last_page_len: Tensor, kv_start_pos: Tensor, wk: Tensor, wv: Tensor, rope_cos: Tensor,
                     rope_sin: Tensor, *, bk: Tensor | None = None, bv: Tensor | None = None, causal: bool = False,
                     custom_mask: Tensor | None = None, sm_scale: float | None = None, return_lse: bool = False,
                     backend: str = "auto") -> Tensor | tuple[Tensor, Tensor]:
    """Attention over keys and values rematerialized from quantized X̂ pages.

    q [total_q, Hq, D] (RoPE applied) ragged by qo_indptr [B+1] int32.
    xk_pages, xv_pages: QuantizedPages (or float [num_pages, page_size, W] pages for
        a full-precision window) of widths Wk, Wv, sharing one page table
        (kv_indptr, kv_indices, kv_last_page_len as in `attention`).
    kv_start_pos [B] int: position of each request's first cached token (RoPE).
    wk [Wk, Hkv*D], wv [Wv, Hkv*D] (bk, bv [Hkv*D] optional): K = X̂k·wk + bk, V = X̂v·wv + bv.
    rope_cos, rope_sin [max_pos, D] fp32, rotate-half layout (halves repeated).
    causal / custom_mask / sm_scale / return_lse as in `attention`.
    Returns out [total_q, Hq, D] in q's dtype (and lse [total_q, Hq] fp32).
    Backends: reference, cpu (C++; q and float pages fp32/fp16/bf16), triton.
    """
    if validation_enabled():
        require(q.dim() == 3 and q.is_floating_point(), "q", f"expected float [total_q, Hq, D], got {tuple(q.shape)}")
        d = q.shape[-1]
        require(d in HEAD_DIMS, "q", f"head dim {d} not supported; expected one of {HEAD_DIMS}")
        pk, ps, w_k = _pages_shape(xk_pages, "xk_pages")
        pv, psv, w_v = _pages_shape(xv_pages, "xv_pages")
        require((pk, ps) == (pv, psv), "xv_pages", f"[num_pages, page_size] {(pv, psv)} != xk_pages' {(pk, ps)}")
        require(wk.dim() == 2 and wk.shape[0] == w_k and wk.shape[1] % d == 0, "wk",
                f"expected [{w_k}, Hkv * {d}], got {tuple(wk.shape)}")
        require(tuple(wv.shape) == (w_v, wk.shape[1]), "wv", f"expected [{w_v}, {wk.shape[1]}], got {tuple(wv.shape)}")
        hkv = wk.shape[1] // d
        require(q.shape[1] % hkv == 0, "q", f"Hq = {q.shape[1]} is not a multiple of Hkv = {hkv}")
        for name, bias in (("bk", bk), ("bv", bv)):
            require(bias is None or tuple(bias.shape) == (wk.shape[1],), name, f"expected [{wk.shape[1]}]")
        validate_page_table(q.shape[0], pk, ps, qo_indptr, kv_indptr, kv_indices, kv_last_page_len, custom_mask)
        batch = qo_indptr.numel() - 1
        require(kv_start_pos.dim() == 1 and kv_start_pos.numel() == batch and not kv_start_pos.is_floating_point(),
                "kv_start_pos", f"must be an integer [{batch}] tensor")
        require(rope_cos.dim() == 2 and rope_cos.shape[1] == d and rope_sin.shape == rope_cos.shape, "rope_cos",
                f"rope_cos and rope_sin must be [max_pos, {d}]")
        if batch:
            has = kv_indptr[1:] > kv_indptr[:-1]
            lens = torch.where(has, (kv_indptr[1:] - kv_indptr[:-1]).long().sub(1) * ps + kv_last_page_len.long(), 0)
            require(int(kv_start_pos.min()) >= 0 and int((kv_start_pos.long() + lens).max()) <= rope_cos.shape[0],
                    "kv_start_pos", f"positions must lie in [0, {rope_cos.shape[0]}) (the RoPE table)")
            if isinstance(xk_pages, QuantizedPages) and xk_pages.axis == "channel":
                require(bool((kv_last_page_len[has] == ps).all()), "kv_last_page_len",
                        "channel-quantized pages are always full (page_size)")
    name = resolve(backend, "xquant_attention", q.device, BACKENDS)
    if name == "reference":
        return reference.xquant_attention(q, qo_indptr, xk_pages, xv_pages, kv_indptr, kv_indices, kv_last_page_len,
                                          kv_start_pos, wk, wv, rope_cos, rope_sin, bk=bk, bv=bv, causal=causal,
                                          custom_mask=custom_mask, sm_scale=sm_scale, return_lse=return_lse)
    if validation_enabled():
        require(q.dtype in KERNEL_DTYPES, "q", f"dtype {q.dtype} not supported by the {name} backend (fp32, fp16, bf16)")
        for arg, pages in (("xk_pages", xk_pages), ("xv_pages", xv_pages)):
            require(isinstance(pages, QuantizedPages) or pages.dtype in KERNEL_DTYPES, arg,
                    f"float pages must be fp32, fp16 or bf16 for the {name} backend")
    page_size = xk_pages.page_size if isinstance(xk_pages, QuantizedPages) else xk_pages.shape[1]
    op = torch.ops.forkdec.xquant_attention if name == "cpu" else torch.ops.forkdec.xquant_attention_triton
    out, lse = op(q, qo_indptr, *page_args(xk_pages), *page_args(xv_pages), page_size, kv_indptr, kv_indices,
                  kv_last_page_len, kv_start_pos, wk, wv, bk, bv, rope_cos, rope_sin, causal, custom_mask,
                  1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale))
    return (out, lse) if return_lse else out


def page_args(x: QuantizedPages | Tensor) -> tuple:
    """A page store as the op's (x, scale, zero, bits, group_size, axis, width) arguments:
    codes with fp16 scale/zero for quantized pages, the float pages with None, None otherwise."""
    if isinstance(x, QuantizedPages):
        return x.codes, x.scale, x.zero, x.bits, x.group_size, AXIS_IDS[x.axis], x.width
    return x, None, None, 0, 0, 0, x.shape[2]


# torch.compile support: the fake (meta) implementation of the C++ op.
def _xquant_attention_fake(q, qo_indptr, xk, xk_scale, xk_zero, xk_bits, xk_group_size, xk_axis, xk_width, xv,
                           xv_scale, xv_zero, xv_bits, xv_group_size, xv_axis, xv_width, page_size, kv_indptr,
                           kv_indices, kv_last_page_len, kv_start_pos, wk, wv, bk, bv, rope_cos, rope_sin, causal,
                           custom_mask, sm_scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:2], dtype=torch.float32)


if _extension.load() is not None and hasattr(torch.ops.forkdec, "xquant_attention"):
    torch.library.register_fake("forkdec::xquant_attention")(_xquant_attention_fake)



# The Triton kernel (triton_kernels/xquant.py) as a torch op, imported on first use.
@torch.library.custom_op("forkdec::xquant_attention_triton", mutates_args=())
def _xquant_attention_triton(q: Tensor, qo_indptr: Tensor, xk: Tensor, xk_scale: Tensor | None,
                             xk_zero: Tensor | None, xk_bits: int, xk_group_size: int, xk_axis: int, xk_width: int,
                             xv: Tensor, xv_scale: Tensor | None, xv_zero: Tensor | None, xv_bits: int,
                             xv_group_size: int, xv_axis: int, xv_width: int, page_size: int, kv_indptr: Tensor,
                             kv_indices: Tensor, kv_last_page_len: Tensor, kv_start_pos: Tensor, wk: Tensor,
                             wv: Tensor, bk: Tensor | None, bv: Tensor | None, rope_cos: Tensor, rope_sin: Tensor,
                             causal: bool, custom_mask: Tensor | None, sm_scale: float) -> tuple[Tensor, Tensor]:
    from forkdec.triton_kernels import xquant as kernels
    return kernels.xquant_attention(q, qo_indptr, xk, xk_scale, xk_zero, xk_bits, xk_group_size, xk_axis, xk_width,
                                    xv, xv_scale, xv_zero, xv_bits, xv_group_size, xv_axis, xv_width, page_size,
                                    kv_indptr, kv_indices, kv_last_page_len, kv_start_pos, wk, wv, bk, bv, rope_cos,
                                    rope_sin, causal, custom_mask, sm_scale)


_xquant_attention_triton.register_fake(_xquant_attention_fake)
