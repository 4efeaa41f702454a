"""Attention benchmark: cascade attention for shared-prompt decode, tree
verification, and scaling in paths and prompt length, against plain PyTorch.

Baselines (bench/attention_baselines.py) get dense contiguous KV, their best
case; forkdec reads the paged cache (page_size 16, pages scattered).
"""
from __future__ import annotations

import argparse

import torch

import forkdec
from forkdec.bench.attention_baselines import dense_inputs, prefix_suffix, sdpa_flat
from forkdec.bench.common import (keep_freed_memory, machine_facts, markdown_table, results_dir,
                                  time_interleaved, write_report)
from forkdec.reference.attention import PageTable
from forkdec.testing import random_forest

SMOLLM2 = dict(hq=9, hkv=3, d=64)
LLAMA3_8B = dict(hq=32, hkv=8, d=128)


def _cascade(f):
    return lambda: forkdec.ops.cascade_attention(f.q, f.k_cache, f.v_cache, f.levels, backend="cpu")


def shared_prompt(name, shape, paths, prompt, own, rounds, baselines=True):
    """Decode step (one query per path) of `paths` paths sharing a `prompt`-token prompt."""
    g = torch.Generator().manual_seed(0)
    f = random_forest([prompt], [[own] * paths], [[1] * paths], page_size=16, generator=g,
                      with_flat=False, **shape)
    cands = {"cascade_attention": _cascade(f)}
    if baselines:
        dense = dense_inputs(f)
        cands["prefix/suffix (PyTorch)"] = lambda: prefix_suffix(dense["q"], dense["prompt_k"], dense["prompt_v"],
                                                                  dense["own_k"], dense["own_v"])
        cands["SDPA over per-path copies"] = lambda: sdpa_flat(dense["q"], dense["flat_k"], dense["flat_v"])
    t = time_interleaved(cands, rounds=rounds)
    hkv, d, hq = shape["hkv"], shape["d"], shape["hq"]
    kv_bytes = (prompt + paths * own) * hkv * d * 2 * 4
    flops = 4 * hq * d * paths * (prompt + own)
    return t, kv_bytes, flops


def tree_verification(rounds, requests=8, nodes=64, cache=2048):
    g = torch.Generator().manual_seed(1)
    f = random_forest([cache] * requests, [[nodes]] * requests, [[nodes]] * requests, page_size=16, tree=True,
                      generator=g, **SMOLLM2)
    fl = f.flat
    table = PageTable(fl.kv_indptr, fl.kv_indices, fl.kv_last_page_len)
    kv = cache + nodes
    k = torch.stack([table.gather(f.k_cache, b) for b in range(requests)]).transpose(1, 2).contiguous()
    v = torch.stack([table.gather(f.v_cache, b) for b in range(requests)]).transpose(1, 2).contiguous()
    q = f.q.reshape(requests, nodes, SMOLLM2["hq"], SMOLLM2["d"]).transpose(1, 2).contiguous()
    mask = fl.custom_mask.reshape(requests, 1, nodes, kv)
    cands = {
        "attention + tree mask": lambda: forkdec.ops.attention(
            f.q, fl.qo_indptr, f.k_cache, f.v_cache, fl.kv_indptr, fl.kv_indices, fl.kv_last_page_len,
            custom_mask=fl.custom_mask, backend="cpu"),
        "SDPA + dense bool mask": lambda: sdpa_flat(q, k, v, mask),
    }
    return time_interleaved(cands, rounds=rounds)


def plan_split(rounds, paths=64, prompt=4096, own=256):
    """Per-layer cost of a decode step's cascade: validating the metadata on every
    call (the face) vs once per step (CascadePlan, 30 layers share it)."""
    g = torch.Generator().manual_seed(2)
    f = random_forest([prompt], [[own] * paths], [[1] * paths], page_size=16, generator=g, with_flat=False,
                      **SMOLLM2)
    plan = forkdec.ops.CascadePlan(f.levels, num_pages=f.k_cache.shape[0], page_size=16, total_q=f.q.shape[0],
                                   backend="cpu")
    return time_interleaved({"face": _cascade(f), "plan.run": lambda: plan.run(f.q, f.k_cache, f.v_cache)},
                            rounds=rounds)


