"""Sampling benchmark: forkdec's sorting-free CPU `sample` vs the usual PyTorch
pipeline (temperature, softmax, full sort, top-k/top-p masks, torch.multinomial),
and greedy vs torch.argmax, on fp32 logits.

GB/s counts one read of the logits (the least any sampler must move).
"""
from __future__ import annotations

import argparse

import torch

import forkdec
from forkdec.bench.common import (keep_freed_memory, machine_facts, markdown_table, results_dir,
                                  time_interleaved, write_report)

SHAPES = [(64, 49152), (256, 151936)]
TEMPERATURE, TOP_K, TOP_P = 0.8, 50, 0.9
FAN_OUT = 64  # paths drawing from one row in the fan-out case
TARGETS = "sample with top-k 50 + top-p 0.9 at least 3x faster than the PyTorch pipeline on both shapes"


def torch_sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                 generator: torch.Generator | None = None, num_samples: int = 1) -> torch.Tensor:
    """The PyTorch baseline: what engines do without a fused sampler.

    Temperature, softmax, one full descending sort, top-k by zeroing the tail,
    top-p over the renormalized top-k (drop tokens whose preceding mass already
    reaches p), torch.multinomial on what is left. Returns [rows, num_samples].
    """
    probs = torch.softmax(logits / temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    if 0 < top_k < sorted_probs.shape[-1]:
        sorted_probs[:, top_k:] = 0
    if top_p < 1:
        sorted_probs = sorted_probs / sorted_probs.sum(dim=-1, keepdim=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs[before >= top_p] = 0
    choice = torch.multinomial(sorted_probs, num_samples, replacement=True, generator=generator)
    return order.gather(1, choice)


def measure(shape: tuple[int, int], rounds: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(shape, generator=g) * 4
    ids = torch.zeros(FAN_OUT, dtype=torch.long)
    one_row = logits[:1]
    threads = torch.get_num_threads()

    def forkdec_sample():
        return forkdec.ops.sample(logits, temperature=TEMPERATURE, top_k=TOP_K, top_p=TOP_P, generator=g,
                                  backend="cpu")

    def one_thread():  # on a shared machine, waking the other threads can cost more than the work
        torch.set_num_threads(1)
        try:
            return forkdec_sample()
        finally:
            torch.set_num_threads(threads)

    with forkdec.validation(False):
        return time_interleaved({
            "forkdec": forkdec_sample,
            "forkdec 1 thread": one_thread,
            "torch": lambda: torch_sample(logits, TEMPERATURE, TOP_K, TOP_P, g),
            "forkdec greedy": lambda: forkdec.ops.sample(logits, temperature=0.0, generator=g, backend="cpu"),
            "torch.argmax": lambda: logits.argmax(dim=-1),
            "forkdec fan-out": lambda: forkdec.ops.sample(one_row, temperature=TEMPERATURE, top_k=TOP_K,
                                                          top_p=TOP_P, row_ids=ids, generator=g, backend="cpu"),
            "torch fan-out": lambda: torch_sample(one_row, TEMPERATURE, TOP_K, TOP_P, g, num_samples=FAN_OUT),
        }, rounds=rounds)


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="forkdec bench sampling", description=__doc__)
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds (median reported)")
    parser.add_argument("--out", help="results folder (default: bench/results in a checkout)")
    parser.add_argument("--shapes", default=",".join(f"{r}x{c}" for r, c in SHAPES),
                        help="comma-separated ROWSxVOCAB fp32 shapes")
    args = parser.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    steady = keep_freed_memory()
    ext = forkdec._extension.load()
    if ext is None:
        raise SystemExit(f"forkdec bench sampling: {forkdec._extension.error()}")

    rows = []
    for shape in shapes:
        t = measure(shape, args.rounds)
        gbs = shape[0] * shape[1] * 4 / t["forkdec"] / 1e9
        rows.append([f"{shape[0]}x{shape[1]}", f"{t['forkdec'] * 1e3:.2f}", f"{t['forkdec 1 thread'] * 1e3:.2f}",
                     f"{t['torch'] * 1e3:.1f}", f"{t['torch'] / t['forkdec']:.1f}x", f"{gbs:.1f}",
                     f"{t['forkdec greedy'] * 1e3:.2f}", f"{t['torch.argmax'] * 1e3:.2f}",
                     f"{t['torch.argmax'] / t['forkdec greedy']:.2f}x",
                     f"{t['forkdec fan-out'] * 1e3:.3f}", f"{t['torch fan-out'] * 1e3:.2f}",
                     f"{t['torch fan-out'] / t['forkdec fan-out']:.1f}x"])
        print(rows[-1])
    header = ["shape (fp32)", "forkdec ms", "forkdec 1 thread ms", "torch ms", "vs torch", "forkdec GB/s", "greedy ms", "torch.argmax ms",
              "greedy vs argmax", f"fan-out 1->{FAN_OUT} ms", "torch fan-out ms", "fan-out vs torch"]
    table = markdown_table(header, rows)
    print(table)
    facts = machine_facts({
        "forkdec CPU kernels": ext.cpu_isa(),
        "settings": f"temperature {TEMPERATURE}, top_k {TOP_K}, top_p {TOP_P}; logits randn * 4; "
                    "validation off (forkdec.validation(False)), uniforms drawn by the face each call",
        "baseline": "bench/sampling.py torch_sample: softmax(x / t), full sort, top-k/top-p masks, torch.multinomial",
        "fan-out": f"one row, {FAN_OUT} draws: forkdec row_ids (filtered once) vs torch.multinomial(num_samples="
                   f"{FAN_OUT}) after the same pipeline",
        "timing": f"median of {args.rounds} interleaved rounds; "
                  + ("freed memory kept by the allocator (no page faults; see bench/common.py)" if steady
                     else "allocator left as is"),
        "GB/s": "one read of the fp32 logits",
    })
    write_report(results_dir(args.out) / "sampling.md", "Sampling on the CPU", facts,
                 table + f"\n\nTargets: {TARGETS}.\n")
    return 0
