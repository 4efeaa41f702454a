"""XQuant attention benchmark: a shared-prompt decode step whose prompt is cached
as quantized X̂ (K and V rematerialized inside attention) against the same step
over an fp32 K/V cache (cascade_attention), SmolLM2 shapes.

The prompt level: one request holding every path's query over the prompt's X̂
pages (each page dequantized and projected once per call). Each path's own
tokens stay a plain fp32 KV level (attention), merged by LSE; the fp32 path runs
both levels in one cascade_attention. Variants: raw X (576 wide, 4-bit channel
groups of 64, K and V from the same pages) and SVD latents (192 wide each,
K-latent 4-bit channel groups, V-latent 4-bit token groups of 64).
"""
from __future__ import annotations

import argparse
import math
import os

import torch

import forkdec
from forkdec.bench.common import (keep_freed_memory, machine_facts, markdown_table, results_dir,
                                  time_interleaved, write_report)
from forkdec.testing import random_forest
from forkdec.xquant.pages import QuantizedPages

HIDDEN, HQ, HKV, D = 576, 9, 3, 64
LATENT = 192
PAGE = 64           # channel groups of 64 tokens need whole 64-token pages
ROPE_BASE = 100000.0


def rope_tables(max_pos: int, d: int = D) -> tuple[torch.Tensor, torch.Tensor]:
    ang = torch.arange(max_pos).float()[:, None] * ROPE_BASE ** (-torch.arange(0, d, 2).float() / d)
    return torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)


def quantized(x: torch.Tensor, bits: int, group: int, axis: str) -> QuantizedPages:
    pages = QuantizedPages.empty(x.shape[0], PAGE, x.shape[2], bits, group, axis)
    for p in range(x.shape[0]):
        pages.write(p, x[p])
    return pages


def deferred(rows_per_head: int, wv: int) -> bool:
    """The kernel's choice (csrc/cpu/xquant.cpp): P·X̂v with wv applied once, or V rematerialized."""
    return rows_per_head * wv <= (wv + rows_per_head) * D


