"""Engine benchmark: aggregate generated tokens/s vs the number of paths n.

SmolLM2-135M-Instruct (the embedded GGUF), a GSM8K test question in the chat
template, temperature 0.7, every path forced to the full length (ignore_eos;
peers: min_new_tokens) so tokens/s compare like with like. Two prompts: the
question alone, and the question after few-shot worked GSM8K examples (~2000
tokens, shared by all paths). forkdec runs once per weight form (--weights:
the GGUF blocks as stored, and/or dequantized bf16), plus n=1 with n-gram
speculation. Peers: Hugging Face transformers `generate(num_return_sequences=n,
do_sample=True)` on the same GGUF in fp32, and llama.cpp through
llama-cpp-python decoding the same n paths in one batch after sharing the
prompt by sequence copy (bench/llama_cpp_peer.py). llama.cpp runs in its own
process (--llama-python: an interpreter with llama-cpp-python, by default
/work/llamavenv's when present, else this one), with this environment minus
OMP_WAIT_POLICY, so that its OpenMP barriers spin as by default; skipped with
the reason when llama-cpp-python is not installed there. Every configuration
runs --repeats times; tables give the median and the range.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from forkdec.bench.common import machine_facts, markdown_table, results_dir, write_report
from forkdec.bench.llama_cpp_peer import SKIP_REASON
from forkdec.bench.llama_cpp_process import DEFAULT_LLAMA_PYTHON, llama_available, llama_python, run_llama_jobs
from forkdec.models.llama import QLINEAR_MAX_ROWS

TARGET = ("vs llama.cpp (aggregate generated tokens/s, issue 18): n=1 >= 1.0x (moonshot 1.5x), n=8 >= 2x, n=32 >= 3x, "
          "n=128 >= 10x; --speculate ngram at n=1 >= 1.5x llama.cpp's plain decoding")
TARGETS = {1: 1.0, 8: 2.0, 32: 3.0, 128: 10.0}


def run_llama_process(python: str, path: str, runs: list[dict], max_new: int, threads: int,
                      warm_ids: list[int]) -> list[dict]:
    """llama.cpp's runs (after one untimed warm-up) in its own process (bench/llama_cpp_process.py)."""
    jobs = [dict(gguf_path=path, prompt_ids=warm_ids, n=2, max_new_tokens=4, temperature=0.7, threads=threads)]
    jobs += [dict(gguf_path=path, prompt_ids=r["ids"], n=r["n"], max_new_tokens=max_new, temperature=0.7, seed=0,
                  threads=threads, ignore_eos=True) for r in runs]
    results = run_llama_jobs(python, "llama_cpp_peer", "llama_cpp_generate", jobs)[1:]
    for run, r in zip(runs, results):
        r.pop("tokens", None)
        r.update(kind=run["kind"], n=run["n"])
        tok_s = r["generated_tokens"] / (r["prompt_seconds"] + r["decode_seconds"])
        print(f"llama.cpp {run['kind']} n={run['n']}: {tok_s:.1f} tok/s", file=sys.stderr, flush=True)
    return results


FALLBACK_QUESTION = ("Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes "
                     "muffins for her friends every day with four. She sells the remainder at the farmers' market "
                     "daily for $2 per fresh duck egg. How much in dollars does she make every day at the "
                     "farmers' market?")


