"""`forkdec generate "PROMPT" -n 16 ...`: decode many paths, vote, print stats.

User errors (bad option, empty prompt, n < 1, unreadable or unsupported model
file, too many new tokens for the context) raise ValueError naming the
argument; `forkdec.cli.main` prints it as one line and exits with code 2.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import torch

from forkdec.engine.completion import Completion, GenerateStats
from forkdec.engine.params import SamplingParams
from forkdec.engine.progress import ProgressBar
from forkdec.engine.deepconf_cli import add_deepconf_options, run_deepconf
from forkdec.engine.search_cli import add_search_options, check_search, run_search
from forkdec.json_output import human_output, write_json
from forkdec.validation import require

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are ValueErrors, so the CLI prints one line and exits 2."""

    def error(self, message: str) -> None:  # one line, exit 2, instead of usage + message
        raise ValueError(message)


def parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="forkdec generate", description="Decode N reasoning paths of one prompt and vote.")
    p.add_argument("prompt", help="the user message (wrapped in the chat template unless --raw)")
    p.add_argument("-n", type=int, default=16, help="paths to decode (default 16)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--vote", choices=["majority", "first-finish", "best-logprob", "deepconf-low", "deepconf-high"],
                   default="majority", help="deepconf-*: DeepConf online, paths stopped once their confidence drops")
    p.add_argument("--first-k", type=int, default=None,
                   help="first-finish: stop after this many paths finish (default max(1, n // 4))")
    p.add_argument("--json", metavar="PATH", help="also write the result as JSON")
    p.add_argument("--model", metavar="PATH", help="GGUF file (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="compute dtype (default: the loader's)")
    p.add_argument("--weights", default=None, metavar="KIND", help="gguf, gguf+bf16, bf16 or fp32: compute with the "
                   "GGUF blocks as stored, or dequantized (default: forkdec.models.default_weights)")
    p.add_argument("--max-kv-bytes", type=int, default=None, help="KV cache budget in bytes")
    p.add_argument("--kv", default=None, metavar="KIND", help="KV cache kind: fp32, bf16, fp16, xquant-4, "
                   "xquant-latent-4, xquant-cl-2, kivi-4, ... (default: K/V in the model's dtype)")
    add_calib_options(p)
    add_search_options(p)
    add_deepconf_options(p)
    p.add_argument("--speculate", choices=["off", "ngram"], default="off",
                   help="ngram: draft token trees from the prompt and sibling paths, verify them in one pass")
    p.add_argument("--draft-budget", type=int, default=SamplingParams.draft_budget,
                   help="speculation: most draft tokens verified per step over all paths")
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p


def add_calib_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib", metavar="PATH", help="-cal kinds: text whose first tokens calibrate the latent ranks")
    p.add_argument("--calib-tokens", type=int, default=4096, help="-cal kinds: tokens of --calib used (default 4096)")


def check_calib(kv: str | None, args: argparse.Namespace) -> None:
    """Before the model loads: a -cal kind needs --calib, and only -cal kinds take it."""
    from forkdec.xquant.kinds import parse_kind

    cal = kv is not None and parse_kind(kv).calibrated  # a bad kind fails here, before the model loads
    require(not cal or args.calib is not None, "calib", f"cache kind {kv!r} needs calibration text: --calib PATH")
    require(cal or args.calib is None, "calib", f"only -cal cache kinds are calibrated, not {kv or 'the default'!r}")
    require(args.calib_tokens >= 1, "calib-tokens", f"must be >= 1, got {args.calib_tokens}")


def apply_calib(args: argparse.Namespace, model: Any, tokenizer: Any) -> None:
    if args.calib is not None:
        from forkdec.xquant.calibration import calibrate_from_text

        try:
            calibrate_from_text(model, tokenizer, args.calib, max_tokens=args.calib_tokens)
        except ValueError as e:
            raise ValueError(str(e).replace("data:", "calib:", 1)) from None


def load(path: str | None, dtype: torch.dtype | None, weights: str | None = None) -> tuple[Any, Any]:
    """The model and tokenizer; any failure to read the file is the `model` argument's fault."""
    if path is not None:
        require(Path(path).exists(), "model", f"no such file or directory: {path}")
    try:
        from forkdec.models import load_model
    except ImportError as e:
        raise ValueError(f"model: forkdec.models is not available in this install ({e})") from None
    try:
        return load_model(path, dtype=dtype, weights=weights)
    except (ValueError, OSError, KeyError, IndexError, TypeError, NotImplementedError, RuntimeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(msg if msg.startswith(("model", "weights:")) else f"model: cannot load {path or 'the default model'}: {msg}") from None


def _compact(text: str, width: int = 90) -> str:
    flat = " ".join(text.split())
    if len(flat) <= width:
        return flat
    half = (width - 5) // 2
    return flat[:half] + " ... " + flat[-half:]


def _mib(b: int) -> str:
    return f"{b / 2**20:.1f} MiB"


def run(argv: list[str]) -> int:
    from forkdec import strategies
    from forkdec.engine.engine import Engine

    args = parser().parse_args(argv)
    require(args.prompt.strip() != "", "prompt", "is empty")
    require(args.n >= 1, "n", f"must be >= 1, got {args.n}")
    require(args.first_k is None or args.first_k >= 1, "first-k", f"must be >= 1, got {args.first_k}")
    require(args.max_kv_bytes is None or args.max_kv_bytes > 0, "max-kv-bytes", "must be positive")
    check_calib(args.kv, args)
    if args.search != "none":
        check_search(args)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                            max_new_tokens=args.max_new_tokens, stop=tuple(args.stop), seed=args.seed,
                            speculate=args.speculate, draft_budget=args.draft_budget,
                            confidence_k=20 if (args.json or args.vote.startswith("deepconf")) and args.speculate == "off"
                            else 0)
    model, tokenizer = load(args.model, DTYPES.get(args.dtype), *([args.weights] if args.weights else []))
    apply_calib(args, model, tokenizer)
    if args.search != "none":
        return run_search(args, model, tokenizer)
    if args.vote.startswith("deepconf"):
        return run_deepconf(args, params, model, tokenizer)
    k = args.first_k or max(1, args.n // 4)
    early = strategies.first_finish_stopper(k) if args.vote == "first-finish" else None
    bar = ProgressBar(sys.stderr, force=False) if not args.no_progress else None
    try:
        engine = Engine(model, tokenizer=tokenizer, kv_budget_bytes=args.max_kv_bytes, kv=args.kv)
        paths = engine.generate(args.prompt, args.n, params, chat=not args.raw, progress=bar,
                                early_stop=early)[0]
    except ValueError as e:  # name the option the user typed
        raise ValueError(str(e).replace("kv_budget_bytes:", "max-kv-bytes:", 1)) from None
    finally:
        if bar is not None:
            bar.close()
    vote = strategies.first_finish(paths, k) if args.vote == "first-finish" else strategies.STRATEGIES[args.vote](paths)
    stats = engine.last_stats
    assert stats is not None
    with human_output(args.json):
        _print(paths, vote, stats, args.vote, args.kv)
    if args.json:
        write_json(args.json, _result(args, params, paths, vote, stats))
    return 0


def _print(paths: list[Completion], vote: Any, stats: GenerateStats, strategy: str, kv: str | None = None) -> None:
    from forkdec.strategies import extract_answer

    print(f"{'path':>4}  {'finish':<9} {'tokens':>6}  {'mean lp':>7}  {'answer':<10} text")
    for i, c in enumerate(paths):
        ans = extract_answer(c.text) if c.finish_reason != "cancelled" else None
        mark = "*" if i == vote.chosen else " "
        print(f"{i:>4}{mark} {c.finish_reason:<9} {len(c.token_ids):>6}  {c.mean_logprob:>7.3f}  "
              f"{(ans or '-')[:10]:<10} {_compact(c.text)}")
    counts = ", ".join(f"{a} x{n}" for a, n in vote.votes.items()) or "none"
    print(f"\nanswer: {vote.answer}   ({strategy}; votes: {counts}; {len(vote.considered)} paths considered)")
    print(f"stats: {len(paths)} paths, {stats.generated_tokens} tokens in {stats.seconds:.2f} s "
          f"({stats.tokens_per_second:.1f} tok/s; prefill {stats.prefill_seconds:.2f} s of "
          f"{sum(stats.prompt_tokens)} prompt tokens: {stats.prompt_tokens_prefilled} prefilled, "
          f"{stats.prompt_tokens_reused} reused from the prefix cache; largest batch {stats.max_batch})")
    if stats.path_steps:
        print(f"speculation: {stats.tokens_per_path_step:.2f} tokens per path per step; "
              f"{stats.speculative_steps} of {stats.decode_steps} steps verified drafts, "
              f"{stats.accepted_draft_tokens} of {stats.draft_tokens} draft tokens accepted; "
              + (f"{speedup:.2f}x the tokens/s of this run's plain steps" if (speedup := stats.speedup_vs_plain_steps)
                 else "no plain step to compare tokens/s with"))
    print(f"KV ({kv or 'model dtype'}): {_mib(stats.kv_bytes_peak)} held at peak, prompt {_mib(stats.kv_bytes_prompts)} stored once; "
          f"per-path prompt copies would need {_mib(stats.kv_bytes_if_copied)}")


def _result(args: argparse.Namespace, params: SamplingParams, paths: list[Completion], vote: Any,
            stats: GenerateStats) -> dict:
    from forkdec.strategies import extract_answer

    return {
        "prompt": args.prompt, "n": args.n, "model": args.model or "default (SmolLM2-135M-Instruct GGUF)",
        "params": {"temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k,
                   "min_p": params.min_p, "max_new_tokens": params.max_new_tokens, "stop": list(params.stop),
                   "seed": params.seed, "chat": not args.raw, "speculate": params.speculate,
                   "draft_budget": params.draft_budget},
        "paths": [{"text": c.text, "token_ids": c.token_ids, "finish_reason": c.finish_reason,
                   "cumulative_logprob": c.cumulative_logprob if math.isfinite(c.cumulative_logprob) else None,
                   "finish_order": c.finish_order, "token_logprobs": c.token_logprobs,
                   "token_confidences": c.token_confidences,
                   "answer": extract_answer(c.text) if c.finish_reason != "cancelled" else None} for c in paths],
        "vote": {"strategy": vote.strategy, "answer": vote.answer, "votes": vote.votes, "chosen": vote.chosen,
                 "considered": vote.considered},
        "stats": {"generated_tokens": stats.generated_tokens, "seconds": stats.seconds,
                  "tokens_per_second": stats.tokens_per_second, "prefill_seconds": stats.prefill_seconds,
                  "prompt_tokens": stats.prompt_tokens[0], "decode_steps": stats.decode_steps,
                  "prompt_tokens_prefilled": stats.prompt_tokens_prefilled,
                  "prompt_tokens_reused": stats.prompt_tokens_reused,
                  "max_batch": stats.max_batch, "kv_bytes_peak": stats.kv_bytes_peak,
                  "kv_bytes_prompt": stats.kv_bytes_prompts, "kv_bytes_if_copied": stats.kv_bytes_if_copied,
                  "speculative_steps": stats.speculative_steps, "draft_tokens": stats.draft_tokens,
                  "accepted_draft_tokens": stats.accepted_draft_tokens,
                  "tokens_per_path_step": stats.tokens_per_path_step,
                  "speedup_vs_plain_steps": stats.speedup_vs_plain_steps},
    }
