"""Fuzzer over the metadata of every forkdec CPU op, validation switched off.

Hypothesis draws a *case* (a small JSON-able dict: shapes, index arrays, special
values, a seed for the float data) per op; `run_case` builds the tensors and
calls the op inside `forkdec.validation(False)`, so only the C++ op layer's own
bound checks stand between the metadata and the kernels. Every input must
either raise a clear error (ValueError / RuntimeError naming an argument) or
return outputs of the right shape whose values stay within what in-bounds data
allows. Reads just outside a buffer are made visible: caches, RoPE tables and
probability rows are views into larger tensors whose guard cells hold GUARD, a
value no in-bounds result can reach; writes outside are caught by checking the
guard cells afterwards. Crashes and hangs are caught by the caller running this
module in a subprocess: the case being run is written to `--current` first.

    python tests/fuzz/ops_fuzz.py --examples 200            # the CI run (derandomized)
    python tests/fuzz/ops_fuzz.py --examples 20000 --random  # a longer run (docs/verification.md)

A failing case is written to tests/fuzz/corpus/ and replayed by tests/test_fuzz_ops.py.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import forkdec
from forkdec import ops
from forkdec.qweight import BLOCK, TILE

CascadeLevel = importlib.import_module("forkdec.ops.attention").CascadeLevel
CORPUS = Path(__file__).resolve().parent / "corpus"
GUARD = 1.0e4  # every in-bounds value is in [-1, 1]: a GUARD in an output means an out-of-bounds read
CASE_TIMEOUT_S = 30  # one small case taking longer is a hang
SPECIAL = [float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 1e-30, 3e38, -3e38]


class Finding(AssertionError):
    """An input that crashed the contract: neither a clear error nor an in-bounds result."""


# ---- helpers -------------------------------------------------------------------------------------


def _gen(case: dict) -> torch.Generator:
    return torch.Generator().manual_seed(int(case["seed"]))


def _rand(shape, g, dtype=torch.float32) -> torch.Tensor:
    return (torch.rand(shape, generator=g) * 2 - 1).to(dtype)


def _poke(t: torch.Tensor, specials: list, g: torch.Generator) -> None:
    """Writes special values (NaN, inf, ...) at random positions of t, in place."""
    for v in specials:
        if t.numel():  # by multi-index: t may be a non-contiguous view
            i = int(torch.randint(t.numel(), (1,), generator=g))
            t[torch.unravel_index(torch.tensor(i), t.shape)] = v


def _guarded(shape, g, dtype=torch.float32, pad: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """(buffer, view): view = buffer[pad:-pad] along dim 0 holds data in [-1, 1], the rest GUARD."""
    buf = torch.full((shape[0] + 2 * pad, *shape[1:]), GUARD, dtype=dtype)
    view = buf[pad:pad + shape[0]]
    view.copy_(_rand(view.shape, g, dtype))
    return buf, view


def _i32(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32)


def _clear_error(e: BaseException, names: tuple[str, ...]) -> bool:
    """A ValueError / RuntimeError that names one of the op's arguments (as a word: 'x' is not in 'max')."""
    msg = str(e)
    return isinstance(e, (ValueError, RuntimeError)) and any(
        re.search(rf"(?<![A-Za-z0-9_]){re.escape(n)}(?![A-Za-z0-9])", msg) for n in names)


def _bounded(t: torch.Tensor, bound: float, what: str) -> None:
    finite = t[torch.isfinite(t)].float()
    if finite.numel() and float(finite.abs().max()) > bound:
        raise Finding(f"{what}: |value| {float(finite.abs().max()):.4g} > {bound:.4g} (an out-of-bounds read?)")


# ---- strategies ----------------------------------------------------------------------------------

seeds = st.integers(0, 2**31 - 1)
small = st.integers(0, 4)


def indptr(length_max: int, end_max: int):
    """Mostly well-formed indptr lists (0, cumulative, ends anywhere), and arbitrary ones."""
    wellformed = st.lists(st.integers(0, 3), min_size=0, max_size=length_max).map(
        lambda lens: [0] + [sum(lens[: i + 1]) for i in range(len(lens))])
    arbitrary = st.lists(st.integers(-3, end_max + 3), min_size=0, max_size=length_max + 2)
    return st.one_of(wellformed, wellformed, arbitrary)


CORRUPTIONS = ["qo_unsorted", "qo_past_end", "qo_short", "kv_unsorted", "kv_past_end", "kv_long", "page_oob",
               "page_negative", "page_huge", "last_zero", "last_big", "last_short", "mask_length"]


@st.composite
def attention_level(draw, total_q: int, num_pages: int, page_size: int):
    """A well-formed level, then up to two named corruptions of its metadata."""
    batch = draw(st.integers(0, 4))
    cuts = sorted(draw(st.lists(st.integers(0, total_q), min_size=max(batch - 1, 0), max_size=max(batch - 1, 0))))
    qo = [0] + cuts + [total_q] if batch else [0]
    batch = len(qo) - 1
    pages_per = draw(st.lists(st.integers(0, 3), min_size=batch, max_size=batch))
    kv = [0]
    for n in pages_per:
        kv.append(kv[-1] + n)
    ids = st.integers(0, num_pages - 1) if num_pages else st.just(0)
    kv_indices = draw(st.lists(ids, min_size=kv[-1], max_size=kv[-1]))
    if not num_pages:  # no valid page id exists: requests get no pages
        kv, kv_indices = [0] * (batch + 1), []
    last = draw(st.lists(st.integers(1, page_size), min_size=batch, max_size=batch))
    level = {"qo_indptr": qo, "kv_indptr": kv, "kv_indices": kv_indices, "kv_last_page_len": last,
             "causal": draw(st.booleans()), "mask": draw(st.sampled_from([None, None, "bool", "packed"])),
             "mask_delta": 0, "corruptions": draw(st.lists(st.sampled_from(CORRUPTIONS), max_size=2))}
    for c in level["corruptions"]:
        at = draw(st.integers(0, 10))
        pick = lambda xs: at % len(xs)  # noqa: E731
        if c == "qo_unsorted" and len(qo) > 2:
            i = pick(qo[1:-1]) + 1
            qo[i] = qo[i + 1] + draw(st.integers(1, 3))
        elif c == "qo_past_end" and qo:
            qo[-1] += draw(st.integers(1, 3))
        elif c == "qo_short" and qo:
            qo.pop()  # down to an empty qo_indptr
        elif c == "kv_unsorted" and len(kv) > 2:
            i = pick(kv[1:-1]) + 1
            kv[i] = kv[i + 1] + draw(st.integers(1, 3))
        elif c == "kv_past_end" and kv:
            kv[-1] += draw(st.integers(1, 3))
        elif c == "kv_long":
            kv.append(kv[-1])
        elif c == "page_oob" and kv_indices:
            kv_indices[pick(kv_indices)] = num_pages + draw(st.integers(0, 2))
        elif c == "page_negative" and kv_indices:
            kv_indices[pick(kv_indices)] = -draw(st.integers(1, 3))
        elif c == "page_huge" and kv_indices:
            kv_indices[pick(kv_indices)] = draw(st.sampled_from([2**31 - 1, -(2**31)]))
        elif c == "last_zero" and last:
            last[pick(last)] = 0
        elif c == "last_big" and last:
            last[pick(last)] = page_size + draw(st.sampled_from([1, 2, 2**31 - 1 - page_size]))
        elif c == "last_short" and last:
            last.pop()
        elif c == "mask_length":
            level["mask"] = level["mask"] or "bool"
            level["mask_delta"] = draw(st.sampled_from([-1, 1, -9, 9, 1000]))
    return level


