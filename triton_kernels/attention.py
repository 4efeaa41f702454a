"""Attention over a paged KV cache in Triton, FlashAttention style.

Conventions: docs/attention.md (NHD layout, FlashInfer's page table, ragged
qo_indptr, causal rule, bool or bit-packed custom masks, natural-log LSE, a
query that sees no key gets out 0 and lse -inf).

One program owns (work item, KV head). A work item is a request, a block of
its "rows" and a KV split. The rows of a request are its queries times the
g = Hq / Hkv query heads that share one KV head (row r is query r // g, head
kv_head * g + r % g), so every K/V tile loaded is used by g heads and, in a
cascade's prompt level, by every path's queries at once. The program walks
its keys in tiles gathered through the page table (a tile may span pages),
with an online softmax in fp32 in base 2. When few programs would cover long
KV (decode), the keys are split into chunks whose partial states are merged
by LSE (`merge_states`), as is every level of a cascade.

Launchers: attention, cascade_attention, merge_states, merge_state, append_kv.
No launch reads anything back from the device: a LaunchPlan (the CascadePlan
op's) reads the requests' lengths once per step and plans tight work lists for
every layer; a launch without one plans on the device, its work list padded to
a host-known bound.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
MASK_NONE = tl.constexpr(0)
MASK_BOOL = tl.constexpr(1)
MASK_PACKED = tl.constexpr(2)

# Split-KV heuristic: split only while there are fewer than SPLIT_TARGET_WAVES
# programs per SM, into chunks of at least MIN_SPLIT_TOKENS keys.
SPLIT_TARGET_WAVES = 2
MIN_SPLIT_TOKENS = 256
MAX_SPLITS = 16
# The interpreter has no SMs; pretending it has a few makes it exercise the split path.
INTERPRETER_SMS = 4


# ---------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------

@triton.jit
def _dot(a, b, FP32_DOT: tl.constexpr):
    """a @ b with fp32 accumulation; FP32_DOT multiplies in fp32 (IEEE, no TF32)."""
    if FP32_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _key_is_allowed(mask_ptr, mask_offset, qi, j, kv_len, visible, MASK_MODE: tl.constexpr):
    """visible [M, N] narrowed by the custom mask at (query qi [M], key j [N])."""
    idx = mask_offset + qi.to(tl.int64)[:, None] * kv_len + j[None, :]
    if MASK_MODE == MASK_BOOL:
        allowed = tl.load(mask_ptr + idx, mask=visible, other=0) != 0
    else:  # little bit order: bit i is bit i % 8 of byte i // 8
        byte = tl.load(mask_ptr + (idx >> 3), mask=visible, other=0).to(tl.int32)
        allowed = ((byte >> (idx & 7).to(tl.int32)) & 1) != 0
    return visible & allowed


@triton.jit
def _attention_kernel(
        q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr,
        qo_indptr_ptr, kv_indptr_ptr, kv_indices_ptr, kv_last_page_len_ptr,
        mask_ptr, mask_offset_ptr, work_ptr, num_work, num_splits, out_slot0, sm_scale_log2,
        stride_qt, stride_qh, stride_qd,
        stride_kp, stride_ks, stride_kh, stride_kd,
        stride_vp, stride_vs, stride_vh, stride_vd,
        stride_ot, stride_os, stride_oh, stride_od,
        stride_lt, stride_ls, stride_lh,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        CAUSAL: tl.constexpr, MASK_MODE: tl.constexpr, FP32_DOT: tl.constexpr):
    # Work item: (request, first row, split), stored as three rows of work_ptr.
    wid = tl.program_id(0)
    kv_head = tl.program_id(1)
    b = tl.load(work_ptr + wid)
    row0 = tl.load(work_ptr + num_work + wid)
    split = tl.load(work_ptr + 2 * num_work + wid)

    q_start = tl.load(qo_indptr_ptr + b)
    qo_len = tl.load(qo_indptr_ptr + b + 1) - q_start
    page_start = tl.load(kv_indptr_ptr + b)
    num_pages = tl.load(kv_indptr_ptr + b + 1) - page_start
    kv_len = tl.where(num_pages > 0, (num_pages - 1) * PAGE_SIZE + tl.load(kv_last_page_len_ptr + b), 0)

    if row0 >= qo_len * GROUP:  # a padding item of a launch planned without host lengths
        return
    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = rows < qo_len * GROUP
    qi = rows // GROUP                              # query within the request
    head = kv_head * GROUP + rows % GROUP
    token = (q_start + qi).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM                             # head dim 96 runs padded to 128
    q = tl.load(q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :] * stride_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    # This split's keys: an equal share of the request's, in whole tiles.
    chunk = tl.cdiv(tl.cdiv(kv_len, num_splits), BLOCK_N) * BLOCK_N
    kv_lo = split * chunk
    kv_hi = tl.minimum(kv_len, kv_lo + chunk)
    causal_last = kv_len - qo_len + qi              # last key each row may see
    if CAUSAL:
        last_row = tl.minimum(row0 + BLOCK_M, qo_len * GROUP) - 1
        kv_hi = tl.minimum(kv_hi, kv_len - qo_len + last_row // GROUP + 1)
    mask_offset = 0
    if MASK_MODE != MASK_NONE:
        mask_offset = tl.load(mask_offset_ptr + b)

    # Running max m (base 2, -inf until a key is seen), denominator l, numerator acc.
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start in range(kv_lo, kv_hi, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        j_ok = j < kv_hi
        page = tl.load(kv_indices_ptr + page_start + j // PAGE_SIZE, mask=j_ok, other=0).to(tl.int64)
        offset = j % PAGE_SIZE
        tile_ok = j_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + page[:, None] * stride_kp + offset[:, None] * stride_ks + kv_head * stride_kh
                    + d[None, :] * stride_kd, mask=tile_ok, other=0.0)
        v = tl.load(v_ptr + page[:, None] * stride_vp + offset[:, None] * stride_vs + kv_head * stride_vh
                    + d[None, :] * stride_vd, mask=tile_ok, other=0.0)
        s = _dot(q, tl.trans(k), FP32_DOT) * sm_scale_log2

        visible = row_ok[:, None] & j_ok[None, :]
        if CAUSAL:
            visible = visible & (j[None, :] <= causal_last[:, None])
        if MASK_MODE != MASK_NONE:
            visible = _key_is_allowed(mask_ptr, mask_offset, qi, j, kv_len, visible, MASK_MODE)
        s = tl.where(visible, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row that has seen nothing keeps m = -inf: subtract 0 instead, so that
        # exp2(-inf - -inf) never makes a NaN; its p and alpha are then 0.
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, FP32_DOT)
        m_i = m_new

    seen = l_i > 0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]                     # acc is 0 where nothing was seen
    lse = tl.where(seen, (m_i + tl.math.log2(l_safe)) * LN2, float("-inf"))
    slot = out_slot0 + split
    tl.store(out_ptr + token[:, None] * stride_ot + slot * stride_os + head[:, None] * stride_oh
             + d[None, :] * stride_od, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + token * stride_lt + slot * stride_ls + head * stride_lh, lse, mask=row_ok)


@triton.jit
def _merge_step(m, l, acc, o_ptrs, lse_ptrs, h_ok, d_ok):
    """Fold one state (o [H, D] at o_ptrs, lse [H] at lse_ptrs) into the running
    (max m, sum l, numerator acc), all base 2. Empty states (lse -inf) are not read."""
    lse = tl.load(lse_ptrs, mask=h_ok, other=float("-inf")).to(tl.float32) * LOG2E
    has = lse > float("-inf")
    o = tl.load(o_ptrs, mask=has[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    m_new = tl.maximum(m, lse)
    m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m - m_sub)
    w = tl.math.exp2(lse - m_sub)
    return m_new, l * alpha + w, acc * alpha[:, None] + w[:, None] * o


@triton.jit
def _merge_finish(m, l, acc, out_ptrs, lse_out_ptrs, h_ok, d_ok):
    """Write out = acc / l and lse = ln(2**m * l); 0 and -inf where every state was empty."""
    seen = l > 0
    l_safe = tl.where(seen, l, 1.0)
    tl.store(out_ptrs, (acc / l_safe[:, None]).to(out_ptrs.dtype.element_ty), mask=h_ok[:, None] & d_ok[None, :])
    tl.store(lse_out_ptrs, tl.where(seen, (m + tl.math.log2(l_safe)) * LN2, float("-inf")), mask=h_ok)


@triton.jit
def _merge_states_kernel(o_ptr, lse_ptr, out_ptr, lse_out_ptr, num_states, num_heads, head_dim,
                         stride_ot, stride_on, stride_oh, stride_od, stride_lt, stride_ln, stride_lh,
                         BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    # One program per (query, block of heads); out [T, H, D] and lse_out [T, H] are contiguous.
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    h_ok = h < num_heads
    d_ok = d < head_dim
    m = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    for i in range(num_states):
        o_ptrs = o_ptr + t * stride_ot + i * stride_on + h[:, None] * stride_oh + d[None, :] * stride_od
        m, l, acc = _merge_step(m, l, acc, o_ptrs, lse_ptr + t * stride_lt + i * stride_ln + h * stride_lh,
                                h_ok, d_ok)
    _merge_finish(m, l, acc, out_ptr + (t * num_heads + h[:, None]) * head_dim + d[None, :],
                  lse_out_ptr + t * num_heads + h, h_ok, d_ok)


@triton.jit
def _merge_state_kernel(oa_ptr, lsea_ptr, ob_ptr, lseb_ptr, out_ptr, lse_out_ptr, num_heads, head_dim,
                        stride_at, stride_ah, stride_ad, stride_lat, stride_lah,
                        stride_bt, stride_bh, stride_bd, stride_lbt, stride_lbh,
                        BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    # merge_states with n = 2, the two states in separate tensors.
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    h_ok = h < num_heads
    d_ok = d < head_dim
    m = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    m, l, acc = _merge_step(m, l, acc, oa_ptr + t * stride_at + h[:, None] * stride_ah + d[None, :] * stride_ad,
                            lsea_ptr + t * stride_lat + h * stride_lah, h_ok, d_ok)
    m, l, acc = _merge_step(m, l, acc, ob_ptr + t * stride_bt + h[:, None] * stride_bh + d[None, :] * stride_bd,
                            lseb_ptr + t * stride_lbt + h * stride_lbh, h_ok, d_ok)
    _merge_finish(m, l, acc, out_ptr + (t * num_heads + h[:, None]) * head_dim + d[None, :],
                  lse_out_ptr + t * num_heads + h, h_ok, d_ok)


@triton.jit
def _append_kv_kernel(k_cache_ptr, v_cache_ptr, k_ptr, v_ptr, slots_ptr, num_heads, head_dim,
                      stride_cp, stride_cs, stride_ch, stride_cd,
                      stride_kn, stride_kh, stride_kd, stride_vn, stride_vh, stride_vd,
                      PAGE_SIZE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    # One program per new token: its [Hkv, D] keys and values go to one slot.
    n = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + n).to(tl.int64)
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    ok = (h < num_heads) & (d < head_dim)
    dst = (slot // PAGE_SIZE) * stride_cp + (slot % PAGE_SIZE) * stride_cs + h * stride_ch + d * stride_cd
    k = tl.load(k_ptr + n * stride_kn + h * stride_kh + d * stride_kd, mask=ok)
    v = tl.load(v_ptr + n * stride_vn + h * stride_vh + d * stride_vd, mask=ok)
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=ok)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------------------
# Planning (host side)
# ---------------------------------------------------------------------------

@dataclass
class _Plan:
    """How one attention call is cut into programs."""
    work: Tensor          # [3, W] int32 on the device: request, first row, split
    num_splits: int       # KV chunks per request (partial states to merge when > 1)
    block_m: int
    block_n: int
    mask_offset: Optional[Tensor]  # [B] int64: where each request's mask starts


def _kv_lens(kv_indptr: Tensor, kv_last_page_len: Tensor, page_size: int) -> Tensor:
    """[B] int64 keys per request (0 for a request with no pages)."""
    pages = (kv_indptr[1:] - kv_indptr[:-1]).long()
    return torch.where(pages > 0, (pages - 1) * page_size + kv_last_page_len.long(), 0)


def launch_config(max_rows: int, head_dim: int, dtype: torch.dtype, has_mask: bool,
                  gpu: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the attention kernel: rows per
    program sized to the largest request, keys per tile, chosen per head dim and
    dtype so that the fp32 accumulator and the tiles stay in registers (no spill)
    and the tiles' shared memory fits an A100 block (tests/test_triton_compile.py
    checks every choice compiled for sm_80 and sm_90)."""
    block_d = triton.next_power_of_2(head_dim)
    if dtype == torch.float32:
        # IEEE fp32 dots run on FMA units, not tensor cores, and hold far more in registers:
        # at 4 warps and [64, 32] tiles they spilled 2-8 KB per thread (sm_80 and sm_90).
        # Wider heads take 16-row blocks (32 rows spilled 8-24 B at d96/d128 on sm_80).
        cap, block_n, num_warps, num_stages = (64, 32, 8, 2) if block_d <= 64 else (16, 16, 8, 2)
    else:
        cap = 128 if block_d <= 64 else 64  # keeps the [BLOCK_M, D] fp32 accumulator in registers
        block_n = 64 if block_d <= 64 else 32
        num_warps, num_stages = 4, 2
    block_m = min(max(triton.next_power_of_2(max(max_rows, 1)), 16), cap)
    if block_m * block_d >= 64 * 128:
        num_warps = 8  # e.g. a packed-mask tree tile of 128 rows at d64 spilled with 4 warps
    return block_m, block_n, num_warps, num_stages


