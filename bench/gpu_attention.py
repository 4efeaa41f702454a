"""GPU microbenchmark of forkdec's Triton attention: shared-prompt decode and
tree verification, against the usual way of batching n samples of one prompt.

Every case is a `forkdec.testing.random_forest` moved to the GPU. Timed with
triton.testing.do_bench (median ms):
- forkdec triton cascade: prompt level (all paths of a prompt in one group) +
  path level, merged by LSE;
- forkdec triton flat: one group per path over its own copy of the prompt;
- torch SDPA flat: the same per-path copies as dense [P, Hkv, L, D] tensors;
- flashinfer cascade: MultiLevelCascadeAttentionWrapper (no custom masks: for
  trees, one BatchPrefillWithPagedKVCacheWrapper per level + merge_state);
- flashinfer flat: BatchPrefillWithPagedKVCacheWrapper over the per-path copies;
- flash-attn flat: flash_attn_with_kvcache with a block table (its pages hold
  256 tokens; no custom masks, so not for trees).
"eff. GB/s" divides the unique KV bytes (the prompt counted once) by the time,
so a layout that reads the prompt once per path shows as slower, not busier.
TFLOP/s counts 4 * D * Hq per visible (query, key) pair. Both are compared
with the device's copy bandwidth (measured) and its nominal peaks (table).
Writes bench/results/gpu_attention.md on a GPU. `--dry-run` (no GPU needed,
TRITON_INTERPRET=1 for the Triton kernels) builds tiny cases on CPU tensors and
runs each available implementation once to check the plumbing.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import os
from typing import Callable, Optional

import torch

from forkdec.bench.gpu_common import device_bandwidth, nominal_peaks
import torch.nn.functional as F

from forkdec import reference
from forkdec.reference.attention import PageTable
from forkdec.testing import Forest, random_forest

SMOLLM2 = dict(hq=9, hkv=3, d=64)
LLAMA3_8B = dict(hq=32, hkv=8, d=128)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
FLASH_ATTN_PAGE = 256  # flash_attn_with_kvcache needs pages of a multiple of 256 tokens

Impl = Callable[[], torch.Tensor]


@dataclasses.dataclass
class Case:
    """prompts, each with its paths' own lengths and query counts (as random_forest)."""
    name: str
    shape: dict
    prompt_lens: list[int]
    own_lens: list[list[int]]
    qo_lens: list[list[int]]
    tree: bool
    page_size: int = 16


def decode_case(name: str, shape: dict, paths: int, prompt: int, own: int) -> Case:
    return Case(name, shape, [prompt], [[own] * paths], [[1] * paths], tree=False)


def tree_case(name: str, shape: dict, requests: int, nodes: int, cached: int) -> Case:
    return Case(name, shape, [cached] * requests, [[nodes]] * requests, [[nodes]] * requests, tree=True)


CASES = [
    decode_case("decode SmolLM2 64 paths, 4096 prompt + 256 own", SMOLLM2, 64, 4096, 256),
    decode_case("decode Llama-3-8B 16 paths, 2048 prompt + 128 own", LLAMA3_8B, 16, 2048, 128),
    tree_case("tree SmolLM2 8 x 64 nodes over 2048", SMOLLM2, 8, 64, 2048),
    tree_case("tree Llama-3-8B 8 x 64 nodes over 2048", LLAMA3_8B, 8, 64, 2048),
]
# The reduced set `forkdec bench gpu` runs: one decode and one tree case.
QUICK_CASES = ("decode Llama-3-8B 16 paths, 2048 prompt + 128 own", "tree SmolLM2 8 x 64 nodes over 2048")
DRY_RUN_CASES = [
    decode_case("tiny decode", dict(hq=4, hkv=2, d=32), 3, 40, 8),
    tree_case("tiny tree", dict(hq=4, hkv=2, d=32), 2, 6, 20),
]


# ---------------------------------------------------------------------------
# Inputs and what they cost
# ---------------------------------------------------------------------------

def build(case: Case, dtype: torch.dtype, device: torch.device) -> Forest:
    """The case's forest (cascade levels and the flat per-path copies) on `device`."""
    g = torch.Generator().manual_seed(0)
    f = random_forest(case.prompt_lens, case.own_lens, case.qo_lens, page_size=case.page_size, dtype=dtype,
                      tree=case.tree, generator=g, **case.shape)

    def move(x):
        return x.to(device) if isinstance(x, torch.Tensor) else x

    def move_level(lv):
        return dataclasses.replace(lv, **{fld.name: move(getattr(lv, fld.name)) for fld in dataclasses.fields(lv)})
    return dataclasses.replace(f, q=move(f.q), k_cache=move(f.k_cache), v_cache=move(f.v_cache),
                               levels=[move_level(lv) for lv in f.levels], flat=move_level(f.flat))