def rates() -> tuple[float, float]:
    """This machine's copy bandwidth (GB/s) and fp32 matmul rate (GFLOP/s), measured now."""
    x = torch.randn(32 * 2**20)  # 128 MiB, far out of cache
    y = torch.empty_like(x)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    t = time_interleaved({"copy": lambda: y.copy_(x), "mm": lambda: torch.mm(a, b)}, rounds=7)
    return 2 * x.numel() * 4 / t["copy"] / 1e9, 2 * 2048**3 / t["mm"] / 1e9


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="forkdec bench attention", description=__doc__)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", help="results folder (default: bench/results in a checkout)")
    parser.add_argument("--quick", action="store_true", help="small sizes, to check the script runs")
    args = parser.parse_args(argv)
    if forkdec.backends.unavailable_reason("cpu", "cascade_attention", torch.device("cpu")) is not None:
        raise SystemExit("forkdec bench attention: the cpu backend is unavailable: "
                         + str(forkdec.backends.unavailable_reason("cpu", "cascade_attention", torch.device("cpu"))))
    keep_freed_memory()
    bandwidth, matmul = rates()
    q = args.quick
    sections = []

    rows = []
    for name, shape, paths, prompt, own in [("SmolLM2-135M", SMOLLM2, 64, 4096, 256),
                                            ("Llama-3-8B", LLAMA3_8B, 16, 2048, 128)]:
        if q:
            paths, prompt, own = 4, 256, 16
        t, kv_bytes, flops = shared_prompt(name, shape, paths, prompt, own, args.rounds)
        c = t["cascade_attention"]
        rows.append([f"{name} (Hq {shape['hq']}, Hkv {shape['hkv']}, D {shape['d']})", str(paths), str(prompt),
                     str(own), f"{c * 1e3:.2f}", f"{t['prefix/suffix (PyTorch)'] * 1e3:.2f}",
                     f"{t['SDPA over per-path copies'] * 1e3:.2f}",
                     f"{t['SDPA over per-path copies'] / c:.1f}x", f"{t['prefix/suffix (PyTorch)'] / c:.2f}x",
                     f"{kv_bytes / c / 1e9:.1f}", f"{flops / c / 1e9:.1f}"])
        print(rows[-1])
    sections.append("## Shared-prompt decode (fp32, one query per path)\n\n" + markdown_table(
        ["shapes", "paths", "prompt", "own tokens", "cascade ms", "prefix/suffix ms", "SDPA flat ms",
         "vs SDPA (target 5x)", "vs prefix/suffix (target 1.5x)", "cascade GB/s", "cascade GFLOP/s"], rows))

    t = tree_verification(args.rounds, *((2, 16, 256) if q else ()))
    ratio = t["SDPA + dense bool mask"] / t["attention + tree mask"]
    sections.append("## Tree verification (8 requests x 64-node tree over 2048 cached tokens, SmolLM2 shapes)\n\n"
                    + markdown_table(["forkdec attention ms", "SDPA + dense mask ms", "speedup (target 2x)"],
                                     [[f"{t['attention + tree mask'] * 1e3:.2f}",
                                       f"{t['SDPA + dense bool mask'] * 1e3:.2f}", f"{ratio:.1f}x"]]))
    print(sections[-1])

    t = plan_split(args.rounds, *((8, 256, 16) if q else ()))
    saved = t["face"] - t["plan.run"]
    sections.append("## Plan/run split (SmolLM2 shapes, 64 paths, 4096-token prompt, one layer's call)\n\n"
                    + markdown_table(["cascade_attention(levels) ms", "CascadePlan.run ms", "saved per layer ms",
                                      "saved per 30-layer step ms"],
                                     [[f"{t['face'] * 1e3:.3f}", f"{t['plan.run'] * 1e3:.3f}",
                                       f"{saved * 1e3:.3f}", f"{30 * saved * 1e3:.2f}"]]))
    print(sections[-1])

    scaling = {"paths": [], "prompt": []}
    path_counts = [1, 4, 16] if q else [1, 4, 16, 64, 256]
    prompts = [128, 512] if q else [512, 2048, 8192, 32768]
    for paths in path_counts:
        t, kv_bytes, flops = shared_prompt("s", SMOLLM2, paths, 512 if q else 4096, 16 if q else 256, args.rounds,
                                           baselines=paths <= 64)
        scaling["paths"].append((paths, t, kv_bytes, flops))
    for prompt in prompts:
        t, kv_bytes, flops = shared_prompt("s", SMOLLM2, 8 if q else 64, prompt, 16 if q else 256, args.rounds,
                                           baselines=prompt <= 8192)
        scaling["prompt"].append((prompt, t, kv_bytes, flops))
    srows = []
    for axis, items in scaling.items():
        for value, t, kv_bytes, flops in items:
            c = t["cascade_attention"]
            paths = value if axis == "paths" else (8 if q else 64)
            srows.append([axis, str(value), f"{c * 1e3:.2f}", f"{c / paths * 1e6:.1f}",
                          f"{t.get('SDPA over per-path copies', float('nan')) * 1e3:.2f}",
                          f"{kv_bytes / c / 1e9:.1f} ({kv_bytes / c / 1e9 / bandwidth:.0%})",
                          f"{flops / c / 1e9:.1f} ({flops / c / 1e9 / matmul:.0%})"])
    sections.append(
        "## Scaling (SmolLM2 shapes; paths at a 4096-token prompt, prompts at 64 paths; 256 own tokens)\n\n"
        + markdown_table(["varied", "value", "cascade ms", "per path us", "SDPA flat ms",
                          "GB/s (of copy bw)", "GFLOP/s (of matmul)"], srows)
        + f"\n\nRoofline of this machine, measured in this run: copy bandwidth {bandwidth:.1f} GB/s, "
          f"fp32 matmul {matmul:.0f} GFLOP/s. GB/s counts each KV byte once (the prompt once for all paths).\n\n"
          "![scaling](attention.png)")
    print(sections[-1])

    out = results_dir(args.out)
    facts = machine_facts({"forkdec CPU kernels": forkdec._extension.load().cpu_isa(),
                           "timing": f"median of {args.rounds} interleaved rounds", "dtype": "fp32",
                           "layout": "paged, page_size 16, pages scattered at random"})
    write_report(out / "attention.md", "Attention on the CPU", facts, "\n\n".join(sections))
    _plot(scaling, out / "attention.png")
    return 0


def _plot(scaling, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (axis, items) in zip(axes, scaling.items()):
        xs = [v for v, *_ in items]
        for name, style in [("cascade_attention", "o-"), ("prefix/suffix (PyTorch)", "s--"),
                            ("SDPA over per-path copies", "^:")]:
            pts = [(x, t[name] * 1e3) for x, (_, t, *_r) in zip(xs, items) if name in t]
            if pts:
                ax.plot(*zip(*pts), style, label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("paths (4096-token prompt)" if axis == "paths" else "prompt tokens (64 paths)")
        ax.set_ylabel("ms per decode step (one layer)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("shared-prompt decode attention, SmolLM2 shapes, fp32, this CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")
