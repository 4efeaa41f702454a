"""Attention over a paged KV cache with LSE outputs, state merging, cascades.

Conventions (docs/attention.md): NHD layout; queries q [total_q, Hq, D] ragged
by qo_indptr [B+1] int32; caches [num_pages, page_size, Hkv, D]; request b's KV
is the pages kv_indices[kv_indptr[b]:kv_indptr[b+1]], all full but the last,
which holds kv_last_page_len[b] tokens; lse is the natural log of the softmax
denominator (sm_scale included), -inf for a query that sees no key.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

import math

from forkdec import _extension, reference
from forkdec.backends import resolve
from forkdec.validation import require, validation_enabled

HEAD_DIMS = (32, 64, 96, 128, 256)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BACKENDS = ("reference", "cpu", "triton")


@dataclass
class CascadeLevel:
    """One level of a cascade: groups of query rows (qo_indptr) and, per group,
    the pages it attends to, with its own causal flag or custom mask."""
    qo_indptr: Tensor
    kv_indptr: Tensor
    kv_indices: Tensor
    kv_last_page_len: Tensor
    causal: bool = False
    custom_mask: Tensor | None = None


def attention(q: Tensor, qo_indptr: Tensor, k_cache: Tensor, v_cache: Tensor, kv_indptr: Tensor,
              kv_indices: Tensor, kv_last_page_len: Tensor, *, causal: bool = False,
              custom_mask: Tensor | None = None, sm_scale: float | None = None, return_lse: bool = False,
              backend: str = "auto") -> Tensor | tuple[Tensor, Tensor]:
    """Prefill, decode (qo_len 1) and verification attention over a paged KV cache.

    q [total_q, Hq, D] fp32/fp16/bf16; qo_indptr [B+1] int32 groups q's rows by request.
    k_cache, v_cache [num_pages, page_size, Hkv, D], q's dtype, Hq % Hkv == 0.
    kv_indptr [B+1], kv_indices [nnz], kv_last_page_len [B]: int32 page table.
    causal: query i of a request with qo_len queries and kv_len keys sees keys
        j <= kv_len - qo_len + i.
    custom_mask: per request a [qo_len, kv_len] bool matrix (True = may attend),
        flattened row-major and concatenated over requests; or that flat mask
        bit-packed in uint8, little bit order.
    Returns out [total_q, Hq, D] in q's dtype, and lse [total_q, Hq] fp32 if
    return_lse. A query that sees no key gets out 0 and lse -inf.
    """
    if validation_enabled():
        validate_attention(q, qo_indptr, k_cache, v_cache, kv_indptr, kv_indices, kv_last_page_len,
                           custom_mask, sm_scale)
    name = resolve(backend, "attention", q.device, BACKENDS)
    if name == "reference":
        return reference.attention(q, qo_indptr, k_cache, v_cache, kv_indptr, kv_indices, kv_last_page_len,
                                   causal=causal, custom_mask=custom_mask, sm_scale=sm_scale,
                                   return_lse=return_lse)
    op = torch.ops.forkdec.attention if name == "cpu" else torch.ops.forkdec.attention_triton
    out, lse = op(q, qo_indptr, k_cache, v_cache, kv_indptr, kv_indices, kv_last_page_len, causal, custom_mask,
                  _scale(q, sm_scale))
    return (out, lse) if return_lse else out


def merge_state(o_a: Tensor, lse_a: Tensor, o_b: Tensor, lse_b: Tensor, *,
                backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Merge two attention states of the same queries over disjoint key sets.

    o_* [T, H, D] (any float dtype), lse_* [T, H] fp32. Returns (o [T, H, D] in
    o_a's dtype, lse [T, H] fp32) equal to attention over the union of the keys.
    A side with lse -inf (no keys) contributes nothing; both empty give 0, -inf.
    """
    if validation_enabled():
        require(o_a.shape == o_b.shape and o_a.dim() == 3, "o_b",
                f"shape {tuple(o_b.shape)} must equal o_a's {tuple(o_a.shape)} and be [T, H, D]")
        require(lse_a.shape == o_a.shape[:2] and lse_b.shape == o_a.shape[:2], "lse_a",
                f"lse shapes {tuple(lse_a.shape)}, {tuple(lse_b.shape)} must be [T, H] = {tuple(o_a.shape[:2])}")
    name = resolve(backend, "merge_state", o_a.device, BACKENDS)
    if name == "reference":
        return reference.merge_state(o_a, lse_a, o_b, lse_b)
    op = torch.ops.forkdec.merge_state if name == "cpu" else torch.ops.forkdec.merge_state_triton
    return op(o_a, lse_a, o_b, lse_b)


