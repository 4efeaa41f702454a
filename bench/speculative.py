"""Speculative decoding benchmark: tokens/s with n-gram tree drafts vs plain decoding.

SmolLM2-135M-Instruct (the embedded GGUF), the engine's default dtype, chat template.
- n = 1, greedy, 256 new tokens: a GSM8K test question and a code-like prompt,
  speculation off / on (adaptive). Target: on >= 1.5x off.
- n in {4, 16, 64}, temperature 0.7, the GSM8K question, every path forced to
  the full length (ignore_eos): off, adaptive, and always-verify (fixed budget,
  no adaptation), with the mean tokens per path per step. Target: adaptive
  never slower than off by more than 5%.
- Peers at n = 1, same GGUF, greedy, same prompt tokens and thread count: llama.cpp
  plain (`bench/llama_cpp_peer.py`, the C API's batched loop) and llama.cpp with
  prompt lookup decoding (llama-cpp-python's `Llama` with
  `llama_speculative.LlamaPromptLookupDecoding`, the binding's only speculative
  mode: it drafts from the prompt and output, no draft model). Reported as not
  available when llama-cpp-python is missing.
Each cell is run --rounds times (default 3), the cells interleaved, and the median
run reported: the machine is shared with other jobs, so read ratios with that in mind.
"""
from __future__ import annotations