@dataclass
class CompileTarget:
    """Set by forkdec.testing_triton_compile while it records launches on CPU tensors:
    the launchers then choose as for a GPU with `sms` SMs (not as for the interpreter)."""
    sms: Optional[int] = None


COMPILE_TARGET = CompileTarget()


def on_gpu(device: torch.device) -> bool:
    """Whether this launch runs compiled GPU code (not the interpreter)."""
    return device.type == "cuda" or COMPILE_TARGET.sms is not None


def _sm_count(device: torch.device) -> int:
    if COMPILE_TARGET.sms is not None:
        return COMPILE_TARGET.sms
    if device.type == "cuda":
        return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return INTERPRETER_SMS


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _choose_splits(programs: int, max_kv: int, device: torch.device) -> int:
    """KV chunks per request: enough programs to fill the GPU, chunks not too short."""
    target = SPLIT_TARGET_WAVES * _sm_count(device)
    if programs == 0 or programs >= target:
        return 1
    return max(1, min(MAX_SPLITS, triton.cdiv(max_kv, MIN_SPLIT_TOKENS), triton.cdiv(target, programs)))


def read_lens(levels: list[tuple[Tensor, Tensor, Tensor]], page_size: int) -> list[Tensor]:
    """[2, B] int64 CPU (qo_len, kv_len) of each level's (qo_indptr, kv_indptr,
    kv_last_page_len): the one device-to-host read a launch plan needs, for all levels at once."""
    parts = []
    for qo_indptr, kv_indptr, last in levels:
        parts.append(torch.stack([(qo_indptr[1:] - qo_indptr[:-1]).long(), _kv_lens(kv_indptr, last, page_size)]))
    if not parts:
        return []
    host = torch.cat(parts, 1).cpu()
    return list(torch.split(host, [p.shape[1] for p in parts], 1))