def flops_added(prompt: int, paths: int, wk: int, wv: int) -> float:
    """FLOPs of rematerialization beyond attention over a ready K/V cache."""
    hd, rows = HKV * D, paths * HQ
    k = 2 * prompt * wk * hd
    if deferred(paths * HQ // HKV, wv):
        v = 2 * rows * prompt * wv + 2 * rows * wv * D - 2 * rows * prompt * D
    else:
        v = 2 * prompt * wv * hd
    return float(k + v)


def case(paths: int, prompt: int, own: int, rounds: int) -> dict:
    g = torch.Generator().manual_seed(0)
    f = random_forest([prompt], [[own] * paths], [[1] * paths], page_size=16, generator=g, with_flat=False,
                      hq=HQ, hkv=HKV, d=D)
    prompt_level, own_level = f.levels
    x = torch.randn(math.ceil(prompt / PAGE), PAGE, HIDDEN, generator=g)
    x[..., :8] *= 8  # a few outlier channels, as real layer inputs have
    raw = quantized(x, 4, 64, "channel")
    lat_k = quantized(x[..., :LATENT].contiguous(), 4, 64, "channel")
    lat_v = quantized(x[..., LATENT:2 * LATENT].contiguous(), 4, 64, "token")
    wk, wv = torch.randn(HIDDEN, HKV * D, generator=g) / 24, torch.randn(HIDDEN, HKV * D, generator=g) / 24
    uk, uv = torch.randn(LATENT, HKV * D, generator=g) / 14, torch.randn(LATENT, HKV * D, generator=g) / 14
    cos, sin = rope_tables(prompt + own + 1)
    npages = raw.num_pages
    qo = torch.tensor([0, paths], dtype=torch.int32)
    table = (torch.tensor([0, npages], dtype=torch.int32), torch.randperm(npages, generator=g).to(torch.int32),
             torch.tensor([PAGE], dtype=torch.int32), torch.zeros(1, dtype=torch.int32))
    q = f.q

    def xquant(xk, xv, w_k, w_v):
        def step():
            o1, l1 = forkdec.ops.xquant_attention(q, qo, xk, xv, *table, w_k, w_v, cos, sin, return_lse=True,
                                                  backend="cpu")
            o2, l2 = forkdec.ops.attention(q, own_level.qo_indptr, f.k_cache, f.v_cache, own_level.kv_indptr,
                                           own_level.kv_indices, own_level.kv_last_page_len, return_lse=True,
                                           backend="cpu")
            return forkdec.ops.merge_state(o1, l1, o2, l2, backend="cpu")
        return step

    def prompt_only(xk, xv, w_k, w_v):
        return lambda: forkdec.ops.xquant_attention(q, qo, xk, xv, *table, w_k, w_v, cos, sin, backend="cpu")

    cands = {
        "fp32 KV: cascade_attention": lambda: forkdec.ops.cascade_attention(q, f.k_cache, f.v_cache, f.levels,
                                                                            backend="cpu"),
        "xquant raw X 4-bit + own fp32": xquant(raw, raw, wk, wv),
        "xquant latent 4-bit + own fp32": xquant(lat_k, lat_v, uk, uv),
        "fp32 KV: prompt level only": lambda: forkdec.ops.attention(
            q, prompt_level.qo_indptr, f.k_cache, f.v_cache, prompt_level.kv_indptr, prompt_level.kv_indices,
            prompt_level.kv_last_page_len, backend="cpu"),
        "xquant raw X: prompt only": prompt_only(raw, raw, wk, wv),
        "xquant latent: prompt only": prompt_only(lat_k, lat_v, uk, uv),
    }
    with forkdec.validation(False):
        t = time_interleaved(cands, rounds=rounds)
    return {"t": t, "fp32_bytes": prompt * HKV * D * 2 * 4,
            "raw_bytes": npages * raw.nbytes_per_page(),
            "latent_bytes": npages * (lat_k.nbytes_per_page() + lat_v.nbytes_per_page()),
            "raw_flops": flops_added(prompt, paths, HIDDEN, HIDDEN),
            "latent_flops": flops_added(prompt, paths, LATENT, LATENT),
            "attn_flops": 4.0 * HQ * D * paths * (prompt + own)}


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="forkdec bench xquant-attention", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", help="results folder (default: bench/results in a checkout)")
    parser.add_argument("--quick", action="store_true", help="small sizes, to check the script runs")
    parser.add_argument("--threads", default=f"{torch.get_num_threads()},1",
                        help="comma-separated thread counts to run at (default: all threads, then 1)")
    args = parser.parse_args(argv)
    reason = forkdec.backends.unavailable_reason("cpu", "xquant_attention", torch.device("cpu"))
    if reason is not None:
        raise SystemExit(f"forkdec bench xquant-attention: the cpu backend is unavailable: {reason}")
    keep_freed_memory()
    thread_counts = [int(n) for n in args.threads.split(",")]
    default_threads = torch.get_num_threads()
    configs = [(4, 256, 16), (2, 128, 8)] if args.quick else [(64, 4096, 256), (8, 4096, 256)]
    rows = []
    for threads, (paths, prompt, own) in [(n, c) for n in thread_counts for c in configs]:
        torch.set_num_threads(threads)
        r = case(paths, prompt, own, args.rounds)
        t = r["t"]
        base, base_prompt = t["fp32 KV: cascade_attention"], t["fp32 KV: prompt level only"]
        mode = "P·X̂v, wv once" if deferred(paths * HQ // HKV, HIDDEN) else "V per tile"
        lmode = "P·X̂v, wv once" if deferred(paths * HQ // HKV, LATENT) else "V per tile"
        for name, key, prompt_key, nbytes, flops, m in [
                ("fp32 K/V", "fp32 KV: cascade_attention", "fp32 KV: prompt level only", r["fp32_bytes"], 0.0, "-"),
                ("raw X 4-bit ch64", "xquant raw X 4-bit + own fp32", "xquant raw X: prompt only", r["raw_bytes"],
                 r["raw_flops"], mode),
                ("latent 192+192 4-bit", "xquant latent 4-bit + own fp32", "xquant latent: prompt only",
                 r["latent_bytes"], r["latent_flops"], lmode)]:
            rows.append([str(threads), str(paths), str(prompt), str(own), name, m, f"{t[key] * 1e3:.2f}",
                         f"{t[key] / base:.2f}x", f"{t[prompt_key] * 1e3:.2f}", f"{t[prompt_key] / base_prompt:.2f}x",
                         f"{nbytes / 2**20:.2f}", f"{(r['fp32_bytes'] - nbytes) / 2**20:.2f}",
                         f"{flops / 1e9:.2f}", f"{flops / r['attn_flops']:.1f}x"])
            print(" | ".join(rows[-1]))
    torch.set_num_threads(default_threads)
    table = markdown_table(["threads", "paths", "prompt", "own", "prompt cache", "V path", "step ms",
                            "vs fp32 (target <= 2x)",
                            "prompt level ms", "prompt vs fp32", "prompt cache MiB", "MiB saved vs fp32",
                            "GFLOP added", "added / attention FLOPs"], rows)
    body = ("## Shared-prompt decode step, one layer (SmolLM2: hidden 576, Hq 9, Hkv 3, D 64)\n\n" + table + "\n\n"
            "'step' = prompt level + each path's own tokens (fp32 KV level) + merge; 'prompt level' = that level "
            "alone. Prompt cache bytes include the fp16 scale and zero of every group. 'GFLOP added' counts the "
            "rematerialization (X̂·wk, and X̂·wv or P·X̂v + the final wv) beyond attention over a ready cache; "
            "dequantization and RoPE are not counted. The fp32 path reads 16-token pages, XQuant 64-token pages "
            "(channel groups span 64 tokens). When other jobs share the cores (see the load average above), "
            "trust the 1-thread rows: oversubscribed worker threads distort the multi-thread ones.")
    print(body)
    facts = machine_facts({"forkdec CPU kernels": forkdec._extension.load().cpu_isa(),
                           "timing": f"median of {args.rounds} interleaved rounds", "q dtype": "fp32",
                           "validation": "off (forkdec.validation(False)), as in an engine's hot path",
                           "load average at the end (1/5/15 min)": " ".join(f"{v:.1f}" for v in os.getloadavg())})
    write_report(results_dir(args.out) / "xquant_attention.md", "XQuant attention on the CPU", facts, body)
    return 0


main = run

if __name__ == "__main__":
    raise SystemExit(run())