import argparse
import json
import os
import time
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
    neighbour hurts all alike; per cell the run with the median tokens/s, and for cells other than
    "off" `vs_off`: the (min, median, max) over rounds of its tokens/s over the same round's "off"
    run (adjacent runs share the machine's state, so their ratio drifts less than either rate)."""
    runs: dict[str, list[dict]] = {name: [] for name in cells}
    for _ in range(rounds):
        for name, kw in cells.items():
            runs[name].append(run_engine(engine, prompt, n, max_new, temperature, **kw))
    out = {name: sorted(r, key=lambda x: x["tok_s"])[len(r) // 2] for name, r in runs.items()}
    for name in cells:
        if name != "off" and "off" in runs:
            ratios = sorted(a["tok_s"] / o["tok_s"] for a, o in zip(runs[name], runs["off"]))
            out[name] = {**out[name], "vs_off": (ratios[0], ratios[len(ratios) // 2], ratios[-1])}
    return out


def ratio_cell(cell: dict) -> str:
    """'1.87x (1.80-1.93)': the median per-round ratio to off, and its range over rounds."""
    lo, mid, hi = cell["vs_off"]
    return f"{mid:.2f}x" if lo == hi else f"{mid:.2f}x ({lo:.2f}-{hi:.2f})"


def run_engine(engine: Any, prompt: str, n: int, max_new: int, temperature: float, speculate: str,
               adaptive: bool = True, budget: int | None = None) -> dict:
    from forkdec.engine import SamplingParams

    extra = {} if budget is None else {"draft_budget": budget}
    params = SamplingParams(temperature=temperature, max_new_tokens=max_new, ignore_eos=True, seed=0,
                            speculate=speculate, draft_adaptive=adaptive, **extra)
    out = engine.generate(prompt, n, params)
    s = engine.last_stats
    return {"tok_s": s.generated_tokens / max(s.decode_seconds, 1e-9), "tokens": s.generated_tokens,
            "ids": out[0][0].token_ids,
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


def llama_cpp_peer(prompt_ids: list[int], max_new: int, threads: int) -> dict | str:
    """llama.cpp plain greedy decoding: {"tok_s", "tokens"}, or why it is missing."""
    from forkdec.bench import llama_cpp_peer as peer
    from forkdec.models import default_model_path

    try:
        r = peer.llama_cpp_generate(str(default_model_path()), prompt_ids, 1, max_new, 0.0, seed=0, threads=threads,
                                    ignore_eos=True)
    except ImportError as e:
        return f"not available ({e})"
    except Exception as e:  # the peer is optional: report, do not fail the benchmark
        return f"failed: {type(e).__name__}: {e}"
    return {"tok_s": r["generated_tokens"] / max(r["decode_seconds"], 1e-9), "tokens": r["tokens"][0]}


def llama_cpp_lookup(prompt_ids: list[int], max_new: int, threads: int, num_pred_tokens: int = 10) -> dict | str:
    """llama.cpp greedy decoding with prompt lookup drafts (llama-cpp-python's high-level
    `Llama.generate` with `LlamaPromptLookupDecoding`): {"tok_s", "tokens"}, or why it is missing.
    Decode time runs from the first generated token to the last, so it excludes the prompt;
    tok/s counts the max_new - 1 tokens after the first."""
    try:
        from llama_cpp import Llama
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
    except ImportError as e:
        return f"not available ({e})"
    from forkdec.models import default_model_path

    try:
        llm = Llama(str(default_model_path()), n_ctx=len(prompt_ids) + max_new + 64, n_threads=threads,
                    n_threads_batch=threads, n_batch=max(512, len(prompt_ids)), verbose=False,
                    draft_model=LlamaPromptLookupDecoding(num_pred_tokens=num_pred_tokens))
        tokens: list[int] = []
        start = 0.0
        for tok in llm.generate(prompt_ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
            if not tokens:
                start = time.perf_counter()
            tokens.append(tok)
            if len(tokens) == max_new:
                break
        seconds = time.perf_counter() - start
        llm.close()
    except Exception as e:  # the peer is optional: report, do not fail the benchmark
        return f"failed: {type(e).__name__}: {e}"
    return {"tok_s": (len(tokens) - 1) / max(seconds, 1e-9), "tokens": tokens}


def first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first token where a and b differ (None: identical)."""
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _peer_cell(peer: dict | str, off: float) -> str:
    return f"{peer['tok_s']:.1f} ({peer['tok_s'] / off:.2f}x)" if isinstance(peer, dict) else peer


def _median(runs: list[dict | str]) -> dict | str:
    ok = sorted((r for r in runs if isinstance(r, dict)), key=lambda r: r["tok_s"])
    return ok[len(ok) // 2] if ok else runs[0]


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="forkdec bench speculative", description=__doc__)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--n", default="4,16,32,64", help="path counts for the sampled rows")
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
    load = os.getloadavg()  # before this run adds its own threads
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    from forkdec.engine import Engine, SamplingParams

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

    threads = torch.get_num_threads()
    greedy_rows, greedy = [], {}
    for name, prompt in prompts.items():
        cells = run_cells(engine, {"off": dict(speculate="off"), "ngram": dict(speculate="ngram")}, prompt, 1,
                          args.max_new_tokens, 0.0, args.rounds)
        off, on = cells["off"], cells["ngram"]
        ids = engine.encode(prompt)
        peers: dict[str, list] = {"llama.cpp": [], "llama.cpp lookup": []}
        for _ in range(0 if args.no_peer else args.rounds):
            peers["llama.cpp"].append(llama_cpp_peer(ids, args.max_new_tokens, threads))
            peers["llama.cpp lookup"].append(llama_cpp_lookup(ids, args.max_new_tokens, threads))
        plain_peer = _median(peers["llama.cpp"]) if not args.no_peer else "skipped"
        lookup_peer = _median(peers["llama.cpp lookup"]) if not args.no_peer else "skipped"
        lookup_same = (first_difference(plain_peer["tokens"], lookup_peer["tokens"])
                       if isinstance(plain_peer, dict) and isinstance(lookup_peer, dict) else "n/a")
        diverge = first_difference(off["ids"], on["ids"])
        greedy[name] = {"off": off, "ngram": on, "ngram_first_difference": diverge,
                        "llama_cpp": plain_peer if isinstance(plain_peer, str) else plain_peer["tok_s"],
                        "llama_cpp_lookup": lookup_peer if isinstance(lookup_peer, str) else lookup_peer["tok_s"],
                        "llama_cpp_lookup_first_difference": lookup_same}
        greedy_rows.append([name, f"{off['tok_s']:.1f}", f"{on['tok_s']:.1f}", ratio_cell(on),
                            f"{on['per_step']:.2f}", f"{on['acceptance']:.2f}", f"{on['spec_steps']}/{on['steps']}",
                            "identical" if diverge is None else f"differs from token {diverge}",
                            _peer_cell(plain_peer, off["tok_s"]), _peer_cell(lookup_peer, off["tok_s"]),
                            "identical" if lookup_same is None else
                            lookup_same if isinstance(lookup_same, str) else f"differs from token {lookup_same}"])
        print(greedy_rows[-1])

    batch_rows, batch = [], {}
    for n in ns:
        cells = run_cells(engine, {"off": dict(speculate="off"), "adaptive": dict(speculate="ngram"),
                                   "fixed": dict(speculate="ngram", adaptive=False)}, question, n,
                          args.batch_max_new_tokens, 0.7, args.rounds)
        off, adaptive, fixed = cells["off"], cells["adaptive"], cells["fixed"]
        batch[n] = {"off": off, "adaptive": adaptive, "fixed": fixed}
        batch_rows.append([str(n), f"{off['tok_s']:.1f}", f"{adaptive['tok_s']:.1f}",
                           ratio_cell(adaptive), f"{adaptive['per_step']:.2f}",
                           f"{adaptive['spec_steps']}/{adaptive['steps']}", f"{fixed['tok_s']:.1f}",
                           ratio_cell(fixed), f"{fixed['per_step']:.2f}"])
        print(batch_rows[-1])

    t1 = markdown_table(["prompt", "off tok/s", "ngram tok/s", "speedup", "tokens/step", "draft acceptance",
                         "tree steps", "ngram output vs off", "llama.cpp tok/s (vs off)",
                         "llama.cpp + prompt lookup tok/s (vs off)", "lookup output vs llama.cpp plain"], greedy_rows)
    t2 = markdown_table(["n", "off tok/s", "adaptive tok/s", "adaptive/off", "tokens/path-step", "tree steps",
                         "always-verify tok/s", "always/off", "always tokens/path-step"], batch_rows)
    t0 = markdown_table(["tokens fed T", "forward ms", "vs T=1"], cost_rows)
    crossover = ", ".join(f"n={n}: {b * n / (a + b * n):.2f}" for n in [1, 4, 16, 64])
    body = (f"Targets: {TARGETS}.\n\nTokens/s are generated tokens over decode seconds (prefill excluded), "
            f"aggregate over paths. 'tokens/step' = tokens a path gains per decode step (1.0 = no gain). "
            f"Ratios to off are the median over rounds of each round's ratio (off and speculation run back "
            f"to back), with the lowest and highest round in brackets; tok/s columns are the median round.\n\n"
            f"## Step cost vs tokens fed (the model's forward, all rows' logits)\n\n{t0}\n\n"
            f"Fit: a = {a * 1e3:.1f} ms + b = {b * 1e3:.2f} ms per token. A draft node pays for its verification "
            f"when its acceptance probability exceeds about b*n / (a + b*n): {crossover}.\n\n"
            f"## n = 1, greedy, {args.max_new_tokens} new tokens\n\n{t1}\n\n"
            f"## GSM8K question, temperature 0.7, {args.batch_max_new_tokens} new tokens per path\n\n{t2}\n")
    defaults = SamplingParams()
    try:
        import llama_cpp
        peer_version = f"llama-cpp-python {llama_cpp.__version__}, same GGUF, greedy, {threads} thread(s), ignore EOS"
    except ImportError:
        peer_version = "llama-cpp-python not installed"
    facts = machine_facts({"model": "SmolLM2-135M-Instruct Q4_1 GGUF (embedded)",
                           "engine dtype": str(engine.kv_dtype), "data": data_note,
                           "settings": f"draft_budget {defaults.draft_budget}, draft_depth {defaults.draft_depth}, "
                                       f"n-gram order 4, seed 0, ignore_eos, {threads} torch thread(s)",
                           "llama.cpp": peer_version + "; prompt lookup: LlamaPromptLookupDecoding(max_ngram_size=2, "
                                                       "num_pred_tokens=10)",
                           "note": f"median of {args.rounds} interleaved run(s) per cell on a shared 2-core machine; "
                                   f"load average at the start {load[0]:.1f} (1 min)"})
    out = results_dir(args.out) / "speculative.md"
    write_report(out, "Speculative decoding (n-gram tree drafts) in the engine", facts, body)
    for cells in (*greedy.values(), *batch.values()):  # token ids stay out of the JSON
        for cell in cells.values():
            if isinstance(cell, dict):
                cell.pop("ids", None)
    (out.with_suffix(".json")).write_text(json.dumps({"step_cost": {"a": a, "b": b, "by_tokens": costs},
                                                     "greedy": greedy, "batch": batch}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(run())