@st.composite
def attention_case(draw, levels_max: int = 1):
    total_q = draw(st.integers(0, 6))
    num_pages = draw(st.integers(0, 5))
    page_size = draw(st.sampled_from([1, 2, 4]))
    hkv = draw(st.sampled_from([1, 2]))
    group = draw(st.sampled_from([1, 2, 3]))
    levels = draw(st.lists(attention_level(total_q, num_pages, page_size), min_size=1, max_size=levels_max))
    return {"seed": draw(seeds), "total_q": total_q, "num_pages": num_pages, "page_size": page_size, "hkv": hkv,
            "hq": hkv * group, "d": draw(st.sampled_from([32, 64])),
            "dtype": draw(st.sampled_from(["float32", "float32", "bfloat16"])),
            "specials": draw(st.lists(st.sampled_from(SPECIAL), max_size=2)),
            "special_in": draw(st.sampled_from(["q", "k", "v"])),
            "sm_scale": draw(st.sampled_from([None, 0.125, 1.0, 1e6])), "levels": levels}


def _mask_entries(level: dict, page_size: int) -> int:
    qo, kv, last = level["qo_indptr"], level["kv_indptr"], level["kv_last_page_len"]
    total = 0
    for b in range(min(len(qo), len(kv)) - 1):
        n = max(kv[b + 1] - kv[b], 0)
        lp = last[b] if b < len(last) else 1
        kv_len = 0 if n == 0 else (n - 1) * page_size + max(min(lp, page_size), 0)
        total += max(qo[b + 1] - qo[b], 0) * kv_len
    return total


