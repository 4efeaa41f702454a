"""Speculative decoding benchmark: tokens/s with n-gram tree drafts vs plain decoding.

SmolLM2-135M-Instruct (the embedded GGUF), the engine's default dtype, chat template.
- n = 1, greedy, 256 new tokens: a GSM8K test question and a code-like prompt,
  speculation off / on (adaptive). Target: on >= 1.5x off.
- n in {4, 16, 64}, temperature 0.7, the GSM8K question, every path forced to
  the full length (ignore_eos): off, adaptive, and always-verify (fixed budget,
  no adaptation), with the mean tokens per path per step. Target: adaptive
  never slower than off by more than 5%.
- Peer at n = 1: llama.cpp through `bench/llama_cpp_peer.py` (another branch's
  module, imported lazily), reported as not available when it is missing.
Each cell is run --rounds times (default 3), the cells interleaved, and the median
run reported: the machine is shared with other jobs, so read ratios with that in mind.
"""
from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path
from typing import Any

import torch

from forkdec.bench.common import machine_facts, markdown_table, results_dir, write_report

TARGETS = "n=1 greedy: speculation >= 1.5x off; n in {4,16,64} at T=0.7: adaptive >= 0.95x off"
CODE_PROMPT = ("Write a Python class `Matrix` with methods add, sub, mul and transpose, each with type hints "
               "and a docstring, then unit tests for every method using unittest.")
FALLBACK_QUESTION = ("Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes "
                     "muffins for her friends every day with four. She sells the remainder at the farmers' market "
                     "daily for $2 per fresh duck egg. How much in dollars does she make every day at the "
                     "farmers' market?")


def gsm8k_question(path: str) -> tuple[str, str]:
    p = Path(path)
    if not p.is_file():
        return FALLBACK_QUESTION, f"{path} missing: a fixed built-in GSM8K-style question"
    first = json.loads(next(line for line in p.read_text().splitlines() if line.strip()))
    return first["question"], "GSM8K test question 1"