def merge_states(o: Tensor, lse: Tensor, *, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Merge n states per query: o [T, n, H, D], lse [T, n, H] fp32 ->
    (o [T, H, D] in o's dtype, lse [T, H] fp32)."""
    if validation_enabled():
        require(o.dim() == 4, "o", f"expected [T, n, H, D], got shape {tuple(o.shape)}")
        require(lse.shape == o.shape[:3], "lse", f"expected shape {tuple(o.shape[:3])}, got {tuple(lse.shape)}")
    name = resolve(backend, "merge_states", o.device, BACKENDS)
    if name == "reference":
        return reference.merge_states(o, lse)
    op = torch.ops.forkdec.merge_states if name == "cpu" else torch.ops.forkdec.merge_states_triton
    return op(o, lse)


def cascade_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, levels: list[CascadeLevel], *,
                      sm_scale: float | None = None, return_lse: bool = False,
                      backend: str = "auto") -> Tensor | tuple[Tensor, Tensor]:
    """Attention of every query over the union of its keys across `levels`.

    Each level groups the same query rows by its own qo_indptr and gives each
    group its pages (and causal flag or custom mask). Typical use: level 0 puts
    all paths of a prompt in one group over the prompt's pages, so the prompt is
    read once per group; level 1 has one group per path over its own pages.
    Many prompts with their paths go in one call. Levels are computed as
    independent attention states and merged by LSE. Shapes as in `attention`.
    """
    require(len(levels) > 0, "levels", "needs at least one level")
    if validation_enabled():
        for i, lv in enumerate(levels):
            require(isinstance(lv, CascadeLevel), f"levels[{i}]", f"expected a CascadeLevel, got {type(lv).__name__}")
            validate_attention(q, lv.qo_indptr, k_cache, v_cache, lv.kv_indptr, lv.kv_indices,
                               lv.kv_last_page_len, lv.custom_mask, sm_scale, prefix=f"levels[{i}].")
    name = resolve(backend, "cascade_attention", q.device, BACKENDS)
    if name == "reference":
        return reference.cascade_attention(q, k_cache, v_cache, levels, sm_scale=sm_scale, return_lse=return_lse)
    op = torch.ops.forkdec.cascade_attention if name == "cpu" else torch.ops.forkdec.cascade_attention_triton
    out, lse = op(
        q, k_cache, v_cache, [lv.qo_indptr for lv in levels], [lv.kv_indptr for lv in levels],
        [lv.kv_indices for lv in levels], [lv.kv_last_page_len for lv in levels], [lv.causal for lv in levels],
        [lv.custom_mask for lv in levels], _scale(q, sm_scale))
    return (out, lse) if return_lse else out


def append_kv(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, slots: Tensor, *,
              backend: str = "auto") -> None:
    """Write new tokens' K/V into the paged caches, in place.

    k, v [N, Hkv, D]; slots [N] int32/int64, slot = page * page_size + offset
    (distinct slots). The caches keep their dtype.
    """
    if validation_enabled():
        require(k_cache.dim() == 4 and v_cache.shape == k_cache.shape, "v_cache",
                f"caches must both be [num_pages, page_size, Hkv, D], got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
        require(k.shape == v.shape and k.dim() == 3 and tuple(k.shape[1:]) == tuple(k_cache.shape[2:]), "k",
                f"k and v must be [N, {k_cache.shape[2]}, {k_cache.shape[3]}], got {tuple(k.shape)} and {tuple(v.shape)}")
        validate_slots(slots, k.shape[0], k_cache.shape[0] * k_cache.shape[1])
    name = resolve(backend, "append_kv", k_cache.device, BACKENDS)
    if name == "reference":
        reference.append_kv(k_cache, v_cache, k, v, slots)
    elif name == "cpu":
        torch.ops.forkdec.append_kv(k_cache, v_cache, k, v, slots)
    else:
        torch.ops.forkdec.append_kv_triton(k_cache, v_cache, k, v, slots)


def softmax_scale(head_dim: int, sm_scale: float | None) -> float:
    """The scale the kernels apply to q.k: sm_scale, or 1 / sqrt(head_dim) when None."""
    return 1.0 / math.sqrt(head_dim) if sm_scale is None else float(sm_scale)


def _scale(q: Tensor, sm_scale: float | None) -> float:
    return softmax_scale(q.shape[-1], sm_scale)


def validate_slots(slots: Tensor, tokens: int, capacity: int) -> None:
    """slots: integer [tokens], every id in [0, capacity) (append_kv's slots)."""
    require(slots.dim() == 1 and slots.numel() == tokens and not slots.is_floating_point(), "slots",
            f"must be an integer [N={tokens}] tensor, got {slots.dtype} {tuple(slots.shape)}")
    require(slots.numel() == 0 or (int(slots.min()) >= 0 and int(slots.max()) < capacity), "slots",
            f"slot ids must be in [0, {capacity})")


def _require_indptr(t: Tensor, name: str, length: int | None, end: int | None) -> None:
    require(isinstance(t, Tensor) and t.dim() == 1 and t.dtype in (torch.int32, torch.int64), name,
            "must be a 1-D int32 tensor")
    require(length is None or t.numel() == length, name, f"must have {length} entries, got {t.numel()}")
    require(t.numel() > 0 and int(t[0]) == 0, name, "must start at 0")
    require(bool((t[1:] >= t[:-1]).all()), name, "must be non-decreasing")
    require(end is None or int(t[-1]) <= end, name, f"ends at {int(t[-1])}, past the {end} entries it indexes")


def validate_attention(q: Tensor, qo_indptr: Tensor, k_cache: Tensor, v_cache: Tensor, kv_indptr: Tensor,
                       kv_indices: Tensor, kv_last_page_len: Tensor, custom_mask: Tensor | None,
                       sm_scale: float | None, prefix: str = "") -> None:
    """Every check that keeps a kernel in bounds; ValueError naming the argument."""
    validate_tensors(q, k_cache, v_cache, sm_scale)
    validate_page_table(q.shape[0], k_cache.shape[0], k_cache.shape[1], qo_indptr, kv_indptr, kv_indices,
                        kv_last_page_len, custom_mask, prefix)


def validate_tensors(q: Tensor, k_cache: Tensor, v_cache: Tensor, sm_scale: float | None) -> None:
    """Shapes and dtypes of q and the caches (cheap: no data is read)."""
    require(q.dim() == 3, "q", f"expected [total_q, Hq, D], got shape {tuple(q.shape)}")
    require(q.dtype in DTYPES, "q", f"dtype {q.dtype} not supported (fp32, fp16, bf16)")
    require(k_cache.dim() == 4, "k_cache", f"expected [num_pages, page_size, Hkv, D], got {tuple(k_cache.shape)}")
    require(v_cache.shape == k_cache.shape, "v_cache", f"shape {tuple(v_cache.shape)} != k_cache {tuple(k_cache.shape)}")
    require(k_cache.dtype == q.dtype and v_cache.dtype == q.dtype, "k_cache",
            f"dtype {k_cache.dtype}/{v_cache.dtype} must match q's {q.dtype}")
    _, hq, d = q.shape
    _, page_size, hkv, dk = k_cache.shape
    require(d in HEAD_DIMS, "q", f"head dim {d} not supported; expected one of {HEAD_DIMS}")
    require(dk == d, "k_cache", f"head dim {dk} != q's {d}")
    require(hkv > 0 and hq % hkv == 0, "q", f"Hq = {hq} is not a multiple of Hkv = {hkv}")
    require(page_size > 0, "k_cache", "page_size must be positive")
    require(sm_scale is None or (isinstance(sm_scale, (int, float)) and sm_scale > 0), "sm_scale",
            f"must be a positive float, got {sm_scale!r}")


def validate_page_table(total_q: int, num_pages: int, page_size: int, qo_indptr: Tensor, kv_indptr: Tensor,
                        kv_indices: Tensor, kv_last_page_len: Tensor, custom_mask: Tensor | None,
                        prefix: str = "") -> None:
    """The metadata against the sizes it indexes (reads the index tensors)."""
    _require_indptr(qo_indptr, prefix + "qo_indptr", None, total_q)
    batch = qo_indptr.numel() - 1
    require(int(qo_indptr[-1]) == total_q, prefix + "qo_indptr", f"ends at {int(qo_indptr[-1])}, q has {total_q} rows")
    _require_indptr(kv_indptr, prefix + "kv_indptr", batch + 1, kv_indices.numel())
    require(kv_indices.dim() == 1 and kv_indices.dtype in (torch.int32, torch.int64), prefix + "kv_indices",
            "must be a 1-D int32 tensor")
    used = kv_indices[: int(kv_indptr[-1])]
    require(used.numel() == 0 or (int(used.min()) >= 0 and int(used.max()) < num_pages), prefix + "kv_indices",
            f"page ids must be in [0, {num_pages})")
    require(kv_last_page_len.dim() == 1 and kv_last_page_len.numel() == batch, prefix + "kv_last_page_len",
            f"must have {batch} entries, got {kv_last_page_len.numel()}")
    has_pages = kv_indptr[1:] > kv_indptr[:-1]
    last = kv_last_page_len.long()
    require(bool(((last >= 1) & (last <= page_size) | ~has_pages).all()), prefix + "kv_last_page_len",
            f"must be in [1, page_size = {page_size}] for every request with pages")
    if custom_mask is not None:
        qo_len = (qo_indptr[1:] - qo_indptr[:-1]).long()
        kv_len = torch.where(has_pages, (kv_indptr[1:] - kv_indptr[:-1]).long().sub(1) * page_size + last, 0)
        numel = int((qo_len * kv_len).sum())
        if custom_mask.dtype == torch.bool:
            require(custom_mask.numel() == numel, prefix + "custom_mask",
                    f"has {custom_mask.numel()} entries, expected sum(qo_len * kv_len) = {numel}")
        else:
            require(custom_mask.dtype == torch.uint8, prefix + "custom_mask", "must be bool or bit-packed uint8")
            require(custom_mask.numel() == (numel + 7) // 8, prefix + "custom_mask",
                    f"packed mask has {custom_mask.numel()} bytes, expected ceil({numel} / 8) = {(numel + 7) // 8}")


# torch.compile support: fake (meta) implementations of the C++ ops.
# Outputs are new contiguous tensors, whatever the inputs' strides (new_empty, not empty_like).
def _attention_fake(q, qo_indptr, k_cache, v_cache, kv_indptr, kv_indices, kv_last_page_len, causal,
                    custom_mask, sm_scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:2], dtype=torch.float32)


def _cascade_fake(q, k_cache, v_cache, qo_indptr, kv_indptr, kv_indices, kv_last_page_len, causal, custom_mask,
                  sm_scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:2], dtype=torch.float32)


