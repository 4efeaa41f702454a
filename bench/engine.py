"""Engine benchmark: aggregate generated tokens/s vs the number of paths n.

SmolLM2-135M-Instruct (the embedded GGUF), a GSM8K test question in the chat
template, temperature 0.7, every path forced to the full length (ignore_eos;
peers: min_new_tokens) so tokens/s compare like with like. Two prompts: the
question alone, and the question after few-shot worked GSM8K examples (~2000
tokens, shared by all paths). Peers: Hugging Face transformers
`generate(num_return_sequences=n, do_sample=True)` on the same GGUF in fp32, and
llama.cpp through llama-cpp-python decoding the same n paths in one batch after
sharing the prompt by sequence copy (bench/llama_cpp_peer.py; skipped with the
reason when llama-cpp-python is not installed).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from forkdec.bench.common import machine_facts, markdown_table, results_dir, write_report
from forkdec.bench.llama_cpp_peer import SKIP_REASON, llama_cpp_generate

TARGET = "n=32 at least 10x transformers and at least 1.5x llama.cpp (aggregate generated tokens/s)"
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


def run_engine(engine: Any, prompt: str, n: int, max_new: int) -> dict:
    from forkdec.engine import SamplingParams

    params = SamplingParams(temperature=0.7, max_new_tokens=max_new, ignore_eos=True, seed=0)
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


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="forkdec bench engine", description=__doc__)
    parser.add_argument("--n", default="1,8,32,128", help="comma-separated path counts")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--long-tokens", type=int, default=2000, help="target length of the few-shot prompt")
    parser.add_argument("--long-n", default=None, help="path counts for the long prompt (default: --n)")
    parser.add_argument("--peer-n", default="1,8,32", help="path counts for transformers (it is slow)")
    parser.add_argument("--peer-max-new-tokens", type=int, default=None, help="default: --max-new-tokens")
    parser.add_argument("--peer-long", action="store_true", help="also run transformers on the long prompt")
    parser.add_argument("--llama-n", default=None, help="path counts for llama.cpp (default: --peer-n)")
    parser.add_argument("--llama-threads", type=int, default=2, help="llama.cpp decode threads")
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="engine dtype (default: loader's)")
    parser.add_argument("--quick", action="store_true",
                        help="n 1,8,32; 64 new tokens; long prompt at n 8,32; peers on the short prompt only")
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[1].parent / "shared/data/gsm8k/test.jsonl"))
    parser.add_argument("--out", help="results folder (default: bench/results in a checkout)")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.max_new_tokens, args.long_n = "1,8,32", 64, args.long_n or "8,32"
    ns = [int(v) for v in args.n.split(",")]
    long_ns = [int(v) for v in (args.long_n or args.n).split(",")]
    peer_ns = [int(v) for v in args.peer_n.split(",")]
    peer_new = args.peer_max_new_tokens or args.max_new_tokens

    import forkdec
    from forkdec.engine import Engine, SamplingParams
    from forkdec.models import default_model_path

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, None: None}[args.dtype]
    engine = Engine(dtype=dtype)
    data_note = "GSM8K test question 1"
    data = gsm8k(args.data)
    if data is None:
        data_note = f"{args.data} missing: a fixed built-in GSM8K-style question"
        print(data_note)
    texts = prompts(data, engine.tokenizer, args.long_tokens)
    engine.generate("warm up", 2, SamplingParams(max_new_tokens=4))  # first-call costs out of the timings

    results: dict[str, dict[int, dict]] = {"short": {}, "long": {}}
    for kind, counts in (("short", ns), ("long", long_ns)):
        for n in counts:
            r = run_engine(engine, texts[kind], n, args.max_new_tokens)
            results[kind][n] = r
            print(f"forkdec {kind} n={n}: {r['tok_s']:.1f} tok/s ({r['tokens']} tokens, {r['seconds']:.1f} s, "
                  f"prompt {r['prompt_tokens']} tokens)")

    peers: dict[str, dict[int, dict]] = {"short": {}, "long": {}}
    skipped: list[str] = []
    if args.no_peers:
        skipped.append("transformers: --no-peers")
    elif importlib.util.find_spec("transformers") is None:
        skipped.append("transformers: not installed (pip install transformers accelerate)")
    else:
        hf = Transformers(default_model_path())
        for kind in ("short", "long") if args.peer_long else ("short",):
            ids = engine.encode(texts[kind])
            for n in peer_ns:
                r = hf.run(ids, n, peer_new)
                peers[kind][n] = r
                print(f"transformers {kind} n={n}: {r['tok_s']:.1f} tok/s ({r['tokens']} tokens, {r['seconds']:.1f} s)")
        if not args.peer_long:
            skipped.append("transformers on the long prompt: not run (--peer-long; it prefills the prompt once per path)")
    llama: dict[str, dict[int, dict]] = {"short": {}, "long": {}}
    llama_version = "not run"
    if args.no_peers:
        skipped.append("llama.cpp: --no-peers")
    elif importlib.util.find_spec("llama_cpp") is None:
        skipped.append(f"llama.cpp: {SKIP_REASON}")
    else:
        # First-call costs (thread pool, compute graph) out of the timings, as for forkdec.
        llama_cpp_generate(default_model_path(), engine.encode("warm up"), 2, 4, 0.7, threads=args.llama_threads)
        for kind in ("short", "long"):
            ids = engine.encode(texts[kind])
            for n in [int(v) for v in (args.llama_n or args.peer_n).split(",")]:
                r = llama_cpp_generate(default_model_path(), ids, n, peer_new, 0.7, seed=0,
                                       threads=args.llama_threads, ignore_eos=True)
                seconds = r["prompt_seconds"] + r["decode_seconds"]
                llama[kind][n] = {"tok_s": r["generated_tokens"] / seconds, "tokens": r["generated_tokens"],
                                  "seconds": seconds}
                llama_version = f"{r['version']}; {r['settings']}"
                print(f"llama.cpp {kind} n={n}: {llama[kind][n]['tok_s']:.1f} tok/s ({r['generated_tokens']} "
                      f"tokens, {seconds:.1f} s, prompt {r['prompt_seconds']:.2f} s)")

    out = results_dir(args.out)
    rows = []
    for kind in ("short", "long"):
        for n, r in results[kind].items():
            peer, lc = peers[kind].get(n), llama[kind].get(n)
            rows.append([kind, str(r["prompt_tokens"]), str(n), f"{r['tok_s']:.1f}", f"{r['decode_tok_s']:.1f}",
                         f"{r['prefill_s']:.2f}", f"{peer['tok_s']:.1f}" if peer else "-",
                         f"{r['tok_s'] / peer['tok_s']:.1f}x" if peer else "-",
                         f"{lc['tok_s']:.1f}" if lc else "-", f"{r['tok_s'] / lc['tok_s']:.2f}x" if lc else "-",
                         f"{r['kv_prompt'] / 2**20:.1f}", f"{r['kv_peak'] / 2**20:.1f}",
                         f"{r['kv_copied'] / 2**20:.1f}"])
    header = ["prompt", "prompt tokens", "n", "forkdec tok/s", "forkdec decode-only tok/s", "prefill s",
              "transformers tok/s", "vs transformers", "llama.cpp tok/s", "vs llama.cpp", "KV prompt MiB (once)",
              "KV peak MiB", "KV if prompt copied per path MiB"]
    verdict = "; ".join(_verdict(results["short"].get(32), peer_runs["short"].get(32), name, factor)
                        for name, peer_runs, factor in (("transformers", peers, 10.0), ("llama.cpp", llama, 1.5)))
    body = "\n".join([
        f"Target: {TARGET}. Result: {verdict}.", "",
        markdown_table(header, rows), "",
        "tok/s = generated tokens / wall time of generate() (prefill included); every path decodes the full length.",
        "KV prompt: the prompt's pages, held once whatever n is; KV peak: all pages held at the busiest step;",
        "the last column is what the same step would hold if each path had its own copy of the prompt.", "",
        "Skipped: " + ("; ".join(skipped) if skipped else "nothing"),
    ])
    facts = machine_facts({
        "model": "SmolLM2-135M-Instruct Q4_1 GGUF (embedded), dequantized",
        "forkdec engine dtype": str(engine.model.dtype).replace("torch.", ""),
        "transformers": _version("transformers") + " fp32",
        "llama.cpp": llama_version + " (same GGUF file, Q4_1/Q8_0 weights as stored)",
        "prompt": data_note + ", chat template",
        "sampling": "temperature 0.7, top-k/top-p off, seed 0, EOS ignored / min_new_tokens = max_new_tokens",
        "new tokens per path": f"forkdec {args.max_new_tokens}, peers {peer_new}",
        "sampler": "forkdec.ops.sample" if hasattr(forkdec.ops, "sample") else "engine fallback sampler",
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "unset (libgomp spins)"),
        "load average (1, 5, 15 min) at the end": ", ".join(f"{x:.1f}" for x in os.getloadavg()),
        "note": "one run on a machine shared with other jobs (2 cores); treat as indicative",
    })
    write_report(out / "engine.md", "Engine: tokens/s vs paths", facts, body)
    plot(out / "engine.png", {
        "forkdec, short prompt": sorted((n, r["tok_s"]) for n, r in results["short"].items()),
        "forkdec, ~2k-token prompt": sorted((n, r["tok_s"]) for n, r in results["long"].items()),
        "transformers, short prompt": sorted((n, r["tok_s"]) for n, r in peers["short"].items()),
        "transformers, ~2k-token prompt": sorted((n, r["tok_s"]) for n, r in peers["long"].items()),
        "llama.cpp, short prompt": sorted((n, r["tok_s"]) for n, r in llama["short"].items()),
        "llama.cpp, ~2k-token prompt": sorted((n, r["tok_s"]) for n, r in llama["long"].items()),
    })
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