def run_cells(engine: Any, cells: dict[str, dict], prompt: str, n: int, max_new: int, temperature: float,
              rounds: int) -> dict[str, dict]:
    """Each cell (a run_engine keyword set) `rounds` times, the cells interleaved so that a noisy
    neighbour hurts all alike; per cell the run with the median tokens/s."""
    runs: dict[str, list[dict]] = {name: [] for name in cells}
    for _ in range(rounds):
        for name, kw in cells.items():
            runs[name].append(run_engine(engine, prompt, n, max_new, temperature, **kw))
    return {name: sorted(r, key=lambda x: x["tok_s"])[len(r) // 2] for name, r in runs.items()}


def run_engine(engine: Any, prompt: str, n: int, max_new: int, temperature: float, speculate: str,
               adaptive: bool = True, budget: int | None = None) -> dict:
    from forkdec.engine import SamplingParams

    extra = {} if budget is None else {"draft_budget": budget}
    params = SamplingParams(temperature=temperature, max_new_tokens=max_new, ignore_eos=True, seed=0,
                            speculate=speculate, draft_adaptive=adaptive, **extra)
    engine.generate(prompt, n, params)
    s = engine.last_stats
    return {"tok_s": s.generated_tokens / max(s.decode_seconds, 1e-9), "tokens": s.generated_tokens,
            "steps": s.decode_steps, "spec_steps": s.speculative_steps, "per_step": s.tokens_per_path_step,
            "acceptance": s.draft_acceptance, "drafts": s.draft_tokens}


def _self_attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention over the fed tokens only: the step-cost probe needs the linear layers' cost, which dominates."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1))
    return out.transpose(0, 1)


def step_costs(model: Any, sizes: list[int]) -> dict[int, float]:
    """Median seconds of a forward that feeds T tokens (all rows' logits, as a verification step needs)."""
    from forkdec.bench.common import time_interleaved

    def forward(t: int):
        tokens, positions = torch.randint(0, 1000, (t,)), torch.arange(100, 100 + t)
        return lambda: model.forward(tokens, positions, _self_attend)

    with torch.inference_mode():
        return time_interleaved({t: forward(t) for t in sizes}, rounds=5, min_seconds=0.02)


def fit_line(costs: dict[int, float]) -> tuple[float, float]:
    n = len(costs)
    mt, ms = sum(costs) / n, sum(costs.values()) / n
    b = sum((t - mt) * (s - ms) for t, s in costs.items()) / sum((t - mt) ** 2 for t in costs)
    return ms - b * mt, b


def llama_cpp_peer(prompt_ids: list[int], max_new: int) -> dict | str:
    """The peer's result dict, or why it is missing."""
    try:
        peer = importlib.import_module("forkdec.bench.llama_cpp_peer")
    except ImportError as e:
        return f"not available in this tree ({e})"
    from forkdec.models import default_model_path

    try:
        r = peer.llama_cpp_generate(str(default_model_path()), prompt_ids, 1, max_new, 0.0, seed=0, threads=2)
    except Exception as e:  # the peer is optional: report, do not fail the benchmark
        return f"failed: {type(e).__name__}: {e}"
    return {"tok_s": r["generated_tokens"] / max(r["decode_seconds"], 1e-9)}


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="forkdec bench speculative", description=__doc__)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--n", default="4,16,64", help="path counts for the sampled rows")
    parser.add_argument("--batch-max-new-tokens", type=int, default=128, help="new tokens per path at n > 1")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="engine dtype (default: loader's)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's); 1 keeps timings stable on a shared machine")
    parser.add_argument("--rounds", type=int, default=3, help="runs per cell, interleaved; the median is reported")
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument("--quick", action="store_true", help="64 new tokens, n 4,16")
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[1].parent / "shared/data/gsm8k/test.jsonl"))
    parser.add_argument("--out", help="results folder (default: bench/results in a checkout)")
    args = parser.parse_args(argv)
    if args.quick:
        args.max_new_tokens, args.batch_max_new_tokens, args.n, args.rounds = 64, 32, "4,16", 1
    ns = [int(v) for v in args.n.split(",")]
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    from forkdec.engine import Engine

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, None: None}[args.dtype]
    engine = Engine(dtype=dtype)
    question, data_note = gsm8k_question(args.data)
    prompts = {"gsm8k": question, "code": CODE_PROMPT}
    run_engine(engine, "Hello", 2, 8, 0.0, "ngram")  # warm-up: thread pools, first-call costs

    sizes = [1, 2, 4, 8, 16, 32, 64, 96]
    costs = step_costs(engine.model, sizes)
    a, b = fit_line(costs)
    cost_rows = [[str(t), f"{costs[t] * 1e3:.1f}", f"{costs[t] / costs[1]:.2f}"] for t in sizes]
    print(cost_rows, a, b)

    greedy_rows, greedy = [], {}
    for name, prompt in prompts.items():
        cells = run_cells(engine, {"off": dict(speculate="off"), "ngram": dict(speculate="ngram")}, prompt, 1,
                          args.max_new_tokens, 0.0, args.rounds)
        off, on = cells["off"], cells["ngram"]
        greedy[name] = {"off": off, "ngram": on}
        peer = "skipped" if args.no_peer else llama_cpp_peer(engine.encode(prompt), args.max_new_tokens)
        peer_cell = f"{peer['tok_s']:.1f}" if isinstance(peer, dict) else peer
        greedy_rows.append([name, f"{off['tok_s']:.1f}", f"{on['tok_s']:.1f}", f"{on['tok_s'] / off['tok_s']:.2f}x",
                            f"{on['per_step']:.2f}", f"{on['acceptance']:.2f}", f"{on['spec_steps']}/{on['steps']}",
                            peer_cell])
        print(greedy_rows[-1])

    batch_rows, batch = [], {}
    for n in ns:
        cells = run_cells(engine, {"off": dict(speculate="off"), "adaptive": dict(speculate="ngram"),
                                   "fixed": dict(speculate="ngram", adaptive=False)}, question, n,
                          args.batch_max_new_tokens, 0.7, args.rounds)
        off, adaptive, fixed = cells["off"], cells["adaptive"], cells["fixed"]
        batch[n] = {"off": off, "adaptive": adaptive, "fixed": fixed}
        batch_rows.append([str(n), f"{off['tok_s']:.1f}", f"{adaptive['tok_s']:.1f}",
                           f"{adaptive['tok_s'] / off['tok_s']:.2f}x", f"{adaptive['per_step']:.2f}",
                           f"{adaptive['spec_steps']}/{adaptive['steps']}", f"{fixed['tok_s']:.1f}",
                           f"{fixed['tok_s'] / off['tok_s']:.2f}x", f"{fixed['per_step']:.2f}"])
        print(batch_rows[-1])

    t1 = markdown_table(["prompt", "off tok/s", "ngram tok/s", "speedup", "tokens/step", "draft acceptance",
                         "tree steps", "llama.cpp tok/s"], greedy_rows)
    t2 = markdown_table(["n", "off tok/s", "adaptive tok/s", "adaptive/off", "tokens/path-step", "tree steps",
                         "always-verify tok/s", "always/off", "always tokens/path-step"], batch_rows)
    t0 = markdown_table(["tokens fed T", "forward ms", "vs T=1"], cost_rows)
    crossover = ", ".join(f"n={n}: {b * n / (a + b * n):.2f}" for n in [1, 4, 16, 64])
    body = (f"Targets: {TARGETS}.\n\nTokens/s are generated tokens over decode seconds (prefill excluded), "
            f"aggregate over paths. 'tokens/step' = tokens a path gains per decode step (1.0 = no gain).\n\n"
            f"## Step cost vs tokens fed (the model's forward, all rows' logits)\n\n{t0}\n\n"
            f"Fit: a = {a * 1e3:.1f} ms + b = {b * 1e3:.2f} ms per token. A draft node pays for its verification "
            f"when its acceptance probability exceeds about b*n / (a + b*n): {crossover}.\n\n"
            f"## n = 1, greedy, {args.max_new_tokens} new tokens\n\n{t1}\n\n"
            f"## GSM8K question, temperature 0.7, {args.batch_max_new_tokens} new tokens per path\n\n{t2}\n")
    facts = machine_facts({"model": "SmolLM2-135M-Instruct Q4_1 GGUF (embedded)",
                           "engine dtype": str(engine.kv_dtype), "data": data_note,
                           "settings": "draft_budget 24, draft_depth 8, n-gram order 4, seed 0, ignore_eos, "
                                       f"{torch.get_num_threads()} torch thread(s)",
                           "note": f"median of {args.rounds} interleaved run(s) per cell on a shared 2-core machine "
                                   "(other jobs were running: read ratios with that in mind)"})
    out = results_dir(args.out) / "speculative.md"
    write_report(out, "Speculative decoding (n-gram tree drafts) in the engine", facts, body)
    (out.with_suffix(".json")).write_text(json.dumps({"step_cost": {"a": a, "b": b, "by_tokens": costs},
                                                     "greedy": greedy, "batch": batch}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(run())