def _merge_states_fake(o, lse):
    return o.new_empty(o.shape[:1] + o.shape[2:]), lse.new_empty(lse.shape[:1] + lse.shape[2:], dtype=torch.float32)


def _merge_state_fake(o_a, lse_a, o_b, lse_b):
    return o_a.new_empty(o_a.shape), o_a.new_empty(o_a.shape[:2], dtype=torch.float32)


def _append_kv_fake(k_cache, v_cache, k, v, slots):
    return None


if _extension.load() is not None:
    for _name, _fake in [("attention", _attention_fake), ("cascade_attention", _cascade_fake),
                         ("merge_states", _merge_states_fake), ("merge_state", _merge_state_fake),
                         ("append_kv", _append_kv_fake)]:
        torch.library.register_fake(f"forkdec::{_name}")(_fake)


# Triton kernels as torch ops (triton_kernels/attention.py), imported on first use.
def _triton():
    from forkdec.triton_kernels import attention as kernels
    return kernels


@torch.library.custom_op("forkdec::attention_triton", mutates_args=())
def _attention_triton(q: Tensor, qo_indptr: Tensor, k_cache: Tensor, v_cache: Tensor, kv_indptr: Tensor,
                      kv_indices: Tensor, kv_last_page_len: Tensor, causal: bool, custom_mask: Tensor | None,
                      sm_scale: float) -> tuple[Tensor, Tensor]:
    return _triton().attention(q, qo_indptr, k_cache, v_cache, kv_indptr, kv_indices, kv_last_page_len, causal,
                               custom_mask, sm_scale)