def _lens(level, page_size: int) -> list[tuple[int, int]]:
    """(qo_len, kv_len) per group of a level."""
    qo = level.qo_indptr.tolist()
    table = PageTable(level.kv_indptr.cpu(), level.kv_indices.cpu(), level.kv_last_page_len.cpu())
    return [(qo[b + 1] - qo[b], table.kv_len(b, page_size)) for b in range(len(qo) - 1)]


def visible_pairs(f: Forest) -> int:
    """(query, key) pairs that attend, over all levels (the cascade's union)."""
    page_size = f.k_cache.shape[1]
    total = 0
    for lv in f.levels:
        if lv.custom_mask is not None:
            total += int(lv.custom_mask.sum())
            continue
        for qo, kv in _lens(lv, page_size):
            total += sum(max(0, min(kv, kv - qo + i + 1)) for i in range(qo)) if lv.causal else qo * kv
    return total


def unique_kv_bytes(f: Forest) -> int:
    """K and V bytes of every token of the cascade, each counted once."""
    page_size = f.k_cache.shape[1]
    tokens = sum(kv for lv in f.levels for _, kv in _lens(lv, page_size))
    _, _, hkv, d = f.k_cache.shape
    return 2 * tokens * hkv * d * f.k_cache.element_size()


def dense_flat(f: Forest) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Per-path copies as dense tensors (paths of equal lengths): q [P, Hq, Q, D],
    k, v [P, Hkv, L, D], and a bool mask [P, 1, Q, L] (None for one query per path)."""
    fl = f.flat
    lens = _lens(fl, f.k_cache.shape[1])
    assert len(set(lens)) == 1, "dense baselines need paths of equal lengths"
    (qo, kv), paths = lens[0], len(lens)
    table = PageTable(fl.kv_indptr, fl.kv_indices, fl.kv_last_page_len)
    k = torch.stack([table.gather(f.k_cache, b) for b in range(paths)]).transpose(1, 2).contiguous()
    v = torch.stack([table.gather(f.v_cache, b) for b in range(paths)]).transpose(1, 2).contiguous()
    q = f.q.reshape(paths, qo, *f.q.shape[1:]).transpose(1, 2).contiguous()
    if fl.custom_mask is not None:
        mask = fl.custom_mask.reshape(paths, 1, qo, kv)
    elif fl.causal and qo > 1:  # the doc's causal rule: queries are the last qo tokens
        i = torch.arange(qo, device=q.device)[:, None]
        mask = (torch.arange(kv, device=q.device)[None, :] <= kv - qo + i).expand(paths, 1, qo, kv)
    else:
        mask = None
    return q, k, v, mask


def block_table_copy(f: Forest, page: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-path copies re-paged for flash-attn: k, v [P * n, page, Hkv, D],
    block_table [P, n] int32, cache_seqlens [P] int32."""
    _, k, v, _ = dense_flat(f)
    paths, hkv, kv, d = k.shape
    n = math.ceil(kv / page)

    def pages(x):
        padded = torch.zeros(paths, n * page, hkv, d, dtype=x.dtype, device=x.device)
        padded[:, :kv] = x.transpose(1, 2)
        return padded.reshape(paths * n, page, hkv, d)
    table = torch.arange(paths * n, dtype=torch.int32, device=k.device).reshape(paths, n)
    return pages(k), pages(v), table, torch.full((paths,), kv, dtype=torch.int32, device=k.device)


# ---------------------------------------------------------------------------
# Implementations: each a zero-argument call returning out [total_q, Hq, D]
# ---------------------------------------------------------------------------

def _triton_reason(device: torch.device) -> Optional[str]:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "CPU tensors need TRITON_INTERPRET=1"
    return None


def forkdec_impls(f: Forest, scale: float) -> dict[str, Impl | str]:
    reason = _triton_reason(f.q.device)
    if reason is not None:
        return {"forkdec triton cascade": reason, "forkdec triton flat": reason}
    from forkdec.triton_kernels import attention as kernels

    lvs, fl = f.levels, f.flat

    def cascade():
        return kernels.cascade_attention(
            f.q, f.k_cache, f.v_cache, [lv.qo_indptr for lv in lvs], [lv.kv_indptr for lv in lvs],
            [lv.kv_indices for lv in lvs], [lv.kv_last_page_len for lv in lvs], [lv.causal for lv in lvs],
            [lv.custom_mask for lv in lvs], scale)[0]

    def flat():
        return kernels.attention(f.q, fl.qo_indptr, f.k_cache, f.v_cache, fl.kv_indptr, fl.kv_indices,
                                 fl.kv_last_page_len, fl.causal, fl.custom_mask, scale)[0]
    return {"forkdec triton cascade": cascade, "forkdec triton flat": flat}


