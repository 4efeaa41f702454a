"""transformers integration benchmark: the same loaded model, two ways to decode many paths.

SmolLM2-135M-Instruct loaded by transformers from the embedded GGUF (fp32, as
transformers dequantizes it), a GSM8K test question in the chat template:

1. transformers `generate(num_return_sequences=n, do_sample=True)` vs
   `forkdec.Engine.from_transformers(model, tokenizer).generate(prompt, n)` on that
   very model (same weights in place), temperature 0.7, every path forced to the
   full length; aggregate generated tokens/s and their ratio.
2. Prefill latency of one forward over a few-shot GSM8K prompt with the model's
   `sdpa` attention vs `forkdec.integrations.transformers.enable(model)`.
3. Quantized caches in transformers' own `generate`: the few-shot prompt, greedy,
   one sequence, with `DynamicCache`, transformers' `QuantizedCache` (the backends
   that run without extra packages) and `forkdec_cache(model, kind)`; KV bytes held
   after the call and generated tokens/s.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import time
from pathlib import Path
from typing import Any, Callable

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


def held_bytes(cache) -> int:
    """Bytes of every tensor a transformers cache holds (forkdec caches count their own)."""
    if hasattr(cache, "nbytes"):
        return cache.nbytes()
    total = 0
    for layer in cache.layers:
        for value in vars(layer).values():
            for t in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
    return total


def transformers_caches(model) -> tuple[dict[str, Callable[[], Any]], list[str]]:
    """Factories of transformers' own caches, and why the unavailable QuantizedCache backends are missing."""
    from transformers import DynamicCache, QuantizedCache

    makers: dict[str, Callable[[], Any]] = {"transformers DynamicCache": DynamicCache}
    missing = []
    for backend, kwargs in (("quanto", {"nbits": 4}), ("hqq", {"nbits": 4}), ("fp8", {})):
        try:
            QuantizedCache(backend, model.config, **kwargs)
        except Exception as e:  # ImportError / ValueError for a backend package that is not installed
            missing.append(f"{backend}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
            continue
        makers[f"transformers QuantizedCache({backend!r}{', nbits=4' if kwargs else ''})"] = (
            lambda b=backend, k=kwargs: QuantizedCache(b, model.config, **k))
    return makers, missing


def cache_rows(model, ids: list[int], max_new: int, kinds: list[str]) -> tuple[list[list[str]], list[str]]:
    """generate with each cache: bytes held after, tokens/s, and agreement with DynamicCache's greedy tokens."""
    from forkdec.integrations.transformers_cache import forkdec_cache

    makers, missing = transformers_caches(model)
    for kind in kinds:
        makers[f"forkdec_cache {kind}"] = lambda k=kind: forkdec_cache(model, k)
    x = torch.tensor([ids])
    rows, base, base_bytes = [], None, None
    for name, make in makers.items():
        cache = make()
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(x, attention_mask=torch.ones_like(x), past_key_values=cache, do_sample=False,
                                 max_new_tokens=max_new, min_new_tokens=max_new, pad_token_id=2)[0, len(ids):].tolist()
        dt = time.perf_counter() - t
        held = held_bytes(cache)
        if hasattr(cache, "close"):
            cache.close()
        base = out if base is None else base
        base_bytes = held if base_bytes is None else base_bytes
        same = next((i for i, (a, b) in enumerate(zip(out, base)) if a != b), len(out))
        tokens = len(ids) + len(out) - 1  # the last sampled token is never written to the cache
        rows.append([name, f"{held / 2**20:.2f}", f"{held / tokens:.0f}", f"{held / base_bytes:.3f}",
                     f"{len(out) / dt:.2f}", f"{dt:.1f}", str(same)])
        print(f"{name}: {held / 2**20:.2f} MiB, {len(out) / dt:.2f} tok/s, first {same} tokens as DynamicCache")
    return rows, missing


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="forkdec bench integrations", description=__doc__)
    parser.add_argument("--n", type=int, default=32, help="paths per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--prefill-tokens", type=int, default=512, help="length of the prefill-latency prompt")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the prefill timing")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for both decoders (default: torch's)")
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[1].parent / "shared/data/gsm8k/test.jsonl"))
    parser.add_argument("--out", help="results folder (default: bench/results in a checkout)")
    parser.add_argument("--sections", default="paths,prefill,caches",
                        help="comma list of paths, prefill, caches (a subset writes integrations-<sections>.md)")
    parser.add_argument("--kv", default="kivi-4,kivi-2,xquant-4,xquant-latent-4,xquant-latent-3",
                        help="forkdec cache kinds of the caches section")
    parser.add_argument("--cache-new-tokens", type=int, default=64, help="new tokens of the caches section")
    args = parser.parse_args(argv)
    sections = set(args.sections.split(","))
    kinds = [k for k in args.kv.split(",") if k]
    if not sections <= {"paths", "prefill", "caches"}:
        parser.error(f"--sections: unknown {sorted(sections - {'paths', 'prefill', 'caches'})}")
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
    parts = []
    if "paths" in sections:
        run_engine(engine, "warm up", 2, 4)  # first-call costs out of the timings
        ours = run_engine(engine, texts["short"], args.n, args.max_new_tokens)
        print(f"Engine.from_transformers n={args.n}: {ours['tok_s']:.1f} tok/s ({ours['seconds']:.1f} s)")
        peer = hf.run(ids, args.n, args.max_new_tokens)
        print(f"transformers generate n={args.n}: {peer['tok_s']:.1f} tok/s ({peer['seconds']:.1f} s)")
        parts += [
            f"Result: Engine.from_transformers is {ours['tok_s'] / peer['tok_s']:.1f}x transformers' own "
            f"generate at n={args.n} on the same loaded model.", "",
            markdown_table(["decoder", "n", "prompt tokens", "new tokens per path", "generated tok/s", "seconds"], [
                ["transformers generate(num_return_sequences, do_sample)", str(args.n), str(len(ids)),
                 str(args.max_new_tokens), f"{peer['tok_s']:.1f}", f"{peer['seconds']:.1f}"],
                ["forkdec.Engine.from_transformers", str(args.n), str(len(ids)), str(args.max_new_tokens),
                 f"{ours['tok_s']:.1f}", f"{ours['seconds']:.1f}"],
                ["ratio", "", "", "", f"{ours['tok_s'] / peer['tok_s']:.1f}x", ""]]), ""]
    long_ids = engine.encode(texts["long"], chat=False)
    if "prefill" in sections:
        pre = prefill_latency(hf.model, long_ids, args.rounds)
        print(f"prefill {len(long_ids)} tokens: sdpa {pre['sdpa'] * 1e3:.0f} ms, forkdec {pre['forkdec'] * 1e3:.0f} ms")
        parts += [
            markdown_table(["prefill of one prompt", "tokens", "median ms", "vs sdpa"], [
                ["model's sdpa attention", str(len(long_ids)), f"{pre['sdpa'] * 1e3:.0f}", "1.00x"],
                ["enable(model): forkdec attention", str(len(long_ids)), f"{pre['forkdec'] * 1e3:.0f}",
                 f"{pre['forkdec'] / pre['sdpa']:.2f}x"]]), ""]
    if "paths" in sections:
        parts += [
            "tok/s = generated tokens / wall time of the whole call (prefill included); both decode every path to "
            "the full length. transformers copies the prompt's KV cache into every returned sequence and runs "
            "the batch as [n, ...] tensors; the engine prefills the prompt once and reads it once per step for "
            "all paths (cascade attention). Both run the same fp32 weights (the engine's adapter calls the HF "
            "modules: three q/k/v GEMMs, not forkdec's fused one).", ""]
    if "caches" in sections:
        rows, missing = cache_rows(hf.model, long_ids, args.cache_new_tokens, kinds)
        parts += [
            f"Quantized caches in `model.generate(past_key_values=cache)`: the {len(long_ids)}-token few-shot "
            f"prompt, greedy, one sequence, {args.cache_new_tokens} new tokens (EOS ignored).", "",
            markdown_table(["cache", "KV MiB held after", "bytes/token", "vs DynamicCache", "generated tok/s",
                            "seconds", "tokens equal to DynamicCache's"], rows), "",
            "Bytes: every tensor the cache holds after the call (forkdec: codes, fp16 scales and zeros, the 16-bit "
            "residual window of 128 tokens, XQuant's int64 token positions). DynamicCache holds fp32 K/V (the "
            "model's dtype), so fp16 K/V would be half of it. forkdec's XQuant caches rematerialize K and V for "
            "the whole context in every layer at every step with the layer's own projections (X: two "
            "576x192 GEMMs per token; latents: two 192x192), which is what their tokens/s pays for; KIVI "
            "dequantizes its pages every step, as transformers' QuantizedCache does.",
            "QuantizedCache backends not available here: " + ("; ".join(missing) or "none") + ".", ""]
    facts = machine_facts({
        "model": "SmolLM2-135M-Instruct Q4_1 GGUF (embedded) loaded by transformers, fp32 as loaded",
        "transformers": _version("transformers"),
        "prompt": data_note + ", chat template; prefill prompt: few-shot GSM8K examples, no template",
        "sampling": "temperature 0.7, top-k/top-p off, seed 0, EOS ignored / min_new_tokens = max_new_tokens",
        "prefill timing": f"median of {args.rounds} interleaved rounds, one forward each",
        "sections": args.sections,
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "unset (libgomp spins)"),
        "note": "one run on a machine shared with other jobs (2 cores); treat as indicative",
    })
    # A partial run gets its own file, so it never overwrites the other sections' last results.
    name = "integrations" if len(sections) == 3 else "integrations-" + "-".join(sorted(sections))
    write_report(results_dir(args.out) / f"{name}.md", "Integrations: transformers", facts, "\n".join(parts))
    return 0


if __name__ == "__main__":
    raise SystemExit(run())
