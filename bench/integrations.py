"""transformers integration benchmark: the same loaded model, two ways to decode many paths.

SmolLM2-135M-Instruct loaded by transformers from the embedded GGUF (fp32, as
transformers dequantizes it), a GSM8K test question in the chat template:

1. transformers `generate(num_return_sequences=n, do_sample=True)` vs
   `forkdec.Engine.from_transformers(model, tokenizer).generate(prompt, n)` on that
   very model (same weights in place), temperature 0.7, every path forced to the
   full length; aggregate generated tokens/s and their ratio.
2. Prefill latency of one forward over a few-shot GSM8K prompt with the model's
   `sdpa` attention vs `forkdec.integrations.transformers.enable(model)`.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
from pathlib import Path

import torch

from forkdec.bench.common import machine_facts, markdown_table, results_dir, time_interleaved, write_report
from forkdec.bench.engine import Transformers, _version, gsm8k, prompts, run_engine


def prefill_latency(model, ids: list[int], rounds: int) -> dict[str, float]:
    """Median seconds of one forward over `ids` with sdpa and with forkdec attention."""
    from forkdec.integrations.transformers import enable

    x = torch.tensor([ids])
    enable(model)

    def forward(impl: str):
        def call():
            model.set_attn_implementation(impl)
            with torch.inference_mode():
                model(x)
        return call

    times = time_interleaved({"sdpa": forward("sdpa"), "forkdec": forward("forkdec")}, rounds=rounds, min_seconds=0)
    model.set_attn_implementation("sdpa")
    return times


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="forkdec bench integrations", description=__doc__)
    parser.add_argument("--n", type=int, default=32, help="paths per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--prefill-tokens", type=int, default=512, help="length of the prefill-latency prompt")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the prefill timing")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for both decoders (default: torch's)")
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[1].parent / "shared/data/gsm8k/test.jsonl"))
    parser.add_argument("--out", help="results folder (default: bench/results in a checkout)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if importlib.util.find_spec("transformers") is None:
        print("transformers is not installed (pip install transformers accelerate): nothing to compare")
        return 1

    from transformers import AutoTokenizer

    import forkdec
    from forkdec.models import default_model_path

    path = default_model_path()
    hf = Transformers(path)  # fp32, as transformers loads the GGUF
    tok = AutoTokenizer.from_pretrained(str(Path(path).parent), gguf_file=Path(path).name)
    engine = forkdec.Engine.from_transformers(hf.model, tok)
    data = gsm8k(args.data)
    data_note = "GSM8K test question 1" if data else f"{args.data} missing: a built-in GSM8K-style question"
    texts = prompts(data, engine.tokenizer, args.prefill_tokens)
    ids = engine.encode(texts["short"])
    run_engine(engine, "warm up", 2, 4)  # first-call costs out of the timings

    ours = run_engine(engine, texts["short"], args.n, args.max_new_tokens)
    print(f"Engine.from_transformers n={args.n}: {ours['tok_s']:.1f} tok/s ({ours['seconds']:.1f} s)")
    peer = hf.run(ids, args.n, args.max_new_tokens)
    print(f"transformers generate n={args.n}: {peer['tok_s']:.1f} tok/s ({peer['seconds']:.1f} s)")
    long_ids = engine.encode(texts["long"], chat=False)
    pre = prefill_latency(hf.model, long_ids, args.rounds)
    print(f"prefill {len(long_ids)} tokens: sdpa {pre['sdpa'] * 1e3:.0f} ms, forkdec {pre['forkdec'] * 1e3:.0f} ms")

    body = "\n".join([
        f"Result: Engine.from_transformers is {ours['tok_s'] / peer['tok_s']:.1f}x transformers' own "
        f"generate at n={args.n} on the same loaded model.", "",
        markdown_table(["decoder", "n", "prompt tokens", "new tokens per path", "generated tok/s", "seconds"], [
            ["transformers generate(num_return_sequences, do_sample)", str(args.n), str(len(ids)),
             str(args.max_new_tokens), f"{peer['tok_s']:.1f}", f"{peer['seconds']:.1f}"],
            ["forkdec.Engine.from_transformers", str(args.n), str(len(ids)), str(args.max_new_tokens),
             f"{ours['tok_s']:.1f}", f"{ours['seconds']:.1f}"],
            ["ratio", "", "", "", f"{ours['tok_s'] / peer['tok_s']:.1f}x", ""]]), "",
        markdown_table(["prefill of one prompt", "tokens", "median ms", "vs sdpa"], [
            ["model's sdpa attention", str(len(long_ids)), f"{pre['sdpa'] * 1e3:.0f}", "1.00x"],
            ["enable(model): forkdec attention", str(len(long_ids)), f"{pre['forkdec'] * 1e3:.0f}",
             f"{pre['forkdec'] / pre['sdpa']:.2f}x"]]), "",
        "tok/s = generated tokens / wall time of the whole call (prefill included); both decode every path to "
        "the full length. transformers copies the prompt's KV cache into every returned sequence and runs "
        "the batch as [n, ...] tensors; the engine prefills the prompt once and reads it once per step for "
        "all paths (cascade attention). Both run the same fp32 weights (the engine's adapter calls the HF "
        "modules: three q/k/v GEMMs, not forkdec's fused one).",
    ])
    facts = machine_facts({
        "model": "SmolLM2-135M-Instruct Q4_1 GGUF (embedded) loaded by transformers, fp32 as loaded",
        "transformers": _version("transformers"),
        "prompt": data_note + ", chat template; prefill prompt: few-shot GSM8K examples, no template",
        "sampling": "temperature 0.7, top-k/top-p off, seed 0, EOS ignored / min_new_tokens = max_new_tokens",
        "prefill timing": f"median of {args.rounds} interleaved rounds, one forward each",
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "unset (libgomp spins)"),
        "note": "one run on a machine shared with other jobs (2 cores); treat as indicative",
    })
    write_report(results_dir(args.out) / "integrations.md", "Integrations: transformers", facts, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(run())