def sdpa_impl(f: Forest, scale: float) -> Impl:
    q, k, v, mask = dense_flat(f)
    paths, hq, qo, d = q.shape

    def run():
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        return out.transpose(1, 2).reshape(paths * qo, hq, d)
    return run


def flashinfer_impls(f: Forest, scale: float) -> dict[str, Impl | str]:
    names = ("flashinfer cascade", "flashinfer flat")
    if importlib.util.find_spec("flashinfer") is None:
        return dict.fromkeys(names, "flashinfer is not installed")
    if f.q.device.type != "cuda":
        return dict.fromkeys(names, "flashinfer runs on CUDA tensors only")
    import flashinfer

    _, hq, d = f.q.shape
    hkv, page_size = f.k_cache.shape[2], f.k_cache.shape[1]
    cache = (f.k_cache, f.v_cache)
    impls: dict[str, Impl | str] = {}

    def prefill(level):
        w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(
            torch.empty(128 * 2**20, dtype=torch.uint8, device=f.q.device), "NHD")
        w.plan(level.qo_indptr, level.kv_indptr, level.kv_indices, level.kv_last_page_len, hq, hkv, d, page_size,
               custom_mask=level.custom_mask, causal=level.causal, sm_scale=scale, q_data_type=f.q.dtype)
        return w

    try:
        if all(lv.custom_mask is None for lv in f.levels):
            # Its `causal` applies to the last level only: the path level, as here.
            w = flashinfer.MultiLevelCascadeAttentionWrapper(
                len(f.levels), torch.empty(128 * 2**20, dtype=torch.uint8, device=f.q.device), "NHD")
            w.plan([lv.qo_indptr for lv in f.levels], [lv.kv_indptr for lv in f.levels],
                   [lv.kv_indices for lv in f.levels], [lv.kv_last_page_len for lv in f.levels], hq, hkv, d,
                   page_size, causal=f.levels[-1].causal, sm_scale=scale, q_data_type=f.q.dtype)
            impls[names[0]] = lambda: w.run(f.q, cache)
        else:
            levels = [prefill(lv) for lv in f.levels]

            def cascade():
                out, lse = levels[0].run(f.q, cache, return_lse=True)
                for w in levels[1:]:
                    out, lse = flashinfer.merge_state(out, lse, *w.run(f.q, cache, return_lse=True))
                return out
            impls[names[0]] = cascade
    except Exception as e:  # an API change or an unsupported shape: say why
        impls[names[0]] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"
    try:
        flat = prefill(f.flat)
        impls[names[1]] = lambda: flat.run(f.q, cache)
    except Exception as e:
        impls[names[1]] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"
    return impls


def flash_attn_impl(f: Forest, scale: float) -> Impl | str:
    if importlib.util.find_spec("flash_attn") is None:
        return "flash-attn is not installed"
    if f.q.device.type != "cuda":
        return "flash-attn runs on CUDA tensors only"
    if f.flat.custom_mask is not None:
        return "flash_attn_with_kvcache takes no custom (tree) mask"
    from flash_attn import flash_attn_with_kvcache

    k, v, table, seqlens = block_table_copy(f, FLASH_ATTN_PAGE)
    paths = table.shape[0]
    q = f.q.reshape(paths, -1, *f.q.shape[1:])                   # [P, Q, Hq, D]
    return lambda: flash_attn_with_kvcache(q, k, v, cache_seqlens=seqlens, block_table=table, softmax_scale=scale,
                                           causal=f.flat.causal).reshape(f.q.shape)


def implementations(f: Forest) -> dict[str, Impl | str]:
    """Every implementation on forest f, or a string saying why it cannot run."""
    scale = 1.0 / math.sqrt(f.q.shape[-1])
    impls = forkdec_impls(f, scale)
    impls["torch SDPA flat (dense)"] = sdpa_impl(f, scale)
    impls.update(flashinfer_impls(f, scale))
    impls["flash-attn flat (block table)"] = flash_attn_impl(f, scale)
    return impls


def max_error(impl: Impl, f: Forest) -> float:
    """Max abs difference from forkdec.reference's cascade (fp32 accumulation)."""
    out = impl()
    expected = reference.cascade_attention(f.q, f.k_cache, f.v_cache, f.levels)
    assert out.shape == expected.shape, (out.shape, expected.shape)
    return (out.float() - expected.float()).abs().max().item()


# ---------------------------------------------------------------------------
# Dry run and measurement
# ---------------------------------------------------------------------------