def _plan(lens: Optional[Tensor], qo_indptr: Tensor, kv_indptr: Tensor, kv_indices: Tensor,
          kv_last_page_len: Tensor, page_size: int, total_q: int, group: int, hkv: int, head_dim: int,
          dtype: torch.dtype, has_mask: bool, num_splits: Optional[int] = None) -> _Plan:
    """Work items (request, row block, split) ordered so that the programs sharing
    a request's KV chunk run side by side. From the host copy `lens` [2, B] of
    (qo_len, kv_len) (read_lens) when there is one; otherwise on the device alone,
    with no device-to-host read: BLOCK_M follows the mean rows per request, the
    list is padded to a host-known bound (items with a first row past their
    request's rows return at once) and the split count assumes the longest
    request could hold every page."""
    device = qo_indptr.device
    batch = qo_indptr.numel() - 1
    qo_len = (qo_indptr[1:] - qo_indptr[:-1]).long()
    mask_offset = None
    if has_mask:
        kv_len = _kv_lens(kv_indptr, kv_last_page_len, page_size)
        mask_offset = torch.cumsum(qo_len * kv_len, 0) - qo_len * kv_len
    gpu = on_gpu(device)
    if lens is not None:
        rows = lens[0] * group
        block_m, block_n, _, _ = launch_config(int(rows.max()) if rows.numel() else 0, head_dim, dtype, has_mask,
                                               gpu)
        blocks = (rows + block_m - 1) // block_m                  # [B] row blocks per request
        if num_splits is None:
            max_kv = int(lens[1].max()) if lens.shape[1] else 0
            num_splits = _choose_splits(int(blocks.sum()) * hkv, max_kv, device)
        work = _work_items(blocks, block_m, num_splits, None).to(torch.int32).to(device)
        return _Plan(work, num_splits, block_m, block_n, mask_offset)
    mean_rows = triton.cdiv(total_q * group, max(batch, 1))
    block_m, block_n, _, _ = launch_config(mean_rows, head_dim, dtype, has_mask, gpu)
    bound = batch + triton.cdiv(total_q * group, block_m)        # >= sum of ceil(rows / block_m)
    if num_splits is None:
        num_splits = _choose_splits(triton.cdiv(total_q * group, block_m) * hkv, kv_indices.numel() * page_size,
                                    device)
    blocks = (qo_len * group + block_m - 1) // block_m
    work = _work_items(blocks, block_m, num_splits, bound * num_splits).to(torch.int32)
    return _Plan(work, num_splits, block_m, block_n, mask_offset)


