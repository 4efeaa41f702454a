"""qlinear benchmark: GGUF block products against bf16 GEMMs, the n=1 roofline, and
the breakdown of a decode step.

1. Each SmolLM2-135M matrix shape (Q4_1; the tied LM head Q8_0) at m = 1..128 rows:
   forkdec.ops.qlinear (cpu) against F.linear on the same values in bf16 (oneDNN),
   timed interleaved (bench.common.time_interleaved).
2. Read bandwidth of this machine (a sum over a 512 MiB tensor) and the bytes one
   decode step must read with each weight form: the n=1 roofline.
3. A decode step of the engine at n = 1, 8, 32 under torch.profiler, per weight form
   (a form with ":python" runs the model's Python layer loop instead of the C++ one,
   forkdec.ops.llama_layers): wall time per step and where it goes (GEMMs, qlinear,
   fused layer ops, attention, sampling, the C++ loop with the kernels it calls
   itself, other aten ops, and the rest: Python and waits).
Writes bench/results/qlinear.md.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from forkdec.bench.common import machine_facts, markdown_table, results_dir, time_interleaved, write_report

SHAPES = [("qkv", 960, 576, "Q4_1"), ("o", 576, 576, "Q4_1"), ("gate_up", 3072, 576, "Q4_1"),
          ("down", 576, 1536, "Q4_1"), ("lm_head", 49152, 576, "Q8_0")]
CATEGORIES = {  # profiler op name -> part of a step
    "aten::mm": "bf16/fp32 GEMM", "aten::addmm": "bf16/fp32 GEMM", "forkdec::qlinear": "qlinear (GGUF blocks)",
    "forkdec::attention": "attention", "forkdec::cascade_attention": "attention", "forkdec::append_kv": "attention",
    "forkdec::rms_norm": "fused layer ops", "forkdec::add_rms_norm": "fused layer ops",
    "forkdec::rope_qkv": "fused layer ops", "forkdec::silu_and_mul": "fused layer ops", "forkdec::sample": "sampling",
    "forkdec::sample_with_logprobs": "sampling", "forkdec::llama_layers": "C++ layer loop",
}


def packed(qtype: str, n: int, k: int):
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    from forkdec.qweight import pack_gguf

    code = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 8}[qtype]
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(n + k)).numpy() * 0.05
    return pack_gguf(quantize(w, GGMLQuantizationType(code)), code, (n, k))


def kernel_table(ms: list[int], rounds: int) -> list[list[str]]:
    from forkdec import ops, validation
    from forkdec.qweight import dequantize

    rows = []
    for name, n, k, qtype in SHAPES:
        w = packed(qtype, n, k)
        dense = dequantize(w).bfloat16()
        for m in ms:
            x = torch.randn(m, k).bfloat16()
            with validation(False):
                t = time_interleaved({"q": lambda: ops.qlinear(x, w, backend="cpu"),
                                      "bf16": lambda: F.linear(x, dense)}, rounds=rounds)
            rows.append([name, qtype, f"{n}x{k}", str(m), f"{t['q'] * 1e6:.1f}", f"{t['bf16'] * 1e6:.1f}",
                         f"{t['bf16'] / t['q']:.2f}x", f"{w.nbytes() / t['q'] / 1e9:.1f}"])
            print(" | ".join(rows[-1]), flush=True)
    return rows


def read_bandwidth(rounds: int = 7) -> float:
    """GB/s of a multi-threaded read (sum) of 512 MiB, the best of `rounds`."""
    x = torch.ones(128 * 2**20, dtype=torch.float32)
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best / 1e9


def step_bytes(model) -> int:
    """Bytes of weights one decode step reads (each matrix once, LM head included)."""
    from forkdec.qweight import QuantizedWeight

    total = 0
    for layer in model.layers:
        w = layer.blocks if layer.blocks is not None else layer
        for name in ("qkv", "o", "gate_up", "down"):
            m = getattr(w, name)
            total += m.nbytes() if isinstance(m, QuantizedWeight) else m.numel() * m.element_size()
        total += 2 * layer.attn_norm.numel() * layer.attn_norm.element_size()
    head = model.head_blocks if model.head_blocks is not None else model.lm_head
    total += head.nbytes() if isinstance(head, QuantizedWeight) else head.numel() * head.element_size()
    return total


def profile_steps(form: str, ns: list[int], new_tokens: int, timed_tokens: int = 128,
                  repeats: int = 3) -> tuple[list[list[str]], dict[int, float], int]:
    from torch.profiler import ProfilerActivity, profile

    from forkdec.engine import Engine, SamplingParams
    from forkdec.models import load_model

    weights, _, loop = form.partition(":")
    model, tokenizer = load_model(weights=weights)
    model.cxx_layers = loop != "python"
    engine = Engine(model, tokenizer=tokenizer)
    engine.generate("warm up", 2, SamplingParams(max_new_tokens=4))
    rows, step_ms = [], {}
    timed = SamplingParams(temperature=0.7, max_new_tokens=timed_tokens, ignore_eos=True, seed=0)
    for n in ns:
        plain = float("inf")
        for _ in range(repeats):  # the timing without the profiler: the best of `repeats` runs
            engine.generate("Count from one to fifty.", n, timed)
            s = engine.last_stats
            plain = min(plain, s.decode_seconds / max(s.decode_steps, 1) * 1e3)
        # Decode steps only: the profile of generate(new_tokens) minus that of generate(1 token),
        # which holds the prefill and the first draw.
        parts: dict[str, float] = {}
        walls = []
        for sign, tokens in ((1.0, new_tokens), (-1.0, 1)):
            p = SamplingParams(temperature=0.7, max_new_tokens=tokens, ignore_eos=True, seed=0)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                t0 = time.perf_counter()
                engine.generate("Count from one to fifty.", n, p)
                walls.append(time.perf_counter() - t0)
            for e in prof.key_averages():
                cat = CATEGORIES.get(e.key, "other aten ops" if e.key.startswith("aten::") else None)
                if cat is not None:
                    parts[cat] = parts.get(cat, 0.0) + sign * e.self_cpu_time_total / 1e3
        steps = new_tokens - 1
        wall = (walls[0] - walls[1]) * 1e3 / steps
        cells = {c: max(v, 0.0) / steps for c, v in parts.items()}
        kernel = sum(cells.values())
        step_ms[n] = plain
        rows.append([form, str(n), f"{plain:.1f}", f"{wall:.1f}"]
                    + [f"{cells.get(c, 0.0):.1f}" for c in PART_ORDER] + [f"{max(wall - kernel, 0.0):.1f}"])
        print(" | ".join(rows[-1]), flush=True)
    nbytes = step_bytes(model)
    return rows, step_ms, nbytes


PART_ORDER = ["bf16/fp32 GEMM", "qlinear (GGUF blocks)", "fused layer ops", "attention", "sampling",
              "C++ layer loop", "other aten ops"]


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="forkdec bench qlinear", description=__doc__)
    parser.add_argument("--m", default="1,2,3,4,8,16,32,64,128", help="rows of the kernel table")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--n", default="1,8,32", help="paths of the profiled decode steps")
    parser.add_argument("--weights", default="bf16,gguf,gguf+bf16,gguf+bf16:python",
                        help="weight forms profiled; ':python' runs the model's Python layer loop")
    parser.add_argument("--new-tokens", type=int, default=24, help="tokens per path in a profiled generate()")
    parser.add_argument("--timed-tokens", type=int, default=128,
                        help="tokens per path in the step timings without the profiler")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each step timing (the best is kept)")
    parser.add_argument("--skip-kernels", action="store_true")
    parser.add_argument("--out", help="results folder (default: bench/results in a checkout)")
    args = parser.parse_args(argv)
    ms = [int(v) for v in args.m.split(",")]
    ns = [int(v) for v in args.n.split(",")]
    sections = []
    if not args.skip_kernels:
        rows = kernel_table(ms, args.rounds)
        sections += ["## Kernels: qlinear (cpu) vs bf16 F.linear on the same values", "",
                     markdown_table(["matrix", "format", "N x K", "m", "qlinear us", "bf16 us", "bf16 / qlinear",
                                     "qlinear GB/s read"], rows), "",
                     "Median of interleaved rounds. GB/s: packed bytes (codes + fp16 scales and offsets) / time.", ""]
    # This machine's bandwidth moves with its neighbours' load: measured before and after
    # every form's steps, and the highest taken (the strictest roofline).
    bandwidths = [read_bandwidth()]
    profile_rows, steps = [], []
    for form in [f.strip() for f in args.weights.split(",") if f.strip()]:
        rows, step_ms, nbytes = profile_steps(form, ns, args.new_tokens, args.timed_tokens, args.repeats)
        bandwidths.append(read_bandwidth())
        profile_rows += rows
        if 1 in step_ms:
            steps.append((form, nbytes, step_ms[1]))
    bandwidth = max(bandwidths)
    roofline = []
    for form, nbytes, step in steps:
        read_ms = nbytes / bandwidth / 1e6
        roofline.append([form, f"{nbytes / 2**20:.1f}", f"{read_ms:.2f}", f"{step:.2f}", f"{step / read_ms:.2f}x"])
    sections += ["## Decode step breakdown (engine, torch.profiler)", "",
                 markdown_table(["weights", "n", "step ms (no profiler)", "step ms (profiled)"]
                                + [f"{p} ms" for p in PART_ORDER] + ["rest: Python, dispatch, waits ms"],
                                profile_rows), "",
                 "Parts are profiler self-times per decode step: the profile of generate(new tokens) minus that of "
                 "generate(1 token) (prefill and first draw), divided by the steps between; the rest is the profiled "
                 "wall time per step minus them. The C++ layer loop (forkdec.ops.llama_layers) calls the layers' "
                 "norms, RoPE, SwiGLU and products on stored blocks as kernels, not ops: its column holds them and "
                 "its dispatch (its attention ops are under attention; qlinear is then the LM head only). "
                 "The step without the profiler is the best of "
                 f"{args.repeats} runs of {args.timed_tokens} new tokens per path.", "",
                 f"## n=1 roofline: read bandwidth {bandwidth:.1f} GB/s", "",
                 f"The highest of {len(bandwidths)} measurements spread over the run (each the best of 7 sums "
                 f"over 512 MiB; they ranged {min(bandwidths):.1f}-{max(bandwidths):.1f} GB/s).", "",
                 markdown_table(["weights", "weights read per step MiB", "read time ms", "n=1 step ms",
                                 "step / read time"], roofline), ""]
    facts = machine_facts({"note": "a machine shared with other jobs: run-to-run spread about 10%",
                           "load average (1, 5, 15 min) at the end": ", ".join(f"{x:.1f}" for x in __import__("os").getloadavg())})
    write_report(results_dir(args.out) / "qlinear.md", "qlinear: GGUF block products and the decode step", facts,
                 "\n".join(sections))
    return 0


if __name__ == "__main__":
    raise SystemExit(run())