def describe(case: Case) -> str:
    s = case.shape
    return f"{case.name} (Hq {s['hq']}, Hkv {s['hkv']}, D {s['d']}, page {case.page_size})"


def dry_run(cases: list[Case], dtype_name: str) -> int:
    print(f"dry run: on a GPU this would time ({dtype_name}, triton.testing.do_bench median ms):")
    for case in cases:
        print(f"  {describe(case)}")
    print("  for each: " + ", ".join(implementations(build(DRY_RUN_CASES[0], torch.float32, torch.device("cpu")))))
    print("  plus a device-to-device copy for the measured bandwidth; peaks from the device name table")
    print("plumbing check on tiny CPU cases:")
    for case in DRY_RUN_CASES:
        f = build(case, DTYPES[dtype_name], torch.device("cpu"))
        for name, impl in implementations(f).items():
            status = f"skipped ({impl})" if isinstance(impl, str) else f"ran, max abs error {max_error(impl, f):.1e}"
            print(f"  {case.name} {name}: {status}")
    return 0


def measure(cases: list[Case], dtype_name: str, out_dir: Optional[str]) -> int:
    from triton.testing import do_bench

    from forkdec.bench.common import machine_facts, markdown_table, results_dir, write_report

    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    copy_gbs, _ = device_bandwidth(device)
    peak_gbs, peak_tflops = nominal_peaks(props.name, props.total_memory)

    rows = []
    for case in cases:
        f = build(case, DTYPES[dtype_name], device)
        nbytes, flops = unique_kv_bytes(f), 4 * f.q.shape[1] * f.q.shape[2] * visible_pairs(f)
        for name, impl in implementations(f).items():
            label = [case.name, name]
            if isinstance(impl, str):
                rows.append(label + ["-"] * 6 + [f"n/a: {impl}"])
                continue
            try:
                err = max_error(impl, f)
                ms = do_bench(impl, return_mode="median")
            except Exception as e:  # e.g. a shape an external kernel does not take
                rows.append(label + ["-"] * 6 + [f"error: {type(e).__name__}: {str(e).splitlines()[0][:80]}"])
                continue
            gbs, tflops = nbytes / (ms * 1e-3) / 1e9, flops / (ms * 1e-3) / 1e12
            rows.append(label + [f"{ms:.3f}", f"{gbs:.0f}", f"{gbs / copy_gbs:.0%}",
                                 f"{gbs / peak_gbs:.0%}" if peak_gbs else "-", f"{tflops:.1f}",
                                 f"{tflops / peak_tflops:.1%}" if peak_tflops else "-", f"max abs err {err:.1e}"])
            print(" | ".join(rows[-1]))
        del f
        torch.cuda.empty_cache()

    header = ["case", "implementation", "ms", "eff. GB/s", "of copy", "of peak GB/s", "TFLOP/s", "of peak FLOP/s",
              "note"]
    table = markdown_table(header, rows)
    print(table)
    facts = machine_facts({
        "gpu": f"{props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs",
        "torch CUDA": str(torch.version.cuda),
        "dtype": dtype_name,
        "copy bandwidth (measured)": f"{copy_gbs:.0f} GB/s (256 MiB device-to-device copy_, 1 read + 1 write)",
        "nominal peak": f"{peak_gbs:.0f} GB/s, {peak_tflops:.0f} TFLOP/s dense" if peak_gbs
        else "device not in the table (see 'of copy')",
        "timing": "triton.testing.do_bench, median ms; forkdec plans (one device-to-host read) inside each call, "
                  "FlashInfer's plan() is outside (an engine amortizes it over layers)",
        "eff. GB/s": "unique K+V bytes (the prompt once) / time, for every implementation",
        "TFLOP/s": "4 * D * Hq per visible (query, key) pair",
    })
    write_report(results_dir(out_dir) / "gpu_attention.md", "Attention on the GPU", facts, table)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m forkdec.bench.gpu_attention", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    parser.add_argument("--out", help="results folder (default: bench/results in a checkout)")
    parser.add_argument("--dry-run", action="store_true", help="no GPU: check the plumbing on tiny CPU inputs")
    parser.add_argument("--quick", action="store_true", help="only the cases of QUICK_CASES (forkdec bench gpu)")
    args = parser.parse_args(argv)
    cases = [c for c in CASES if c.name in QUICK_CASES] if args.quick else CASES
    if args.dry_run:
        return dry_run(cases, args.dtype)
    if not torch.cuda.is_available():
        raise SystemExit("gpu_attention: no CUDA device (use --dry-run to check the plumbing)")
    return measure(cases, args.dtype, args.out)


run = main  # `forkdec bench <area>` calls run(argv)

if __name__ == "__main__":
    raise SystemExit(main())