def _level_tensors(level: dict, page_size: int, g: torch.Generator) -> CascadeLevel:
    mask = None
    if level["mask"] is not None:
        n = max(_mask_entries(level, page_size) + level["mask_delta"], 0)
        if level["mask"] == "bool":
            mask = torch.rand(n, generator=g) < 0.7
        else:
            mask = torch.randint(0, 256, ((n + 7) // 8,), generator=g, dtype=torch.uint8)
    return CascadeLevel(_i32(level["qo_indptr"]), _i32(level["kv_indptr"]),
                                      _i32(level["kv_indices"]), _i32(level["kv_last_page_len"]),
                                      level["causal"], mask)


def _attention_inputs(case: dict):
    g = _gen(case)
    dtype = getattr(torch, case["dtype"])
    q = _rand((case["total_q"], case["hq"], case["d"]), g, dtype)
    shape = (case["num_pages"], case["page_size"], case["hkv"], case["d"])
    _, k = _guarded(shape, g, dtype)
    _, v = _guarded(shape, g, dtype)
    _poke({"q": q, "k": k, "v": v}[case["special_in"]], case["specials"], g)
    levels = [_level_tensors(lv, case["page_size"], g) for lv in case["levels"]]
    return q, k, v, levels


def _check_attention_result(case, q, v, out, lse):
    if tuple(out.shape) != tuple(q.shape) or out.dtype != q.dtype or tuple(lse.shape) != tuple(q.shape[:2]):
        raise Finding(f"shapes: out {tuple(out.shape)} {out.dtype}, lse {tuple(lse.shape)} for q {tuple(q.shape)}")
    finite_v = v[torch.isfinite(v)].float()
    bound = (float(finite_v.abs().max()) if finite_v.numel() else 0.0) * 1.02 + 1e-2
    if case["special_in"] != "v" or not case["specials"]:
        _bounded(out, bound, "attention out")


def run_attention(case: dict) -> None:
    q, k, v, levels = _attention_inputs(case)
    lv = levels[0]
    with forkdec.validation(False):
        out, lse = ops.attention(q, lv.qo_indptr, k, v, lv.kv_indptr, lv.kv_indices, lv.kv_last_page_len,
                                 causal=lv.causal, custom_mask=lv.custom_mask, sm_scale=case["sm_scale"],
                                 return_lse=True, backend="cpu")
    _check_attention_result(case, q, v, out, lse)


def run_cascade(case: dict) -> None:
    q, k, v, levels = _attention_inputs(case)
    with forkdec.validation(False):
        out, lse = ops.cascade_attention(q, k, v, levels, sm_scale=case["sm_scale"], return_lse=True,
                                         backend="cpu")
    _check_attention_result(case, q, v, out, lse)


@st.composite
def merge_case(draw, many: bool):
    t, h, d = draw(small), draw(st.integers(0, 3)), draw(st.sampled_from([0, 1, 8, 33]))
    n = draw(st.integers(0, 4)) if many else 2
    def maybe(x):
        return draw(st.one_of(st.just(x), st.integers(0, 5)))
    o_shape = [t, n, h, d] if many else [t, h, d]
    if draw(st.integers(0, 4)) == 0:
        o_shape = [maybe(x) for x in o_shape]
    lse_shape = [t, n, h] if many else [t, h]
    if draw(st.integers(0, 4)) == 0:
        lse_shape = [maybe(x) for x in lse_shape] + draw(st.lists(st.integers(0, 2), max_size=1))
    b_shape = o_shape if many or draw(st.integers(0, 4)) else [maybe(x) for x in o_shape]
    lse_values = st.one_of(st.floats(-50, 50), st.sampled_from(SPECIAL + [-1e38, 88.0, 1e30]))
    return {"seed": draw(seeds), "o_shape": o_shape, "o_b_shape": b_shape, "lse_shape": lse_shape,
            "lse_values": draw(st.lists(lse_values, min_size=1, max_size=6)),
            "dtype": draw(st.sampled_from(["float32", "bfloat16", "float16"])),
            "lse_dtype": draw(st.sampled_from(["float32", "float32", "float64", "bfloat16"])),
            "non_contiguous": draw(st.booleans())}


def _state(shape, g, dtype, non_contiguous):
    if non_contiguous and len(shape) >= 2:
        return _rand(list(reversed(shape)), g).to(dtype).permute(*reversed(range(len(shape))))
    return _rand(shape, g).to(dtype)


def _lse(shape, values, g, dtype):
    idx = torch.randint(len(values), shape, generator=g)
    return torch.tensor(values, dtype=torch.float64)[idx].to(dtype)


def run_merge_states(case: dict) -> None:
    g = _gen(case)
    o = _state(case["o_shape"], g, getattr(torch, case["dtype"]), case["non_contiguous"])
    lse = _lse(case["lse_shape"], case["lse_values"], g, getattr(torch, case["lse_dtype"]))
    with forkdec.validation(False):
        out, lse_out = ops.merge_states(o, lse, backend="cpu")
    want = (o.shape[0], *o.shape[2:])
    if tuple(out.shape) != want or tuple(lse_out.shape) != want[:2]:
        raise Finding(f"shapes: out {tuple(out.shape)}, lse {tuple(lse_out.shape)} for o {tuple(o.shape)}")
    _bounded(out, 1.02, "merge_states out")


def run_merge_state(case: dict) -> None:
    g = _gen(case)
    dtype = getattr(torch, case["dtype"])
    o_a = _state(case["o_shape"], g, dtype, case["non_contiguous"])
    o_b = _state(case["o_b_shape"], g, torch.float32, False)
    lse_a = _lse(case["lse_shape"], case["lse_values"], g, getattr(torch, case["lse_dtype"]))
    lse_b = _lse(case["lse_shape"], case["lse_values"], g, torch.float32)
    with forkdec.validation(False):
        out, lse_out = ops.merge_state(o_a, lse_a, o_b, lse_b, backend="cpu")
    if tuple(out.shape) != tuple(o_a.shape) or tuple(lse_out.shape) != tuple(o_a.shape[:2]):
        raise Finding(f"shapes: out {tuple(out.shape)}, lse {tuple(lse_out.shape)} for o_a {tuple(o_a.shape)}")
    _bounded(out, 1.02, "merge_state out")


@st.composite
def append_case(draw):
    pages, ps, hkv, d = draw(st.integers(0, 4)), draw(st.sampled_from([1, 3, 4])), draw(st.integers(1, 2)), \
        draw(st.sampled_from([1, 8, 32]))
    cap = pages * ps
    n = draw(st.integers(0, 5))
    slot = st.one_of(st.integers(0, max(cap - 1, 0)), st.integers(-3, cap + 3),
                     st.sampled_from([-(2**31), 2**31 - 1, 2**40]))
    return {"seed": draw(seeds), "pages": pages, "page_size": ps, "hkv": hkv, "d": d,
            "k_shape": draw(st.one_of(st.just([n, hkv, d]), st.lists(st.integers(0, 5), min_size=2, max_size=4))),
            "slots": draw(st.lists(slot, min_size=n, max_size=n + (1 if draw(st.integers(0, 5)) == 0 else 0))),
            "slot_dtype": draw(st.sampled_from(["int64", "int32"])),
            "dtype": draw(st.sampled_from(["float32", "bfloat16"])),
            "k_dtype": draw(st.sampled_from(["float32", "float16"]))}


def run_append_kv(case: dict) -> None:
    g = _gen(case)
    dtype = getattr(torch, case["dtype"])
    shape = (case["pages"], case["page_size"], case["hkv"], case["d"])
    k_buf, k_cache = _guarded(shape, g, dtype)
    v_buf, v_cache = _guarded(shape, g, dtype)
    k_before, v_before = k_buf.clone(), v_buf.clone()
    k = _rand(case["k_shape"], g, getattr(torch, case["k_dtype"]))
    v = _rand(case["k_shape"], g, getattr(torch, case["k_dtype"]))
    slots = torch.tensor(case["slots"], dtype=torch.int64)
    if case["slot_dtype"] == "int32":
        slots = slots.clamp(-(2**31), 2**31 - 1).to(torch.int32)
    try:
        with forkdec.validation(False):
            ops.append_kv(k_cache, v_cache, k, v, slots, backend="cpu")
    finally:  # a refused call must not have written anything; a guard cell never
        for buf, before in ((k_buf, k_before), (v_buf, v_before)):
            pad = 2 * case["page_size"] * case["hkv"] * case["d"]
            flat, flat0 = buf.view(-1), before.view(-1)
            if not (torch.equal(flat[:pad], flat0[:pad]) and torch.equal(flat[flat.numel() - pad:],
                                                                          flat0[flat.numel() - pad:])):
                raise Finding("append_kv wrote outside the cache (a guard page changed)")
    written = k_cache.reshape(-1, case["hkv"], case["d"])
    for i, s in enumerate(slots.tolist()):
        if not torch.equal(written[s], k[i].to(dtype)) and slots.tolist().count(s) == 1:
            raise Finding(f"append_kv: slot {s} does not hold k[{i}]")


@st.composite
def sample_case(draw):
    b, vocab = draw(st.integers(0, 4)), draw(st.integers(0, 40))
    rows = draw(st.one_of(st.none(), st.lists(st.one_of(st.integers(0, max(b - 1, 0)), st.integers(-3, b + 3),
                                                        st.just(2**40)), max_size=5)))
    r = b if rows is None else len(rows)
    def param(scalars, low, high):
        per_row = st.lists(st.one_of(st.floats(low, high), st.sampled_from(scalars)), min_size=r,
                           max_size=r + draw(st.sampled_from([0, 0, 0, 1])))
        return draw(st.one_of(st.sampled_from(scalars), per_row))
    nan, inf = float("nan"), float("inf")
    return {"seed": draw(seeds), "b": b, "vocab": vocab, "row_ids": rows,
            "dtype": draw(st.sampled_from(["float32", "bfloat16", "float16"])),
            "specials": draw(st.lists(st.sampled_from(SPECIAL), max_size=4)),
            "all_neg_inf_row": draw(st.booleans()),
            "temperature": param([1.0, 0.0, 0.5, -1.0, nan, inf, 1e-30, 1e-45], 0, 3),
            "top_k": draw(st.one_of(st.integers(-3, vocab + 3), st.sampled_from([2**31, 2**62]),
                                    st.lists(st.integers(-2, vocab + 2), min_size=r, max_size=r))),
            "top_p": param([1.0, 0.0, 0.5, 1.5, -0.1, nan, 1e-9], 0, 1),
            "min_p": param([0.0, 0.3, 1.0, 2.0, -1.0, nan], 0, 1)}


def _sample_args(case: dict) -> tuple[torch.Tensor, dict]:
    """The logits (special values poked in) and keyword arguments of a sample_case."""
    g = _gen(case)
    logits = (torch.randn(case["b"], case["vocab"], generator=g) * 4).to(getattr(torch, case["dtype"]))
    _poke(logits, case["specials"], g)
    if case["all_neg_inf_row"] and logits.shape[0]:
        logits[0] = float("-inf")
    def param(v, dtype):
        return torch.tensor(v, dtype=dtype) if isinstance(v, list) else v
    row_ids = None if case["row_ids"] is None else torch.tensor(case["row_ids"], dtype=torch.int64)
    return logits, dict(temperature=param(case["temperature"], torch.float32), top_k=param(case["top_k"], torch.int64),
                        top_p=param(case["top_p"], torch.float32), min_p=param(case["min_p"], torch.float32),
                        row_ids=row_ids, seed=case["seed"], check_nan=False, backend="cpu")


def _check_ids(case: dict, name: str, t: torch.Tensor) -> None:
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= case["vocab"]):
        raise Finding(f"{name} {t.tolist()} outside [0, {case['vocab']})")


def run_sample(case: dict) -> None:
    logits, kw = _sample_args(case)
    with forkdec.validation(False):
        tokens = ops.sample(logits, **kw)
    r = case["b"] if kw["row_ids"] is None else kw["row_ids"].numel()
    if tuple(tokens.shape) != (r,) or tokens.dtype != torch.int64:
        raise Finding(f"sample: tokens {tuple(tokens.shape)} {tokens.dtype}, expected ({r},) int64")
    _check_ids(case, "sample: token", tokens)


@st.composite
def signals_case(draw):
    case = draw(sample_case())
    case["num_top"] = draw(st.one_of(st.integers(-2, case["vocab"] + 3), st.just(2**31)))
    return case


def run_sample_with_logprobs(case: dict) -> None:
    logits, kw = _sample_args(case)
    with forkdec.validation(False):
        out = ops.sample_with_logprobs(logits, top_logprobs=case["num_top"] if case["num_top"] > 0 else None, **kw)
    r = case["b"] if kw["row_ids"] is None else kw["row_ids"].numel()
    if tuple(out.tokens.shape) != (r,) or tuple(out.logprobs.shape) != (r,):
        raise Finding(f"sample_with_logprobs: tokens {tuple(out.tokens.shape)}, logprobs {tuple(out.logprobs.shape)}")
    _check_ids(case, "sample_with_logprobs: tokens", out.tokens)
    _check_ids(case, "sample_with_logprobs: top_ids", out.top_ids)


@st.composite
def qlinear_case(draw):
    # m up to 20: rows 8 at a time with avx512 (4 elsewhere) and every remainder; n past a tile of 16
    n, blocks, m = draw(st.integers(0, 20)), draw(st.integers(0, 4)), draw(st.integers(0, 20))
    def rarely(strategy):  # one corruption in five: most inputs are well formed and compute
        return st.one_of(st.none(), st.none(), st.none(), st.none(), strategy)
    return {"seed": draw(seeds), "n": n, "k": 32 * blocks, "m": m,
            "bits": draw(st.sampled_from([4, 8, 4, 8, 4, 8, 4, 8, 3, 0, -1, 16])),
            "k_arg": draw(rarely(st.integers(-40, 200))),
            "n_arg": draw(rarely(st.integers(-3, 40))),
            "tiles": draw(rarely(st.integers(0, 3))),
            "codes_cols": draw(rarely(st.integers(0, 2100))),
            "scale_cols": draw(rarely(st.integers(0, 70))),
            "scale_dtype": draw(st.sampled_from(["float16"] * 7 + ["float32"])),
            "x_cols": draw(rarely(st.integers(0, 200))),
            "bias_len": draw(st.one_of(st.none(), st.just(-1), st.just(-1), rarely(st.integers(0, 8)))),
            "dtype": draw(st.sampled_from(["float32", "bfloat16", "float16"])),
            "specials": draw(st.lists(st.sampled_from(SPECIAL), max_size=3))}


def run_qlinear(case: dict) -> None:
    g = _gen(case)
    bits, k, n = case["bits"], case["k"], case["n"]
    tiles = case["tiles"] if case["tiles"] is not None else -(-n // TILE)  # packed in tiles of 16 (forkdec.qweight)
    cols = case["codes_cols"] if case["codes_cols"] is not None else \
        k // BLOCK * TILE * BLOCK * (bits if bits in (4, 8) else 4) // 8
    blocks = case["scale_cols"] if case["scale_cols"] is not None else k // BLOCK * TILE
    codes = torch.randint(0, 256, (tiles, cols), generator=g, dtype=torch.uint8)
    scale = torch.rand(tiles, blocks, generator=g).to(getattr(torch, case["scale_dtype"]))
    offset = torch.randn(tiles, blocks, generator=g).to(getattr(torch, case["scale_dtype"]))
    x = torch.randn(case["m"], case["x_cols"] if case["x_cols"] is not None else k, generator=g)
    x = x.to(getattr(torch, case["dtype"]))
    _poke(x, case["specials"], g)
    bias = None if case["bias_len"] is None else torch.randn(max(n if case["bias_len"] < 0 else
                                                                 case["bias_len"], 0), generator=g)
    k_arg = k if case["k_arg"] is None else case["k_arg"]
    n_arg = n if case["n_arg"] is None else case["n_arg"]
    with forkdec.validation(False):
        y = torch.ops.forkdec.qlinear(x, codes, scale, offset, bits, k_arg, n_arg, bias, None)
    if tuple(y.shape) != (case["m"], n_arg):
        raise Finding(f"qlinear: output {tuple(y.shape)}, expected ({case['m']}, {n_arg})")


@st.composite
def llama_layers_case(draw):
    # a valid 0-2 layer stack (hidden 32/64, 1-2 kv heads of 32, T 0-3 new tokens), then at most a
    # few corruptions of its lists, shapes and slots
    def rarely(strategy):
        return st.one_of(st.none(), st.none(), st.none(), strategy)
    return {"seed": draw(seeds), "layers": draw(st.integers(0, 2)), "hidden": draw(st.sampled_from([32, 64])),
            "hkv": draw(st.integers(1, 2)), "group": draw(st.integers(1, 2)), "t": draw(st.integers(0, 3)),
            "dense": draw(st.lists(st.booleans(), min_size=4, max_size=4)),
            "bits": draw(rarely(st.lists(st.sampled_from([0, 4, 8, 3, -1]), min_size=0, max_size=9))),
            "drop_weight": draw(rarely(st.integers(0, 30))),
            "qkv_rows": draw(rarely(st.integers(0, 300))),
            "x_cols": draw(rarely(st.integers(0, 80))),
            "caches": draw(rarely(st.integers(0, 3))),
            "cache_d": draw(rarely(st.sampled_from([16, 32, 64]))),
            "slots": draw(rarely(st.lists(st.integers(-3, 20), min_size=0, max_size=4))),
            "dtype": draw(st.sampled_from(["float32", "bfloat16"]))}


def run_llama_layers(case: dict) -> None:
    g = _gen(case)
    dtype = getattr(torch, case["dtype"])
    layers, hidden, hkv, d, t = case["layers"], case["hidden"], case["hkv"], 32, case["t"]
    hq, inter, pages, page_size = hkv * case["group"], 32, 3, 4

    def matrix(n, k, dense):
        if dense:
            return [_rand((n, k), g, dtype), torch.empty(0, dtype=dtype), torch.empty(0, dtype=dtype)], 0
        tiles = -(-n // TILE)
        return [torch.randint(0, 256, (tiles, k // BLOCK * TILE * 16), generator=g, dtype=torch.uint8),
                (torch.rand(tiles, k // BLOCK * TILE, generator=g) * 0.05).half(),
                (torch.rand(tiles, k // BLOCK * TILE, generator=g) * 0.05).half()], 4

    weights, bits = [], []
    qkv_rows = (hq + 2 * hkv) * d if case["qkv_rows"] is None else case["qkv_rows"]
    for _ in range(layers):
        weights += [torch.ones(hidden, dtype=dtype), torch.ones(hidden, dtype=dtype), torch.empty(0, dtype=dtype)]
        for (n, k), dense in zip(((qkv_rows, hidden), (hidden, hq * d), (2 * inter, hidden), (hidden, inter)),
                                 case["dense"]):
            w, b = matrix(n, k, dense)
            weights += w
            bits.append(b)
    if case["drop_weight"] is not None and weights:
        del weights[case["drop_weight"] % len(weights)]
    if case["bits"] is not None:
        bits = case["bits"]
    cd = d if case["cache_d"] is None else case["cache_d"]
    caches = [_rand((pages, page_size, hkv, cd), g, dtype) for _ in range(2 * layers)]
    k_caches, v_caches = caches[:layers], caches[layers:]
    if case["caches"] is not None:
        v_caches = (v_caches + [_rand((pages, page_size, hkv, cd), g, dtype)] * 3)[:case["caches"]]
    x = _rand((t, hidden if case["x_cols"] is None else case["x_cols"]), g, dtype)
    angles = torch.rand(t, d // 2, generator=g)
    slots = torch.tensor(case["slots"] if case["slots"] is not None else [1 + 4 * (i % 2) + i // 2 for i in range(t)],
                         dtype=torch.int64)
    ones = list(range(t + 1))
    level = (_i32(ones), _i32([0] + [min(i + 1, 2) for i in range(t)]), _i32([0, 1]), _i32([4] * t))
    with forkdec.validation(False):
        out, residual = torch.ops.forkdec.llama_layers(x, angles.cos(), angles.sin(), weights, bits, hq, hkv, 1e-5,
                                                       k_caches, v_caches, slots, [level[0]], [level[1]],
                                                       [level[2]], [level[3]], [False], [None], 0.2)
    if tuple(out.shape) != tuple(x.shape) or tuple(residual.shape) != tuple(x.shape):
        raise Finding(f"llama_layers: outputs {tuple(out.shape)}, {tuple(residual.shape)}, x {tuple(x.shape)}")


@st.composite
def tree_case(draw, sampling: bool):
    b = draw(st.integers(0, 3))
    sizes = draw(st.lists(st.integers(0, 4), min_size=b, max_size=b))
    ip = draw(st.one_of(st.just([0] + [sum(sizes[: i + 1]) for i in range(b)]), indptr(b + 1, 10)))
    n = draw(st.one_of(st.just(max(ip[-1], 0) if ip else 0), st.integers(0, 8)))
    vocab = draw(st.integers(0, 12))
    parents = draw(st.one_of(  # a chain per tree (0 ... n_b - 1 in order); children of the root or node 0
        st.just([-1 if i == 0 or i in ip else i - 1 - 0 * (i in ip) for i in range(n)]).map(
            lambda ps: [p if p < 0 else p - max([x for x in ip if x <= i] or [0]) for i, p in enumerate(ps)]),
        st.lists(st.integers(-1, 0), min_size=n, max_size=n),
        st.lists(st.integers(-3, n + 1), min_size=n, max_size=n)))  # cycles, forward and far pointers
    rows_delta = draw(st.sampled_from([0, 0, 0, -1, 1, -n - b]))
    return {"seed": draw(seeds), "indptr": ip, "n": n, "vocab": vocab,
            "tokens": draw(st.lists(st.one_of(st.integers(0, max(vocab - 1, 0)), st.integers(-3, vocab + 3),
                                              st.just(2**31 - 1)), min_size=n, max_size=n)),
            "parents": parents, "rows_delta": rows_delta,
            "max_depth": draw(st.one_of(st.none(), st.integers(-2, 6))),
            "specials": draw(st.lists(st.sampled_from(SPECIAL), max_size=3)),
            "dtype": draw(st.sampled_from(["float32", "bfloat16"])),
            "draft_layout_rows": draw(st.sampled_from([0, 0, -1, 1])) if sampling else 0,
            "uniforms_delta": draw(st.sampled_from([0, 0, 0, -1, 2])) if sampling else 0,
            "negative_probs": draw(st.booleans()) if sampling else False}


def _check_verdicts(case: dict, res, batch: int) -> None:
    tokens, num, bonus, nodes = res.accepted_tokens, res.num_accepted, res.bonus_token, res.accepted_nodes
    vocab, n = case["vocab"], case["n"]
    if num.numel() != batch or bonus.numel() != batch:
        raise Finding(f"verify: {num.numel()} / {bonus.numel()} verdicts for {batch} trees")
    if batch == 0:
        return
    depth = tokens.shape[1] - 1
    if num.min() < 0 or num.max() > depth or nodes.shape[1] != depth:
        raise Finding(f"verify: num_accepted {num.tolist()} outside [0, {depth}]")
    if bonus.min() < 0 or bonus.max() >= vocab:
        raise Finding(f"verify: bonus token {bonus.tolist()} outside [0, {vocab})")
    nodes = nodes if nodes.numel() else torch.full((1,), -1)
    if tokens.min() < -1 or tokens.max() >= vocab or nodes.min() < -1 or nodes.max() >= max(n, 1):
        raise Finding(f"verify: accepted tokens {tokens.tolist()} / nodes {nodes.tolist()} out of range")


def run_verify_greedy(case: dict) -> None:
    g = _gen(case)
    b = max(len(case["indptr"]) - 1, 0)
    rows = max(case["n"] + b + case["rows_delta"], 0)
    _, logits = _guarded((rows, case["vocab"]), g, getattr(torch, case["dtype"]))
    _poke(logits, case["specials"], g)
    with forkdec.validation(False):
        res = ops.verify_tree_greedy(_i32(case["tokens"]), _i32(case["parents"]), _i32(case["indptr"]), logits,
                                     max_depth=case["max_depth"], backend="cpu")
    _check_verdicts(case, res, b)


def run_verify_sampling(case: dict) -> None:
    g = _gen(case)
    b = max(len(case["indptr"]) - 1, 0)
    rows = max(case["n"] + b + case["rows_delta"], 0)
    dtype = getattr(torch, case["dtype"])
    def probs(r):
        buf = torch.full((r + 4, case["vocab"]), GUARD, dtype=dtype)
        p = buf[2:2 + r]
        p.copy_(torch.softmax(torch.randn(r, case["vocab"], generator=g), -1) if case["vocab"] else p)
        if case["negative_probs"]:
            p.neg_()
        return p
    target = probs(rows)
    draft = probs(max(rows + case["draft_layout_rows"], 0))
    _poke(target, case["specials"], g)
    uniforms = torch.rand(max(case["n"] + b + case["uniforms_delta"], 0), generator=g, dtype=torch.float64)
    with forkdec.validation(False):
        res = ops.verify_tree_sampling(_i32(case["tokens"]), _i32(case["parents"]), _i32(case["indptr"]), draft,
                                       target, uniforms=uniforms, max_depth=case["max_depth"], backend="cpu")
    _check_verdicts(case, res, b)


@st.composite
def softmax_case(draw):
    shape = draw(st.lists(st.integers(0, 5), min_size=0, max_size=3))
    return {"seed": draw(seeds), "shape": shape, "dim": draw(st.integers(-4, 3)),
            "dtype": draw(st.sampled_from(["float32", "bfloat16", "float16"])),
            "specials": draw(st.lists(st.sampled_from(SPECIAL), max_size=3)),
            "temperature": draw(st.one_of(st.none(), st.sampled_from([1.0, 0.0, -1.0, float("nan"), float("inf"),
                                                                        1e-30, 1e-45]),
                                          st.lists(st.sampled_from([1.0, 0.0, 0.5, float("nan"), -2.0]),
                                                   max_size=8))),
            "transpose": draw(st.booleans())}


def _run_softmax(case: dict, fn: Callable) -> None:
    g = _gen(case)
    x = (torch.randn(case["shape"], generator=g) * 10).to(getattr(torch, case["dtype"]))
    if case["transpose"] and x.dim() >= 2:
        x = x.transpose(0, -1)
    _poke(x, case["specials"], g)
    t = case["temperature"]
    t = torch.tensor(t, dtype=torch.float32) if isinstance(t, list) else t
    with forkdec.validation(False):
        y = fn(x, case["dim"], temperature=t, backend="cpu") if fn is ops.softmax else fn(x, case["dim"],
                                                                                          temperature=t)
    if tuple(y.shape) != tuple(x.shape):
        raise Finding(f"softmax: shape {tuple(y.shape)} for x {tuple(x.shape)}")
    finite = y[torch.isfinite(y)]
    if finite.numel() and (float(finite.min()) < 0 or float(finite.max()) > 1 + 1e-6):
        raise Finding("softmax: a probability outside [0, 1]")


def run_softmax(case: dict) -> None:
    _run_softmax(case, ops.softmax)


def run_softmax_three_pass(case: dict) -> None:
    _run_softmax(case, importlib.import_module("forkdec.ops.softmax").softmax_three_pass)


@st.composite
def layer_case(draw):
    t, h = draw(st.integers(0, 4)), draw(st.sampled_from([1, 4, 16, 17]))
    hq, hkv, d = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.sampled_from([2, 4, 8, 64]))
    if draw(st.integers(0, 4)) == 0:  # degenerate head counts and odd head dims, now and then
        hq, hkv, d = draw(st.integers(0, 3)), draw(st.integers(0, 2)), draw(st.sampled_from([1, 3, 0]))
    return {"seed": draw(seeds), "x_shape": draw(st.one_of(st.just([t, h]), st.just([t, h]), st.lists(st.integers(0, 6), max_size=3))),
            "w_len": draw(st.one_of(st.just(h), st.integers(0, 18))),
            "res_shape": draw(st.one_of(st.just([t, h]), st.lists(st.integers(0, 6), max_size=3))),
            "eps": draw(st.sampled_from([1e-5, 0.0, -1.0, float("nan"), float("inf")])),
            "dtype": draw(st.sampled_from(["float32", "bfloat16", "float16"])),
            "specials": draw(st.lists(st.sampled_from(SPECIAL), max_size=2)),
            "hq": hq, "hkv": hkv, "d": d,
            "qkv_width": draw(st.one_of(st.just((hq + 2 * hkv) * d), st.just((hq + 2 * hkv) * d), st.integers(0, 40))),
            "cos_shape": draw(st.one_of(st.just([t, d // 2]), st.just([t, d // 2]), st.lists(st.integers(0, 5), min_size=1, max_size=3))),
            "heads_override": draw(st.one_of(st.none(), st.none(), st.none(), st.tuples(st.integers(-2, 5), st.integers(-2, 5))))}


def _layer_inputs(case):
    g = _gen(case)
    dtype = getattr(torch, case["dtype"])
    x = _rand(case["x_shape"], g, dtype)
    _poke(x, case["specials"], g)
    return g, dtype, x


def run_rms_norm(case: dict) -> None:
    g, dtype, x = _layer_inputs(case)
    w = _rand([case["w_len"]], g, dtype)
    with forkdec.validation(False):
        y = ops.layer_ops.rms_norm(x, w, case["eps"], backend="cpu")
    if tuple(y.shape) != tuple(x.shape):
        raise Finding(f"rms_norm: shape {tuple(y.shape)} for x {tuple(x.shape)}")


def run_add_rms_norm(case: dict) -> None:
    g, dtype, x = _layer_inputs(case)
    w = _rand([case["w_len"]], g, dtype)
    r = _rand(case["res_shape"], g, dtype)
    with forkdec.validation(False):
        y, s = ops.layer_ops.add_rms_norm(x, r, w, case["eps"], backend="cpu")
    if tuple(y.shape) != tuple(x.shape) or tuple(s.shape) != tuple(x.shape):
        raise Finding(f"add_rms_norm: shapes {tuple(y.shape)}, {tuple(s.shape)} for x {tuple(x.shape)}")
    if not case["specials"]:
        _bounded(s, 2.02, "add_rms_norm sum")


def run_rope_qkv(case: dict) -> None:
    g = _gen(case)
    dtype = getattr(torch, case["dtype"])
    t = case["x_shape"][0] if case["x_shape"] else 0
    qkv = _rand([t, case["qkv_width"]], g, dtype)
    _poke(qkv, case["specials"], g)
    angles = _rand(case["cos_shape"], g)  # cos and sin of the same angles: a rotation keeps |x| <= sqrt(2)
    cos, sin = angles.cos(), angles.sin()
    hq, hkv = case["heads_override"] or (case["hq"], case["hkv"])
    with forkdec.validation(False):
        q, k, v = ops.layer_ops.rope_qkv(qkv, cos, sin, hq, hkv, backend="cpu")
    for out in (q, k, v) if not case["specials"] else ():
        _bounded(out, 1.5, "rope_qkv out")  # |x cos - y sin| <= sqrt(2) for |x|, |y| <= 1


def run_silu_and_mul(case: dict) -> None:
    _, _, x = _layer_inputs(case)
    with forkdec.validation(False):
        y = ops.layer_ops.silu_and_mul(x, backend="cpu")
    if x.dim() and tuple(y.shape) != (*x.shape[:-1], x.shape[-1] // 2):
        raise Finding(f"silu_and_mul: shape {tuple(y.shape)} for x {tuple(x.shape)}")
    if not case["specials"]:
        _bounded(y, 1.0, "silu_and_mul out")


@st.composite
def xquant_case(draw):
    base = draw(attention_case())
    base["dtype"] = "float32"
    base["d"] = draw(st.sampled_from([32, 64]))
    return {**base, "wk": draw(st.sampled_from([8, 16])), "wv": draw(st.sampled_from([8, 16])),
            "max_pos": draw(st.one_of(st.just(16), st.integers(0, 24))),
            "kv_start_pos": draw(st.one_of(st.just("zeros"), st.lists(
                st.one_of(st.integers(0, 8), st.integers(-3, 30), st.just(2**31 - 1)), max_size=5))),
            "width_delta": draw(st.sampled_from([0, 0, 0, 1, -1])),
            "rope_rows_delta": draw(st.sampled_from([0, 0, -1]))}


def run_xquant(case: dict) -> None:
    g = _gen(case)
    hq, hkv, d, ps, pages = case["hq"], case["hkv"], case["d"], case["page_size"], case["num_pages"]
    q = _rand((case["total_q"], hq, d), g)
    _, xk = _guarded((pages, ps, case["wk"]), g)
    _, xv = _guarded((pages, ps, case["wv"]), g)
    _poke({"q": q, "k": xk, "v": xv}[case["special_in"]], case["specials"], g)
    wk = _rand((case["wk"], hkv * d), g) / case["wk"]
    wv = _rand((case["wv"], hkv * d), g) / case["wv"]
    rows = max(case["max_pos"], 0)
    _, cos = _guarded((rows, d), g)
    _, sin = _guarded((max(rows + case["rope_rows_delta"], 0), d), g)
    lv = _level_tensors(case["levels"][0], ps, g)
    start_pos = case["kv_start_pos"]
    start_pos = _i32([0] * max(lv.qo_indptr.numel() - 1, 0) if start_pos == "zeros" else start_pos)
    with forkdec.validation(False):
        out, lse = torch.ops.forkdec.xquant_attention(
            q, lv.qo_indptr, xk, None, None, 0, 0, 0, case["wk"] + case["width_delta"], xv, None, None, 0, 0, 0,
            case["wv"], ps, lv.kv_indptr, lv.kv_indices, lv.kv_last_page_len, start_pos, wk, wv,
            None, None, cos, sin, lv.causal, lv.custom_mask, 0.125 if case["sm_scale"] is None else case["sm_scale"])
    if tuple(out.shape) != tuple(q.shape) or tuple(lse.shape) != tuple(q.shape[:2]):
        raise Finding(f"xquant: shapes out {tuple(out.shape)}, lse {tuple(lse.shape)} for q {tuple(q.shape)}")
    if case["special_in"] != "v" or not case["specials"]:
        _bounded(out, 1.05, "xquant out")  # |V| <= sum |xv| |wv| <= 1 (wv scaled by 1 / Wv)


# ---- the registry --------------------------------------------------------------------------------

ATTN_ARGS = ("q", "qo_indptr", "k_cache", "v_cache", "kv_indptr", "kv_indices", "kv_last_page_len",
             "custom_mask", "sm_scale", "levels", "head dim", "Hq")
TREE_ARGS = ("draft_tokens", "parents", "tree_indptr", "target_logits", "target_probs", "draft_probs", "uniforms",
             "max_depth", "V must be positive")
# op -> (strategy, runner, names a clear error may cite)
OPS: dict[str, tuple[Any, Callable[[dict], None], tuple[str, ...]]] = {
    "attention": (attention_case(), run_attention, ATTN_ARGS),
    "cascade_attention": (attention_case(levels_max=3), run_cascade, ATTN_ARGS),
    "merge_states": (merge_case(True), run_merge_states, ("o", "lse")),
    "merge_state": (merge_case(False), run_merge_state, ("o_a", "o_b", "lse_a", "lse_b")),
    "append_kv": (append_case(), run_append_kv, ("k_cache", "v_cache", "k", "v", "slots")),
    "sample": (sample_case(), run_sample, ("logits", "uniforms", "row_ids", "temperature", "top_k", "top_p",
                                           "min_p")),
    "sample_with_logprobs": (signals_case(), run_sample_with_logprobs,
                             ("logits", "uniforms", "row_ids", "temperature", "top_k", "top_p", "min_p", "num_top",
                              "top_logprobs")),
    "qlinear": (qlinear_case(), run_qlinear, ("x", "codes", "scale", "offset", "bits", "k", "n", "bias")),
    "llama_layers": (llama_layers_case(), run_llama_layers,
                     ("x", "weights", "qbits", "k_caches", "v_caches", "slots", "codes", "scale", "offset", "bits",
                      "k", "n", "weight", "qkv", "k_cache", "v_cache", "kv_indptr", "kv_indices", "kv_last_page_len",
                      "qo_indptr", "head dim", "residual", "mat1", "mat2", "cos", "sin", "o", "gate_up", "down",
                      "attn_norm", "ffn_norm")),
    "verify_tree_greedy": (tree_case(False), run_verify_greedy, TREE_ARGS),
    "verify_tree_sampling": (tree_case(True), run_verify_sampling, TREE_ARGS),
    "softmax": (softmax_case(), run_softmax, ("x", "dim", "temperature", "row_temperature")),
    "softmax_three_pass": (softmax_case(), run_softmax_three_pass, ("x", "dim", "temperature", "row_temperature")),
    "rms_norm": (layer_case(), run_rms_norm, ("x", "weight", "eps")),
    "add_rms_norm": (layer_case(), run_add_rms_norm, ("x", "residual", "weight", "eps")),
    "rope_qkv": (layer_case(), run_rope_qkv, ("qkv", "cos", "sin", "num_q_heads", "num_kv_heads")),
    "silu_and_mul": (layer_case(), run_silu_and_mul, ("x",)),
    "xquant_attention": (xquant_case(), run_xquant, ATTN_ARGS + ("xk", "xv", "wk", "wv", "rope_cos", "rope_sin",
                                                                 "kv_start_pos", "_width", "page_size")),
}


class _Hang(BaseException):
    pass


def _alarm(signum, frame):
    raise _Hang()


def run_case(op: str, case: dict) -> str:
    """Runs one case: 'ok' (in bounds) or 'error' (a clear error); raises Finding otherwise
    (a hang in Python code too; one in C++ is left to the caller's subprocess timeout)."""
    _, runner, names = OPS[op]
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(CASE_TIMEOUT_S)
    try:
        runner(case)
        return "ok"
    except _Hang:
        raise Finding(f"{op}: no result after {CASE_TIMEOUT_S} s (a hang)") from None
    except Finding:
        raise
    except Exception as e:  # noqa: BLE001 - classifying every outcome is the point
        if _clear_error(e, names):
            return "error"
        raise Finding(f"{op}: unclear {type(e).__name__}: {str(e)[:300]}") from e
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def save_regression(op: str, case: dict, reason: str) -> Path:
    CORPUS.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"op": op, "case": case, "found": reason}, sort_keys=True, default=str)
    path = CORPUS / f"{op}-{hashlib.sha1(text.encode()).hexdigest()[:10]}.json"
    path.write_text(json.dumps({"op": op, "case": case, "found": reason}, indent=1, sort_keys=True,
                               default=str) + "\n")
    return path


def fuzz(op: str, examples: int, derandomize: bool, current: Path | None) -> dict[str, int]:
    counts = {"ok": 0, "error": 0}
    strategy = OPS[op][0]

    @settings(max_examples=examples, deadline=None, derandomize=derandomize, database=None,
              suppress_health_check=list(HealthCheck), print_blob=False, report_multiple_bugs=False)
    @given(strategy)
    def one(case):
        if current is not None:
            current.write_text(json.dumps({"op": op, "case": case}, default=str))
        counts[run_case(op, case)] += 1

    one()  # a Finding propagates with Hypothesis' shrunk case
    return counts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=200, help="inputs per op")
    parser.add_argument("--random", action="store_true", help="a fresh random run (default: derandomized)")
    parser.add_argument("--ops", nargs="*", default=list(OPS), help="ops to fuzz (default: all)")
    parser.add_argument("--current", type=Path, help="file that holds the case being run (crash forensics)")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    failed = False
    for op in args.ops:
        start = time.perf_counter()
        try:
            counts = fuzz(op, args.examples, not args.random, args.current)
        except Finding as e:
            case = json.loads(args.current.read_text())["case"] if args.current else {}
            path = save_regression(op, case, str(e)) if case else None
            print(f"FINDING {op}: {e} (kept as {path})", flush=True)
            failed = True
            continue
        total = counts["ok"] + counts["error"]
        print(f"fuzz {op}: {total} inputs ({counts['ok']} computed in bounds, {counts['error']} clear errors) "
              f"in {time.perf_counter() - start:.1f} s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
