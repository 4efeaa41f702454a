"""What per-token signals cost: `sample_with_logprobs` (the token's logprob, the
top-20 logprobs and DeepConf's confidence, fused into the sampler) against plain
`sample`, as a share of an engine decode step, at n = 32 rows of the embedded
model's vocabulary (49,152), fp32 logits as the engine hands them over.

Also timed: what the engine does today for the token logprob (sample, then
`logits[rows, tokens] - torch.logsumexp(logits)`), and the unfused PyTorch
route to the same signals (that, plus `torch.topk(logits, 20)`). The decode
step is measured with `forkdec.Engine` on the embedded SmolLM2-135M (n = 32
paths, decode seconds / decode steps of a `generate` call). Every candidate is
timed in interleaved rounds; the report gives the median and the spread
(min..max over rounds), in CPU time (the process's, all threads: the work,
robust to a loaded machine) and in wall time, each against the decode step
measured with the same clock.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import forkdec
from forkdec.bench.common import keep_freed_memory, machine_facts, markdown_table, results_dir, write_report

ROWS, VOCAB, TOP = 32, 49152, 20
TEMPERATURE, TOP_P = 0.7, 0.95
TARGET = "signals (confidence + top-20 logprobs) cost at most 3% of a decode step over plain sampling at n = 32"


def timed_rounds(candidates: dict, rounds: int, calls: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """(wall, CPU) seconds per call of each candidate in every round (rounds
    interleave the candidates). CPU seconds are this process's, all threads:
    on a loaded machine they measure the work, where wall time also measures
    the neighbours."""
    for f in candidates.values():
        f()
    wall: dict[str, list[float]] = {name: [] for name in candidates}
    cpu: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, f in candidates.items():
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(calls):
                f()
            wall[name].append((time.perf_counter() - t0) / calls)
            cpu[name].append((time.process_time() - c0) / calls)
    return wall, cpu


def decode_step_seconds(repeats: int, new_tokens: int) -> tuple[list[float], list[float]]:
    """(wall, CPU) seconds per decode step of the engine at n = ROWS paths, one
    value per repeat (CPU: the whole call's process time over its decode steps,
    its short prefill included)."""
    from forkdec.engine.engine import Engine
    from forkdec.engine.params import SamplingParams

    engine = Engine()
    params = SamplingParams(temperature=TEMPERATURE, top_p=TOP_P, max_new_tokens=new_tokens, ignore_eos=True, seed=0)
    engine.generate("Write a short story about a lighthouse.", ROWS, params)  # warm-up
    wall, cpu = [], []
    for r in range(repeats):
        c0 = time.process_time()
        engine.generate("Write a short story about a lighthouse.", ROWS, params)
        s = engine.last_stats
        wall.append(s.decode_seconds / max(1, s.decode_steps))
        cpu.append((time.process_time() - c0) / max(1, s.decode_steps))
    return wall, cpu


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="forkdec bench sampling-signals", description=__doc__)
    parser.add_argument("--rounds", type=int, default=9, help="interleaved timing rounds")
    parser.add_argument("--calls", type=int, default=20, help="calls per candidate per round")
    parser.add_argument("--step-repeats", type=int, default=3, help="engine generate calls timed for the step")
    parser.add_argument("--step-tokens", type=int, default=32, help="new tokens per path in those calls")
    parser.add_argument("--out", help="results folder (default: bench/results in a checkout)")
    args = parser.parse_args(argv)
    steady = keep_freed_memory()
    ext = forkdec._extension.load()
    if ext is None:
        raise SystemExit(f"forkdec bench sampling-signals: {forkdec._extension.error()}")

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(ROWS, VOCAB, generator=g) * 4
    rows = torch.arange(ROWS)
    kw = dict(temperature=TEMPERATURE, top_p=TOP_P, generator=g, backend="cpu")

    def engine_today():
        tokens = forkdec.ops.sample(logits, **kw)
        return logits[rows, tokens] - torch.logsumexp(logits, dim=-1)[rows]

    def torch_signals():
        tokens = forkdec.ops.sample(logits, **kw)
        lse = torch.logsumexp(logits, dim=-1)
        top = torch.topk(logits, TOP, dim=-1).values - lse[:, None]
        return logits[rows, tokens] - lse, top, -top.mean(dim=-1)

    with forkdec.validation(False):
        wall, cpu = timed_rounds({
            "sample": lambda: forkdec.ops.sample(logits, **kw),
            "sample_with_logprobs(top 20)": lambda: forkdec.ops.sample_with_logprobs(logits, top_logprobs=TOP, **kw),
            "sample_with_logprobs(logprob only)": lambda: forkdec.ops.sample_with_logprobs(logits, top_logprobs=None,
                                                                                          **kw),
            "engine before (issue 17): sample + logsumexp": engine_today,
            "torch: sample + logsumexp + topk": torch_signals,
        }, args.rounds, args.calls)
    print("timing the engine's decode step ...", flush=True)
    step_wall, step_cpu = decode_step_seconds(args.step_repeats, args.step_tokens)

    sections, verdicts = [], []
    for clock, samples, step in (("CPU time", cpu, step_cpu), ("wall time", wall, step_wall)):
        step_median = statistics.median(step)
        base = statistics.median(samples["sample"])
        table_rows = []
        for name, s in samples.items():
            med = statistics.median(s)
            extra = med - base
            table_rows.append([name, f"{med * 1e3:.3f}", f"{min(s) * 1e3:.3f}..{max(s) * 1e3:.3f}",
                               f"{extra * 1e3:+.3f}", f"{100 * extra / step_median:+.2f}%"])
        table = markdown_table([f"candidate (32 x 49152 fp32), {clock}", "median ms", "spread ms (min..max)",
                                "over sample ms", "share of a decode step"], table_rows)
        fused = statistics.median(samples["sample_with_logprobs(top 20)"]) - base
        verdict = (f"{clock}: decode step of the engine at n = {ROWS}: median {step_median * 1e3:.1f} ms "
                   f"(repeats: {', '.join(f'{s * 1e3:.1f}' for s in step)} ms). Signals over plain sampling: "
                   f"{fused * 1e3:.3f} ms = {100 * fused / step_median:.2f}% of a step "
                   f"({'meets' if fused <= 0.03 * step_median else 'misses'} the 3% target).")
        print(table)
        print(verdict, flush=True)
        sections.append(f"### {clock}\n\n{table}\n\n{verdict}")
        verdicts.append(verdict)
    facts = machine_facts({
        "forkdec CPU kernels": ext.cpu_isa(),
        "settings": f"{ROWS} x {VOCAB} fp32 logits randn * 4, temperature {TEMPERATURE}, top_p {TOP_P}, "
                    f"top {TOP} logprobs; validation off; uniforms drawn by the face each call",
        "decode step": f"forkdec.Engine() (embedded SmolLM2-135M, defaults), {ROWS} paths, {args.step_tokens} new "
                       f"tokens each (ignore_eos), decode_seconds / decode_steps, {args.step_repeats} calls after a "
                       "warm-up",
        "timing": f"{args.rounds} interleaved rounds of {args.calls} calls; "
                  + ("freed memory kept by the allocator" if steady else "allocator left as is"),
        "load": "load average (1, 5, 15 min) at the end: " + ", ".join(f"{x:.1f}" for x in os.getloadavg()),
    })
    write_report(results_dir(args.out) / "sampling_signals.md", "Per-token signals in the sampler: overhead",
                 facts, "\n\n".join(sections) + f"\n\nTarget: {TARGET}.\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(run())