def gsm8k(path: str) -> list[dict] | None:
    p = Path(path)
    if not p.is_file():
        return None
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def prompts(data: list[dict] | None, tokenizer: Any, long_tokens: int) -> dict[str, str]:
    """The short prompt (one question) and the long one (few-shot examples, then the same question)."""
    question = data[0]["question"] if data else FALLBACK_QUESTION
    short = question
    shots, i = [], 1
    pool = data[1:] if data else []
    while pool and i < len(pool):
        ex = pool[i - 1]
        shots.append(f"Question: {ex['question']}\nAnswer: {ex['answer']}\n")
        i += 1
        text = "Solve the last question like the worked examples.\n\n" + "\n".join(shots) + f"\nQuestion: {question}\nAnswer:"
        if len(tokenizer.encode(text)) >= long_tokens:
            break
    long = ("Solve the last question like the worked examples.\n\n" + "\n".join(shots)
            + f"\nQuestion: {question}\nAnswer:") if shots else question * max(1, long_tokens // 80)
    return {"short": short, "long": long}


def run_engine(engine: Any, prompt: str, n: int, max_new: int, speculate: str = "off") -> dict:
    from forkdec.engine import SamplingParams

    params = SamplingParams(temperature=0.7, max_new_tokens=max_new, ignore_eos=True, seed=0, speculate=speculate)
    engine.generate(prompt, n, params)
    s = engine.last_stats
    return {"tok_s": s.tokens_per_second, "tokens": s.generated_tokens, "seconds": s.seconds,
            "prefill_s": s.prefill_seconds, "decode_tok_s": s.generated_tokens / max(s.decode_seconds, 1e-9),
            "prompt_tokens": s.prompt_tokens[0], "kv_prompt": s.kv_bytes_prompts, "kv_peak": s.kv_bytes_peak,
            "kv_copied": s.kv_bytes_if_copied}


class Transformers:
    """HF transformers on the same GGUF, fp32 (what it dequantizes GGUF to)."""

    def __init__(self, gguf_path: str) -> None:
        from transformers import AutoModelForCausalLM

        folder, name = os.path.split(gguf_path)
        self.model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        self.model.eval()

    def run(self, ids: list[int], n: int, max_new: int) -> dict:
        x = torch.tensor([ids])
        torch.manual_seed(0)
        t = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(x, attention_mask=torch.ones_like(x), do_sample=True, temperature=0.7,
                                      top_k=0, top_p=1.0, max_new_tokens=max_new, min_new_tokens=max_new,
                                      num_return_sequences=n, pad_token_id=2)
        dt = time.perf_counter() - t
        tokens = (out.shape[1] - len(ids)) * n
        return {"tok_s": tokens / dt, "tokens": tokens, "seconds": dt}


def plot(path: Path, series: dict[str, list[tuple[int, float]]]) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, pts in series.items():
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("paths n")
    ax.set_ylabel("generated tokens/s (aggregate)")
    ax.set_title("SmolLM2-135M on this CPU: tokens/s vs paths")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def _cell(r: dict | None) -> str:
    if not r:
        return "-"
    return f"{r['median']:.1f} ({r['min']:.1f}-{r['max']:.1f})"


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="forkdec bench engine", description=__doc__)
    parser.add_argument("--n", default="1,8,32,128", help="comma-separated path counts")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--long-tokens", type=int, default=2000, help="target length of the few-shot prompt")
    parser.add_argument("--long-n", default=None, help="path counts for the long prompt (default: --n; '' for none)")
    parser.add_argument("--weights", default="gguf+bf16,bf16", help="forkdec weight forms to run (load_model weights=)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per configuration (median and range reported)")
    parser.add_argument("--no-speculate", action="store_true", help="skip the n=1 --speculate ngram row")
    parser.add_argument("--peer-n", default="", help="path counts for transformers (slow; default: not run)")
    parser.add_argument("--peer-max-new-tokens", type=int, default=None, help="default: --max-new-tokens")
    parser.add_argument("--llama-n", default=None, help="path counts for llama.cpp (default: --n)")
    parser.add_argument("--llama-threads", type=int, default=2, help="llama.cpp decode threads")
    parser.add_argument("--llama-python", default=None,
                        help=f"interpreter with llama-cpp-python (default: {DEFAULT_LLAMA_PYTHON} if present)")
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--quick", action="store_true", help="n 1,8,32; 64 new tokens; one repeat; no long prompt")
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[1].parent / "shared/data/gsm8k/test.jsonl"))
    parser.add_argument("--out", help="results folder (default: bench/results in a checkout)")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.max_new_tokens, args.long_n, args.repeats = "1,8,32", 64, "", 1
    ints = lambda text: [int(v) for v in text.split(",") if v.strip()]  # noqa: E731
    ns = ints(args.n)
    long_ns = ints(args.n if args.long_n is None else args.long_n)
    peer_ns = ints(args.peer_n)
    peer_new = args.peer_max_new_tokens or args.max_new_tokens
    forms = [w.strip() for w in args.weights.split(",") if w.strip()]

    import forkdec
    from forkdec.engine import Engine, SamplingParams
    from forkdec.models import default_model_path, load_model

    data_note = "GSM8K test question 1"
    data = gsm8k(args.data)
    if data is None:
        data_note = f"{args.data} missing: a fixed built-in GSM8K-style question"
        print(f"forkdec bench engine: {data_note} (--data PATH names the GSM8K test file)", file=sys.stderr)
    results: dict[str, dict[tuple[str, int], dict]] = {}  # form -> (prompt kind, n) -> spread of tok/s
    extra: dict[str, dict] = {}
    engine = None
    for form in forms:
        model, tokenizer = load_model(weights=form)
        engine = Engine(model, tokenizer=tokenizer)
        texts = prompts(data, engine.tokenizer, args.long_tokens)
        engine.generate("warm up", 2, SamplingParams(max_new_tokens=4))  # first-call costs out of the timings
        results[form] = {}
        for kind, counts in (("short", ns), ("long", long_ns)):
            for n in counts:
                runs = [run_engine(engine, texts[kind], n, args.max_new_tokens) for _ in range(args.repeats)]
                results[form][(kind, n)] = _spread([r["tok_s"] for r in runs])
                extra[f"{form}/{kind}/{n}"] = runs[-1]
                print(f"forkdec[{form}] {kind} n={n}: {_cell(results[form][(kind, n)])} tok/s "
                      f"(prompt {runs[-1]['prompt_tokens']} tokens)", flush=True)
        if not args.no_speculate and form == forms[0]:
            runs = [run_engine(engine, texts["short"], 1, args.max_new_tokens, speculate="ngram")
                    for _ in range(args.repeats)]
            results[form][("short-ngram", 1)] = _spread([r["tok_s"] for r in runs])
            print(f"forkdec[{form}] short n=1 --speculate ngram: {_cell(results[form][('short-ngram', 1)])} tok/s")
        del engine.model, model
    assert engine is not None, "--weights names no form"

    skipped: list[str] = []
    peers: dict[tuple[str, int], dict] = {}
    if args.no_peers or not peer_ns:
        skipped.append("transformers: not run (--peer-n; see bench/results/engine.md history for its numbers)")
    elif importlib.util.find_spec("transformers") is None:
        skipped.append("transformers: not installed (pip install transformers accelerate)")
    else:
        hf = Transformers(default_model_path())
        ids = engine.encode(texts["short"])
        for n in peer_ns:
            peers[("short", n)] = _spread([hf.run(ids, n, peer_new)["tok_s"] for _ in range(args.repeats)])
            print(f"transformers short n={n}: {_cell(peers[('short', n)])} tok/s")
    llama: dict[tuple[str, int], dict] = {}
    llama_version = "not run"
    python = llama_python(args.llama_python)
    if args.no_peers:
        skipped.append("llama.cpp: --no-peers")
    elif llama_available(python) is not None:
        skipped.append(f"llama.cpp: {llama_available(python)}: {SKIP_REASON}")
    else:
        llama_ns = ints(args.llama_n) if args.llama_n else ns
        runs = [{"kind": kind, "n": n, "ids": engine.encode(texts[kind])}
                for kind, counts in (("short", llama_ns), ("long", [n for n in llama_ns if n in long_ns]))
                for n in counts for _ in range(args.repeats)]
        by: dict[tuple[str, int], list[float]] = {}
        for r in run_llama_process(python, default_model_path(), runs, peer_new, args.llama_threads,
                                   engine.encode("warm up")):
            by.setdefault((r["kind"], r["n"]), []).append(r["generated_tokens"] / (r["prompt_seconds"] + r["decode_seconds"]))
            llama_version = f"{r['version']}; {r['settings']}"
        llama = {key: _spread(v) for key, v in by.items()}

    out = results_dir(args.out)
    header = ["prompt", "n"] + [f"forkdec {f} tok/s" for f in forms] + ["llama.cpp tok/s"] + \
        [f"{f} / llama.cpp" for f in forms] + ["target"]
    rows = []
    for key in sorted({k for f in forms for k in results[f]}, key=lambda k: (k[0], k[1])):
        kind, n = key
        lc = llama.get(("short", 1) if kind == "short-ngram" else key)
        ratios = [f"{results[f][key]['median'] / lc['median']:.2f}x" if lc and key in results[f] else "-" for f in forms]
        target = "1.5x (ngram)" if kind == "short-ngram" else (f"{TARGETS[n]:g}x" if kind == "short" and n in TARGETS else "lead")
        rows.append([kind, str(n)] + [_cell(results[f].get(key)) for f in forms] + [_cell(lc)] + ratios + [target])
    if peers:
        rows += [["short (transformers)", str(n), _cell(r)] + ["-"] * (len(header) - 3) for (k, n), r in peers.items()]
    prompt_tokens = {kind: extra[f"{forms[0]}/{kind}/{n}"]["prompt_tokens"]
                     for kind, counts in (("short", ns), ("long", long_ns)) for n in counts[:1]}
    body = "\n".join([
        f"Targets: {TARGET}.", "",
        markdown_table(header, rows), "",
        f"tok/s = generated tokens / wall time of generate() (prefill included), median of {args.repeats} runs "
        "(range in parentheses); every path decodes the full length. Ratios are of medians. "
        f"Prompt tokens: {prompt_tokens}. short-ngram: n=1 with `--speculate ngram`, compared with llama.cpp's "
        "plain n=1.", "",
        "Skipped: " + ("; ".join(skipped) if skipped else "nothing"),
    ])
    facts = machine_facts({
        "model": "SmolLM2-135M-Instruct GGUF (embedded): Q4_1 matrices, Q8_0 token_embd / tied LM head",
        "forkdec weight forms": ", ".join(forms) + " (load_model weights=; gguf+bf16: stored blocks for products "
                                f"of <= model.qlinear_max_rows ({QLINEAR_MAX_ROWS}) rows, "
                                "bf16 copies above; decode steps loop over the layers in C++, forkdec.ops.llama_layers)",
        "llama.cpp": llama_version + f" (same GGUF file, weights as stored; own process: {python}, "
                     f"{args.llama_threads} threads, OMP_WAIT_POLICY removed from its environment)",
        "transformers": _version("transformers") + " fp32" if peers else "not run",
        "prompt": data_note + ", chat template",
        "sampling": "temperature 0.7, top-k/top-p off, seed 0, EOS ignored / min_new_tokens = max_new_tokens",
        "new tokens per path": f"forkdec {args.max_new_tokens}, peers {peer_new}",
        "forkdec OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "unset (libgomp spins)"),
        "torch threads": str(torch.get_num_threads()),
        "load average (1, 5, 15 min) at the end": ", ".join(f"{x:.1f}" for x in os.getloadavg()),
        "note": ("the machine was loaded by other jobs (load average above its cores): numbers are indicative"
                 if os.getloadavg()[1] > (os.cpu_count() or 1) else "nothing else ran on the machine"),
    })
    write_report(out / "engine.md", "Engine: tokens/s vs paths", facts, body)
    series = {f"forkdec {f}, short prompt": sorted((n, r["median"]) for (k, n), r in results[f].items() if k == "short")
              for f in forms}
    series.update({f"forkdec {f}, long prompt": sorted((n, r["median"]) for (k, n), r in results[f].items()
                                                       if k == "long") for f in forms})
    series["llama.cpp, short prompt"] = sorted((n, r["median"]) for (k, n), r in llama.items() if k == "short")
    series["llama.cpp, long prompt"] = sorted((n, r["median"]) for (k, n), r in llama.items() if k == "long")
    plot(out / "engine.png", series)
    (out / "engine.json").write_text(json.dumps({f: {f"{k}/{n}": r for (k, n), r in res.items()}
                                                 for f, res in results.items()}
                                                | {"llama.cpp": {f"{k}/{n}": r for (k, n), r in llama.items()}},
                                                indent=1))
    return 0


def _verdict(ours: dict | None, peer: dict | None, name: str, factor: float) -> str:
    if not ours or not peer:
        return f"n=32 not measured against {name}"
    ratio = ours["tok_s"] / peer["tok_s"]
    return (f"n=32 vs {name}: {ours['tok_s']:.1f} vs {peer['tok_s']:.1f} tok/s = {ratio:.2f}x "
            f"(target {factor:g}x: {'met' if ratio >= factor else 'NOT met'})")


def _version(pkg: str) -> str:
    try:
        from importlib.metadata import version
        return version(pkg)
    except Exception:
        return "not installed"


if __name__ == "__main__":
    raise SystemExit(run())
