"""XQuant attention in Triton: K and V rematerialized from cached X̂ pages inside
the attention loop (docs/xquant.md; conventions of docs/attention.md).

One program owns (request, KV head, block of BLOCK_M rows); the rows of a
request are its queries times the g = Hq / Hkv query heads of the KV head (row
r is query r // g, head kv_head * g + r % g), so a shared prompt's X̂ tile is
dequantized and projected once for up to BLOCK_M rows (all 64 paths' rows of a
SmolLM2 KV head take 192 rows: three blocks of 64). Per tile of BLOCK_N keys
(gathered through the page table, possibly across pages) it
  - dequantizes X̂ in BLOCK_W-wide column chunks straight from the packed codes
    (2/3/4/8 bits, token or channel groups, fp16 scale/zero) or float pages,
  - K = X̂k·wk + bk and its rotate-half partner X̂k·wk' + bk' (wk' = wk with its
    column halves swapped and the first negated), so RoPE is K·cos + K'·sin,
  - V = X̂v·wv + bv (on a GPU the [BLOCK_M, Wv] P·X̂v accumulator the CPU kernel
    uses would not fit in registers for Wv = 576),
  - S = Q K^T, masks, online softmax in base 2 and O += P V, accumulated in
    fp32; the products in IEEE fp32 for fp32 q (and always under the
    interpreter, for exact tests), in fp16 on tensor cores for fp16/bf16 q on a GPU.
When there are too few programs to fill the GPU (a few requests with long
prompts: decode), each request's keys are split into chunks whose states are
merged by LSE (triton_kernels/attention.py's merge_states). The launch reads
nothing back from the device (no host sync): its grid is sized from host-known
bounds and the programs without work exit at once.
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl
from torch import Tensor

# Constants, the split-KV heuristic and the LSE merge are attention's (one definition).
from forkdec.triton_kernels.attention import (LN2, LOG2E, MASK_BOOL, MASK_NONE, MASK_PACKED, _choose_splits,
                                              merge_states, on_gpu)

BLOCK_N = 16   # keys per tile
BLOCK_W = 32   # X̂ columns per chunk of the K/V projections


def launch_config(rows: int, head_dim: int, half_dot: bool) -> tuple[int, int, int]:
    """(BLOCK_M, num_warps, num_stages) of the xquant kernel for requests of about
    `rows` rows (queries x group), per head dim and dot precision, chosen so that
    the [BLOCK_M, D] accumulator and the [BLOCK_N, D] K, K', V tiles stay in
    registers and the pipelined weight tiles fit an A100 block's shared memory:
    before, d128 spilled 250-420 B (fp16 dots) and 2.3-2.8 KB (fp32), d256 needed
    184-236 KB of shared memory. tests/test_triton_compile.py checks every choice
    for sm_80 and sm_90."""
    block_d = triton.next_power_of_2(head_dim)
    if half_dot:  # fp16 tensor-core dots
        cap, num_warps, num_stages = (64, 4, 2) if block_d <= 64 else (64, 8, 2) if block_d <= 128 else (32, 8, 2)
    else:  # IEEE fp32 dots on FMA units: more registers per product, no room to pipeline
        cap, num_warps, num_stages = (32, 8, 1) if block_d <= 128 else (16, 8, 1)
    return max(16, min(cap, triton.next_power_of_2(max(rows, 1)))), num_warps, num_stages


@triton.jit
def _dot(a, b, HALF_DOT: tl.constexpr):
    """a @ b with fp32 accumulation; HALF_DOT multiplies fp16 operands on tensor cores
    (fp16, not bf16: 11 mantissa bits, and the interpreter multiplies fp16 correctly)."""
    if HALF_DOT:
        return tl.dot(a.to(tl.float16), b.to(tl.float16))
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _load_x(codes_ptr, scale_ptr, zero_ptr, page, tp, ok_t, cols, width, page_size, stride_page, stride_token,
            QUANT: tl.constexpr, BITS: tl.constexpr, GS: tl.constexpr, CHANNEL: tl.constexpr):
    """X̂[t, c] as fp32 [BLOCK_N, BLOCK_W] for tokens at in-page offsets tp of `page`, columns cols."""
    ok = ok_t[:, None] & (cols[None, :] < width)
    if QUANT:
        groups = page_size * width // GS
        if CHANNEL:
            grp = (tp[:, None] // GS) * width + cols[None, :]
            e = tp[:, None] % GS
        else:
            grp = tp[:, None] * (width // GS) + cols[None, :] // GS
            e = cols[None, :] % GS
        gid = page[:, None].to(tl.int64) * groups + grp
        bit = e * BITS
        byte_ptr = codes_ptr + gid * (GS * BITS // 8) + bit // 8
        shift = bit % 8
        raw = tl.load(byte_ptr, mask=ok, other=0).to(tl.int32)
        if BITS == 3:  # a 3-bit code may straddle two bytes
            nxt = tl.load(byte_ptr + 1, mask=ok & (shift > 5), other=0).to(tl.int32)
            raw = raw | (nxt << 8)
        code = (raw >> shift) & ((1 << BITS) - 1)
        s = tl.load(scale_ptr + gid, mask=ok, other=0.0).to(tl.float32)
        z = tl.load(zero_ptr + gid, mask=ok, other=0.0).to(tl.float32)
        return tl.where(ok, code.to(tl.float32) * s + z, 0.0)
    ptrs = codes_ptr + page[:, None].to(tl.int64) * stride_page + tp[:, None] * stride_token + cols[None, :]
    return tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _xquant_kernel(
        q_ptr, sq_t, sq_h, out_ptr, lse_ptr, so_q, so_split, sl_q, sl_split, num_splits,
        qo_indptr_ptr, kv_indptr_ptr, kv_indices_ptr, last_ptr, start_ptr, mask_ptr, mask_off_ptr,
        xk_ptr, xk_scale_ptr, xk_zero_ptr, xk_sp, xk_st, wk_dim,
        xv_ptr, xv_scale_ptr, xv_zero_ptr, xv_sp, xv_st, wv_dim,
        wk_ptr, wv_ptr, bk_ptr, bv_ptr, cos_ptr, sin_ptr,
        page_size, hq, group, sm_scale,
        D: tl.constexpr, BLOCK_D: tl.constexpr, HAS_BK: tl.constexpr, HAS_BV: tl.constexpr, CAUSAL: tl.constexpr, MASK_MODE: tl.constexpr,
        K_QUANT: tl.constexpr, K_BITS: tl.constexpr, K_GS: tl.constexpr, K_CHANNEL: tl.constexpr,
        V_QUANT: tl.constexpr, V_BITS: tl.constexpr, V_GS: tl.constexpr, V_CHANNEL: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, HALF_DOT: tl.constexpr):
    b = tl.program_id(0)
    hk = tl.program_id(1)
    mb = tl.program_id(2) // num_splits
    split = tl.program_id(2) % num_splits
    q0 = tl.load(qo_indptr_ptr + b)
    qo_len = tl.load(qo_indptr_ptr + b + 1) - q0
    p0 = tl.load(kv_indptr_ptr + b)
    n_pages = tl.load(kv_indptr_ptr + b + 1) - p0
    kv_len = tl.where(n_pages > 0, (n_pages - 1) * page_size + tl.load(last_ptr + b), 0)
    start = tl.load(start_ptr + b)
    rows = qo_len * group
    if mb * BLOCK_M >= rows:  # the grid covers the largest request the host can bound
        return
    # This split's keys: an equal share of the request's, in whole tiles.
    split_len = tl.cdiv(tl.cdiv(kv_len, num_splits), BLOCK_N) * BLOCK_N
    hd = D * tl.num_programs(1)

    r = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    r_ok = r < rows
    qi = r // group
    head = hk * group + r % group
    # The head dim runs padded to BLOCK_D, a power of 2 (tl.arange needs one: d96 runs as 128).
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    half = D // 2
    # wk' columns: d < D/2 takes -wk[:, d + D/2], d >= D/2 takes wk[:, d - D/2].
    d_rot = tl.where(d < half, d + half, d - half)
    sign = tl.where(d < half, -1.0, 1.0)
    q = tl.load(q_ptr + (q0 + qi)[:, None].to(tl.int64) * sq_t + head[:, None] * sq_h + d[None, :],
                mask=r_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32) * (sm_scale * LOG2E)

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    mask_off = tl.load(mask_off_ptr + b)
    k_end = tl.minimum(kv_len, (split + 1) * split_len)
    for t0 in range(split * split_len, k_end, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)
        t_ok = t < kv_len
        page = tl.load(kv_indices_ptr + p0 + t // page_size, mask=t_ok, other=0)
        tp = t % page_size
        k = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        k_rot = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        for w0 in range(0, wk_dim, BLOCK_W):
            cols = w0 + tl.arange(0, BLOCK_W)
            x = _load_x(xk_ptr, xk_scale_ptr, xk_zero_ptr, page, tp, t_ok, cols, wk_dim, page_size, xk_sp, xk_st,
                        K_QUANT, K_BITS, K_GS, K_CHANNEL)
            w_ok = (cols < wk_dim)[:, None] & d_ok[None, :]
            w = tl.load(wk_ptr + cols[:, None] * hd + hk * D + d[None, :], mask=w_ok, other=0.0)
            w_rot = tl.load(wk_ptr + cols[:, None] * hd + hk * D + d_rot[None, :], mask=w_ok, other=0.0) * sign[None, :]
            k += _dot(x, w, HALF_DOT)
            k_rot += _dot(x, w_rot, HALF_DOT)
        if HAS_BK:
            k += tl.load(bk_ptr + hk * D + d, mask=d_ok, other=0.0)[None, :]
            k_rot += tl.load(bk_ptr + hk * D + d_rot, mask=d_ok, other=0.0)[None, :] * sign[None, :]
        pos = (start + t)[:, None] * D + d[None, :]
        cs = tl.load(cos_ptr + pos, mask=t_ok[:, None] & d_ok[None, :], other=0.0)
        sn = tl.load(sin_ptr + pos, mask=t_ok[:, None] & d_ok[None, :], other=0.0)
        k = k * cs + k_rot * sn

        v = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        for w0 in range(0, wv_dim, BLOCK_W):
            cols = w0 + tl.arange(0, BLOCK_W)
            x = _load_x(xv_ptr, xv_scale_ptr, xv_zero_ptr, page, tp, t_ok, cols, wv_dim, page_size, xv_sp, xv_st,
                        V_QUANT, V_BITS, V_GS, V_CHANNEL)
            w = tl.load(wv_ptr + cols[:, None] * hd + hk * D + d[None, :],
                        mask=(cols < wv_dim)[:, None] & d_ok[None, :], other=0.0)
            v += _dot(x, w, HALF_DOT)
        if HAS_BV:
            v += tl.load(bv_ptr + hk * D + d, mask=d_ok, other=0.0)[None, :]

        s = _dot(q, tl.trans(k), HALF_DOT)
        visible = r_ok[:, None] & t_ok[None, :]
        if CAUSAL:
            visible = visible & (t[None, :] <= kv_len - qo_len + qi[:, None])
        if MASK_MODE != 0:
            idx = mask_off + qi[:, None].to(tl.int64) * kv_len + t[None, :]
            if MASK_MODE == 1:
                allowed = tl.load(mask_ptr + idx, mask=visible, other=0) != 0
            else:
                allowed = ((tl.load(mask_ptr + idx // 8, mask=visible, other=0).to(tl.int32) >> (idx % 8)) & 1) != 0
            visible = visible & allowed
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.where(m == float("-inf"), 0.0, tl.exp2(m - safe))
        p = tl.where(visible, tl.exp2(s - safe[:, None]), 0.0)
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p, v, HALF_DOT)
        m = m_new

    seen = l > 0
    o = tl.where(seen[:, None], acc / tl.where(seen, l, 1.0)[:, None], 0.0)
    lse = tl.where(seen, (m + tl.log2(tl.where(seen, l, 1.0))) * LN2, float("-inf"))
    qrow = (q0 + qi).to(tl.int64)
    tl.store(out_ptr + (qrow * so_q + split * so_split + head * D)[:, None] + d[None, :], o,
             mask=r_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + qrow * sl_q + split * sl_split + head, lse, mask=r_ok)


def _store_args(x: Tensor, scale: Tensor | None, zero: Tensor | None) -> tuple:
    if scale is None:  # float pages: strides of [P, page_size, W], W contiguous
        x = x if x.stride(-1) == 1 else x.contiguous()
        return x, x, x, x.stride(0), x.stride(1)
    return x.contiguous(), scale.contiguous(), zero.contiguous(), 0, 0


def xquant_attention(q: Tensor, qo_indptr: Tensor, xk: Tensor, xk_scale: Tensor | None, xk_zero: Tensor | None,
                     xk_bits: int, xk_group_size: int, xk_axis: int, xk_width: int, xv: Tensor,
                     xv_scale: Tensor | None, xv_zero: Tensor | None, xv_bits: int, xv_group_size: int, xv_axis: int,
                     xv_width: int, page_size: int, kv_indptr: Tensor, kv_indices: Tensor, kv_last_page_len: Tensor,
                     kv_start_pos: Tensor, wk: Tensor, wv: Tensor, bk: Tensor | None, bv: Tensor | None,
                     rope_cos: Tensor, rope_sin: Tensor, causal: bool, custom_mask: Tensor | None,
                     sm_scale: float, num_splits: int | None = None,
                     half_dot: bool | None = None) -> tuple[Tensor, Tensor]:
    """Arguments of torch.ops.forkdec.xquant_attention (already validated by the face);
    num_splits forces the number of KV chunks per request (tests). half_dot: multiply in
    fp16 (fp32 accumulation); default on a GPU for fp16/bf16 q, IEEE fp32 otherwise."""
    if half_dot is None:
        half_dot = on_gpu(q.device) and q.dtype != torch.float32
    total_q, hq, d = q.shape
    hkv = wk.shape[1] // d
    group = hq // hkv
    batch = qo_indptr.numel() - 1
    out = torch.zeros(total_q, hq, d, dtype=torch.float32, device=q.device)
    lse = torch.full((total_q, hq), float("-inf"), dtype=torch.float32, device=q.device)
    if batch == 0 or total_q == 0:
        return out.to(q.dtype), lse
    i32 = lambda t: t.to(device=q.device, dtype=torch.int32).contiguous()  # noqa: E731
    qo_indptr, kv_indptr, kv_indices = i32(qo_indptr), i32(kv_indptr), i32(kv_indices)
    last, start = i32(kv_last_page_len), i32(kv_start_pos)
    n_pages = (kv_indptr[1:] - kv_indptr[:-1]).long()
    kv_lens = torch.where(n_pages > 0, (n_pages - 1) * page_size + last.long(), 0)
    qo_lens = (qo_indptr[1:] - qo_indptr[:-1]).long()
    mask_off = torch.cat([kv_lens.new_zeros(1), (qo_lens * kv_lens).cumsum(0)[:-1]])
    mode = MASK_NONE
    mask_arg = mask_off
    if custom_mask is not None:
        mode = MASK_PACKED if custom_mask.dtype == torch.uint8 else MASK_BOOL
        mask_arg = custom_mask.contiguous().view(torch.uint8) if custom_mask.numel() else mask_off
    qv = q if q.stride(-1) == 1 else q.contiguous()
    f32 = lambda t: t.to(device=q.device, dtype=torch.float32).contiguous()  # noqa: E731
    wk, wv, cos, sin = f32(wk), f32(wv), f32(rope_cos), f32(rope_sin)
    bk_arg = f32(bk) if bk is not None else wk
    bv_arg = f32(bv) if bv is not None else wv
    k_args = _store_args(xk, xk_scale, xk_zero)
    v_args = _store_args(xv, xv_scale, xv_zero)
    # No device-to-host read: the grid is sized from what the host knows. No request
    # has more than total_q queries or kv_indices.numel() pages; row blocks past a
    # request's rows and splits past its keys exit at once (an empty split's state
    # has lse -inf). BLOCK_M follows the mean rows per request.
    mean_rows = triton.cdiv(total_q * group, batch)
    block_m, num_warps, num_stages = launch_config(mean_rows, d, bool(half_dot))
    row_blocks = max(1, triton.cdiv(total_q * group, block_m))
    max_kv = kv_indices.numel() * page_size
    splits = num_splits or _choose_splits(batch * hkv * triton.cdiv(mean_rows, block_m), max_kv, q.device)
    if splits > 1:  # partial states [total_q, splits, Hq, D], merged below
        o_buf = torch.zeros(total_q, splits, hq, d, dtype=torch.float32, device=q.device)
        l_buf = torch.full((total_q, splits, hq), float("-inf"), dtype=torch.float32, device=q.device)
        strides = (splits * hq * d, hq * d, splits * hq, hq)
    else:
        o_buf, l_buf, strides = out, lse, (hq * d, 0, hq, 0)
    _xquant_kernel[(batch, hkv, row_blocks * splits)](
        qv, qv.stride(0), qv.stride(1), o_buf, l_buf, *strides, splits,
        qo_indptr, kv_indptr, kv_indices, last, start, mask_arg, mask_off,
        k_args[0], k_args[1], k_args[2], k_args[3], k_args[4], xk_width,
        v_args[0], v_args[1], v_args[2], v_args[3], v_args[4], xv_width,
        wk, wv, bk_arg, bv_arg, cos, sin,
        page_size, hq, group, float(sm_scale),
        D=d, BLOCK_D=triton.next_power_of_2(d), HAS_BK=bk is not None, HAS_BV=bv is not None, CAUSAL=bool(causal), MASK_MODE=mode,
        K_QUANT=xk_scale is not None, K_BITS=xk_bits, K_GS=max(xk_group_size, 1), K_CHANNEL=xk_axis == 1,
        V_QUANT=xv_scale is not None, V_BITS=xv_bits, V_GS=max(xv_group_size, 1), V_CHANNEL=xv_axis == 1,
        BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_W=BLOCK_W, HALF_DOT=bool(half_dot),
        num_warps=num_warps, num_stages=num_stages)
    if splits > 1:
        out, lse = merge_states(o_buf, l_buf)
    return out.to(q.dtype), lse