def _work_items(blocks: Tensor, block_m: int, num_splits: int, padded: Optional[int]) -> Tensor:
    """[3, W] (request, first row, split): per request its row blocks for split 0, then
    split 1, ... On the device with `padded` = W: the items past the real ones get
    request 0 and a first row no request reaches."""
    per_req = blocks * num_splits
    if padded is not None:  # a last "request" takes up the slack, so the total is known without a read
        per_req = torch.cat([per_req, (padded - per_req.sum()).reshape(1)])
    ids = torch.arange(per_req.numel(), device=blocks.device)
    req = torch.repeat_interleave(ids, per_req, output_size=padded)
    local = torch.arange(req.numel(), device=blocks.device) - (torch.cumsum(per_req, 0) - per_req)[req]
    req_blocks = torch.cat([blocks, blocks.new_ones(1)])[req] if padded is not None else blocks[req]
    req_blocks = req_blocks.clamp(min=1)                          # >= 1 wherever a request has work
    work = torch.stack([req, local % req_blocks * block_m, local // req_blocks])
    if padded is not None:
        pad = req == blocks.numel()
        work[0] = torch.where(pad, 0, work[0])
        work[1] = torch.where(pad, 2 ** 30, work[1])
        work[2] = torch.where(pad, 0, work[2])
    return work


class LaunchPlan:
    """A step's attention metadata planned once for every layer: the host copy of
    the lengths (read at construction, the step's only device-to-host read) and,
    per head configuration, each level's work list. `attention` and
    `cascade_attention` given a plan read nothing back from the device.

    levels: (qo_indptr, kv_indptr, kv_indices, kv_last_page_len, custom_mask) per level, int32 on the device."""

    def __init__(self, levels: list[tuple], page_size: int, num_splits: Optional[int] = None,
                 read_back: bool = True):
        self.levels = [tuple(_int32(t) if i < 4 else t for i, t in enumerate(lv)) for lv in levels]
        self.page_size = page_size
        self.num_splits = num_splits
        self.lens = (read_lens([(lv[0], lv[1], lv[3]) for lv in self.levels], page_size) if read_back
                     else [None] * len(self.levels))
        self._plans: dict = {}

    def level_plans(self, total_q: int, hq: int, hkv: int, head_dim: int, dtype: torch.dtype) -> list[_Plan]:
        key = (total_q, hq, hkv, head_dim, dtype)
        if key not in self._plans:
            self._plans[key] = [_plan(lens, lv[0], lv[1], lv[2], lv[3], self.page_size, total_q, hq // hkv, hkv,
                                      head_dim, dtype, lv[4] is not None, self.num_splits)
                                for lens, lv in zip(self.lens, self.levels)]
        return self._plans[key]


def _launch(plan: _Plan, q: Tensor, k_cache: Tensor, v_cache: Tensor, qo_indptr: Tensor, kv_indptr: Tensor,
            kv_indices: Tensor, kv_last_page_len: Tensor, causal: bool, custom_mask: Optional[Tensor],
            sm_scale: float, out: Tensor, lse: Tensor, out_slot0: int) -> None:
    """Run the attention kernel; partial state of split s goes to slot out_slot0 + s
    of out [T, slots, Hq, D] and lse [T, slots, Hq] (slot stride 0 when unsplit)."""
    num_work = plan.work.shape[1]
    if num_work == 0:
        return
    _, hq, head_dim = q.shape
    hkv = k_cache.shape[2]
    if custom_mask is None:
        mask_mode, mask = MASK_NONE, plan.work  # unread placeholder
    elif custom_mask.dtype == torch.bool:
        mask_mode, mask = MASK_BOOL, custom_mask.view(torch.uint8)
    else:
        mask_mode, mask = MASK_PACKED, custom_mask
    mask_offset = plan.mask_offset if plan.mask_offset is not None else plan.work
    block_d = triton.next_power_of_2(head_dim)
    _, _, num_warps, num_stages = launch_config(plan.block_m, head_dim, q.dtype, custom_mask is not None,
                                                on_gpu(q.device))
    _attention_kernel[(num_work, hkv)](
        q, k_cache, v_cache, out, lse,
        qo_indptr, kv_indptr, kv_indices, kv_last_page_len, mask, mask_offset,
        plan.work, num_work, plan.num_splits, out_slot0, float(sm_scale) * 1.4426950408889634,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride(), *lse.stride(),
        GROUP=hq // hkv, HEAD_DIM=head_dim, PAGE_SIZE=k_cache.shape[1],
        BLOCK_M=plan.block_m, BLOCK_N=plan.block_n, BLOCK_D=block_d,
        CAUSAL=bool(causal), MASK_MODE=mask_mode, FP32_DOT=_fp32_dot(q.dtype, q.device),
        num_warps=num_warps, num_stages=num_stages)


def _fp32_dot(dtype: torch.dtype, device: torch.device) -> bool:
    """Multiply in fp32: for fp32 inputs (IEEE, not TF32), and for bf16 under the
    interpreter, whose tl.dot multiplies bf16 bit patterns as integers (Triton 3.9)."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and not on_gpu(device))


def _int32(t: Tensor) -> Tensor:
    return t if t.dtype == torch.int32 else t.to(torch.int32)


# ---------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------

def attention(q: Tensor, qo_indptr: Tensor, k_cache: Tensor, v_cache: Tensor, kv_indptr: Tensor,
              kv_indices: Tensor, kv_last_page_len: Tensor, causal: bool, custom_mask: Optional[Tensor],
              sm_scale: float, num_splits: Optional[int] = None,
              plan: Optional[LaunchPlan] = None) -> tuple[Tensor, Tensor]:
    """Ragged queries over a paged KV cache.

    q [total_q, Hq, D] fp32/fp16/bf16, any strides; k_cache, v_cache
    [num_pages, page_size, Hkv, D] contiguous, q's dtype; index tensors int32
    (int64 accepted); custom_mask None, bool or bit-packed uint8.
    Returns out [total_q, Hq, D] in q's dtype and lse [total_q, Hq] fp32.
    num_splits forces the number of KV chunks per request (None: heuristic).
    plan: a LaunchPlan of this one level; None plans on the device (no
    device-to-host read either, a looser grid).
    """
    qo_indptr, kv_indptr, kv_indices, kv_last_page_len = map(_int32, (qo_indptr, kv_indptr, kv_indices,
                                                                    kv_last_page_len))
    total_q, hq, head_dim = q.shape
    if plan is None:
        plan = LaunchPlan([(qo_indptr, kv_indptr, kv_indices, kv_last_page_len, custom_mask)], k_cache.shape[1],
                          num_splits, read_back=False)
    plan = plan.level_plans(total_q, hq, k_cache.shape[2], head_dim, q.dtype)[0]
    args = (q, k_cache, v_cache, qo_indptr, kv_indptr, kv_indices, kv_last_page_len, causal, custom_mask, sm_scale)
    if plan.num_splits == 1:  # write the final state directly, a zero slot stride
        out = torch.empty(total_q, hq, head_dim, dtype=q.dtype, device=q.device)
        lse = torch.empty(total_q, hq, dtype=torch.float32, device=q.device)
        _launch(plan, *args, out.unsqueeze(1).expand(-1, 1, -1, -1), lse.unsqueeze(1).expand(-1, 1, -1), 0)
        return out, lse
    o_parts = torch.empty(total_q, plan.num_splits, hq, head_dim, dtype=torch.float32, device=q.device)
    lse_parts = torch.empty(total_q, plan.num_splits, hq, dtype=torch.float32, device=q.device)
    _launch(plan, *args, o_parts, lse_parts, 0)
    return _merge_into(o_parts, lse_parts, q.dtype)


def cascade_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, qo_indptr: list, kv_indptr: list,
                      kv_indices: list, kv_last_page_len: list, causal: list, custom_mask: list,
                      sm_scale: float, num_splits: Optional[int] = None,
                      plan: Optional[LaunchPlan] = None) -> tuple[Tensor, Tensor]:
    """Attention over the union of each query's keys across levels (one list entry
    per level, shapes as in `attention`). Every level (and KV split) writes an fp32
    partial state into one [total_q, slots, Hq, D] buffer; one merge by LSE then
    rounds to q's dtype. Returns out [total_q, Hq, D] in q's dtype, lse [total_q, Hq] fp32.
    plan: the LaunchPlan of these levels; None plans on the device (no device-to-host read either)."""
    total_q, hq, head_dim = q.shape
    if plan is None:
        plan = LaunchPlan(list(zip(qo_indptr, kv_indptr, kv_indices, kv_last_page_len, custom_mask)),
                          k_cache.shape[1], num_splits, read_back=False)
    levels = [lv[:4] for lv in plan.levels]
    plans = plan.level_plans(total_q, hq, k_cache.shape[2], head_dim, q.dtype)
    slots = sum(p.num_splits for p in plans)
    o_parts = torch.empty(total_q, slots, hq, head_dim, dtype=torch.float32, device=q.device)
    lse_parts = torch.empty(total_q, slots, hq, dtype=torch.float32, device=q.device)
    slot0 = 0
    for plan, (qo, kvp, kvi, last), is_causal, mask in zip(plans, levels, causal, custom_mask):
        _launch(plan, q, k_cache, v_cache, qo, kvp, kvi, last, is_causal, mask, sm_scale, o_parts, lse_parts, slot0)
        slot0 += plan.num_splits
    return _merge_into(o_parts, lse_parts, q.dtype)


def _merge_grid(t: int, h: int, d: int) -> tuple[tuple[int, int], int, int]:
    block_d = triton.next_power_of_2(max(d, 1))
    block_h = min(triton.next_power_of_2(max(h, 1)), max(1, 4096 // block_d))
    return (t, triton.cdiv(h, block_h)), block_h, block_d


def _merge_into(o: Tensor, lse: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """merge_states with the output in `dtype`."""
    t, n, h, d = o.shape
    out = torch.empty(t, h, d, dtype=dtype, device=o.device)
    lse_out = torch.empty(t, h, dtype=torch.float32, device=o.device)
    if out.numel() == 0 and lse_out.numel() == 0:
        return out, lse_out
    grid, block_h, block_d = _merge_grid(t, h, d)
    _merge_states_kernel[grid](o, lse, out, lse_out, n, h, d, *o.stride(), *lse.stride(),
                               BLOCK_H=block_h, BLOCK_D=block_d)
    return out, lse_out


def merge_states(o: Tensor, lse: Tensor) -> tuple[Tensor, Tensor]:
    """Merge n states per query over disjoint key sets: o [T, n, H, D], lse [T, n, H]
    fp32, any strides -> (out [T, H, D] in o's dtype, lse [T, H] fp32). States with
    lse -inf contribute nothing; all empty gives 0 and -inf."""
    return _merge_into(o, lse, o.dtype)


def merge_state(o_a: Tensor, lse_a: Tensor, o_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """Merge two states: o_* [T, H, D], lse_* [T, H] fp32, any strides ->
    (out [T, H, D] in o_a's dtype, lse [T, H] fp32)."""
    t, h, d = o_a.shape
    out = torch.empty(t, h, d, dtype=o_a.dtype, device=o_a.device)
    lse_out = torch.empty(t, h, dtype=torch.float32, device=o_a.device)
    if out.numel() == 0 and lse_out.numel() == 0:
        return out, lse_out
    grid, block_h, block_d = _merge_grid(t, h, d)
    _merge_state_kernel[grid](o_a, lse_a, o_b, lse_b, out, lse_out, h, d, *o_a.stride(), *lse_a.stride(),
                              *o_b.stride(), *lse_b.stride(), BLOCK_H=block_h, BLOCK_D=block_d)
    return out, lse_out


def append_kv(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, slots: Tensor) -> None:
    """Write k, v [N, Hkv, D] (any strides) into k_cache, v_cache [num_pages,
    page_size, Hkv, D] in place at slots [N] (slot = page * page_size + offset)."""
    n, hkv, head_dim = k.shape
    if n == 0:
        return
    assert k_cache.stride() == v_cache.stride(), "k_cache and v_cache need the same layout"
    _append_kv_kernel[(n,)](k_cache, v_cache, k, v, slots, hkv, head_dim, *k_cache.stride(), *k.stride(),
                            *v.stride(), PAGE_SIZE=k_cache.shape[1], BLOCK_H=triton.next_power_of_2(hkv),
                            BLOCK_D=triton.next_power_of_2(head_dim))
