"""Softmax benchmark: two-pass kernel vs torch.softmax vs the three-pass control.

Effective bandwidth counts 2 reads + 1 write of fp32 (the paper's accounting);
the ceiling is this machine's copy bandwidth (1 read + 1 write) in the same run.
"""
from __future__ import annotations

import argparse

import torch

import forkdec
from forkdec.bench.common import (keep_freed_memory, machine_facts, markdown_table, results_dir,
                                  time_interleaved, write_report)
from forkdec.ops.softmax import softmax_three_pass

SHAPES = [(64, 262144), (512, 49152), (4096, 4096)]
TARGETS = "at least 2x torch.softmax on the two larger shapes, 1.15x the three-pass kernel out of cache, 60% of copy bandwidth"


def measure(shape: tuple[int, int], rounds: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g) * 5
    copy_out = torch.empty_like(x)
    with forkdec.validation(False):
        return time_interleaved({
            "two-pass": lambda: forkdec.ops.softmax(x, backend="cpu"),
            "three-pass": lambda: softmax_three_pass(x),
            "torch.softmax": lambda: torch.softmax(x, -1),
            "copy": lambda: copy_out.copy_(x),
        }, rounds=rounds)


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="forkdec bench softmax", description=__doc__)
    parser.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds (median reported)")
    parser.add_argument("--out", help="results folder (default: bench/results in a checkout)")
    parser.add_argument("--shapes", default=",".join(f"{r}x{c}" for r, c in SHAPES),
                        help="comma-separated ROWSxCOLS fp32 shapes")
    args = parser.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    steady = keep_freed_memory()
    ext = forkdec._extension.load()
    if ext is None:
        raise SystemExit(f"forkdec bench softmax: {forkdec._extension.error()}")

    rows, plot = [], []
    for shape in shapes:
        t = measure(shape, args.rounds)
        nbytes = shape[0] * shape[1] * 4
        gbs = {k: (3 if k != "copy" else 2) * nbytes / v / 1e9 for k, v in t.items()}
        rows.append([f"{shape[0]}x{shape[1]}", f"{nbytes / 2**20:.0f} MiB",
                     f"{t['two-pass'] * 1e3:.2f}", f"{t['three-pass'] * 1e3:.2f}", f"{t['torch.softmax'] * 1e3:.2f}",
                     f"{gbs['two-pass']:.1f}", f"{gbs['copy']:.1f}",
                     f"{gbs['two-pass'] / gbs['copy']:.0%}",
                     f"{t['torch.softmax'] / t['two-pass']:.2f}x", f"{t['three-pass'] / t['two-pass']:.2f}x"])
        plot.append((shape, gbs))
        print(rows[-1])
    header = ["shape (fp32)", "size", "two-pass ms", "three-pass ms", "torch.softmax ms", "two-pass GB/s",
              "copy GB/s (ceiling)", "of ceiling", "vs torch.softmax", "vs three-pass"]
    table = markdown_table(header, rows)
    print(table)

    out = results_dir(args.out)
    facts = machine_facts({
        "forkdec CPU kernels": ext.cpu_isa(),
        "timing": f"median of {args.rounds} interleaved rounds; outputs allocated per call "
                  + ("with freed memory kept by the allocator (no page faults; see bench/common.py)" if steady
                     else "(allocator left as is)"),
        "GB/s": "softmax counts 2 reads + 1 write of fp32, copy counts 1 read + 1 write",
    })
    write_report(out / "softmax.md", "Two-Pass Softmax on the CPU", facts,
                 table + f"\n\nTargets: {TARGETS}.\n\n![softmax bandwidth](softmax.png)\n")
    _plot(plot, out / "softmax.png")
    return 0


def _plot(results, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["two-pass", "three-pass", "torch.softmax"]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        ax.bar([j + i * width for j in range(len(results))], [r[1][name] for r in results], width, label=name)
    for j, (_, gbs) in enumerate(results):
        ax.hlines(gbs["copy"], j - width / 2, j + width * (len(names) - 0.5), colors="k", linestyles="--",
                  label="copy bandwidth" if j == 0 else None)
    ax.set_xticks([j + width for j in range(len(results))], [f"{s[0]}x{s[1]}" for s, _ in results])
    ax.set_ylabel("effective GB/s (2 reads + 1 write)")
    ax.set_title("softmax, fp32, this CPU")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")