@torch.library.custom_op("forkdec::cascade_attention_triton", mutates_args=())
def _cascade_attention_triton(q: Tensor, k_cache: Tensor, v_cache: Tensor, qo_indptr: list[Tensor],
                              kv_indptr: list[Tensor], kv_indices: list[Tensor], kv_last_page_len: list[Tensor],
                              causal: list[bool], custom_mask: list[Tensor | None],
                              sm_scale: float) -> tuple[Tensor, Tensor]:
    return _triton().cascade_attention(q, k_cache, v_cache, qo_indptr, kv_indptr, kv_indices, kv_last_page_len,
                                       causal, custom_mask, sm_scale)


@torch.library.custom_op("forkdec::merge_states_triton", mutates_args=())
def _merge_states_triton(o: Tensor, lse: Tensor) -> tuple[Tensor, Tensor]:
    return _triton().merge_states(o, lse)


@torch.library.custom_op("forkdec::merge_state_triton", mutates_args=())
def _merge_state_triton(o_a: Tensor, lse_a: Tensor, o_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    return _triton().merge_state(o_a, lse_a, o_b, lse_b)


@torch.library.custom_op("forkdec::append_kv_triton", mutates_args=("k_cache", "v_cache"))
def _append_kv_triton(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, slots: Tensor) -> None:
    _triton().append_kv(k_cache, v_cache, k, v, slots)


_attention_triton.register_fake(_attention_fake)
_cascade_attention_triton.register_fake(_cascade_fake)
_merge_states_triton.register_fake(_merge_states_fake)
_merge_state_triton.register_fake(_merge_state_fake)
