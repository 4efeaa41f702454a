"""`forkdec eval ppl --kv KIND --data PATH [--windows N --window 2048 --chunk 128]` and
`forkdec eval reasoning --data PATH|arith --strategies majority,greedy,... --n 8,32 [--json PATH]`.

Prints one progress line per window on stderr and the result on stdout. User
errors raise ValueError naming the option; `forkdec.cli.main` prints it as one
line and exits with code 2.
"""
from __future__ import annotations

import argparse
import sys

import torch

from forkdec.engine.cli import DTYPES, OneLineParser, add_calib_options, apply_calib, check_calib
from forkdec.json_output import human_output, write_json
from forkdec.validation import require


def parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="forkdec eval ppl", description="Perplexity through a KV cache kind, chunk by chunk.")
    p.add_argument("--kv", default="fp32", help="cache kind: fp32, bf16, fp16, xquant-4, xquant-latent-4, "
                   "xquant-cl-2, kivi-4, ... with optional -gG (group) and -rR (window) (default fp32)")
    p.add_argument("--data", required=True, help="text file, e.g. WikiText-2 test.txt")
    p.add_argument("--windows", type=int, default=None, help="windows to score (default: all whole ones)")
    p.add_argument("--window", type=int, default=2048, help="tokens per window (default 2048)")
    p.add_argument("--chunk", type=int, default=128, help="tokens fed per forward (default 128)")
    p.add_argument("--model", metavar="PATH", help="GGUF file or HF folder (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="compute dtype (default fp32)")
    p.add_argument("--weights", default=None, metavar="KIND", help="gguf, gguf+bf16, bf16 or fp32 (default: dense "
                   "weights in --dtype); bf16 and gguf+bf16 compute in bf16")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    add_calib_options(p)
    p.add_argument("--json", metavar="PATH", help="also write the result as JSON")
    return p


def reasoning_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="forkdec eval reasoning",
                      description="Accuracy, generated tokens and time of answer-selection strategies.")
    p.add_argument("--data", required=True, help="JSONL with question/answer fields (e.g. GSM8K test.jsonl), "
                   "or arith / arith:STEPS for the generated arithmetic word problems")
    p.add_argument("--strategies", default="majority,first-finish,best-logprob,greedy",
                   help="comma-separated: majority, first-finish, best-logprob, greedy, deepconf-low, "
                   "deepconf-high, deepconf-online-low, deepconf-online-high")
    p.add_argument("--n", default="8,32", help="comma-separated path budgets (default 8,32)")
    p.add_argument("--limit", type=int, default=None, help="first N questions (default: all; arith: 100)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--data-seed", type=int, default=None, help="arith generator seed (default: the module's)")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--window", type=int, default=32, help="DeepConf group window in tokens (default 32)")
    p.add_argument("--warmup", type=int, default=None,
                   help="DeepConf online warm-up paths per question (default max(2, n // 8))")
    p.add_argument("--model", metavar="PATH", help="GGUF file or HF folder (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="compute dtype (default: the engine's)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    return p


def run_reasoning(argv: list[str]) -> int:
    from forkdec.engine.cli import load
    from forkdec.engine.engine import Engine
    from forkdec.engine.params import SamplingParams
    from forkdec.eval.reasoning import evaluate, format_table, load_questions, parse_budgets, parse_strategies

    args = reasoning_parser().parse_args(argv)
    strategies = parse_strategies(args.strategies)
    budgets = parse_budgets(args.n)
    require(args.window >= 1, "window", f"must be >= 1, got {args.window}")
    require(args.warmup is None or 1 <= args.warmup < min(budgets), "warmup",
            f"must be in 1..{min(budgets) - 1} (below every budget), got {args.warmup}")
    questions = load_questions(args.data, args.limit, args.data_seed)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                            seed=args.seed)
    model, tokenizer = load(args.model, DTYPES.get(args.dtype) if args.dtype else None)
    engine = Engine(model, tokenizer=tokenizer)
    result = evaluate(engine, questions, strategies, budgets, params, window=args.window, warmup=args.warmup,
                      progress=lambda line: print(line, file=sys.stderr, flush=True))
    result.config["data"] = args.data
    with human_output(args.json):
        print(format_table(result))
    if args.json:
        write_json(args.json, result.as_dict(), indent=1)
    return 0


def run(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: forkdec eval ppl --kv KIND --data PATH [--windows N --window 2048 --chunk 128]\n"
              "       forkdec eval reasoning --data PATH|arith --strategies majority,... --n 8,32 [--json PATH]",
              file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    require(argv[0] in ("ppl", "reasoning"), "task", f"unknown evaluation {argv[0]!r}; expected ppl or reasoning")
    if argv[0] == "reasoning":
        return run_reasoning(argv[1:])
    args = parser().parse_args(argv[1:])
    from forkdec.engine.cli import load
    from forkdec.eval.ppl import perplexity, read_tokens
    check_calib(args.kv, args)
    require(args.windows is None or args.windows >= 1, "windows", f"must be >= 1, got {args.windows}")
    require(args.threads is None or args.threads >= 1, "threads", f"must be >= 1, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype] if args.weights in (None, "gguf") else None
    model, tokenizer = load(args.model, dtype, *([args.weights] if args.weights else []))
    apply_calib(args, model, tokenizer)
    ids = read_tokens(args.data, tokenizer, None if args.windows is None else args.windows * args.window)

    def progress(done: int, total: int, ppl: float) -> None:
        print(f"window {done}/{total}: ppl so far {ppl:.4f}", file=sys.stderr, flush=True)

    r = perplexity(model, ids, args.kv, window=args.window, chunk=args.chunk, windows=args.windows, progress=progress)
    with human_output(args.json):
        print(f"kv {args.kv}: ppl {r.ppl:.4f} (nll {r.nll:.5f}) over {r.tokens} predictions in {r.windows} windows "
              f"of {r.window} tokens, chunks of {r.chunk}, {r.seconds:.1f} s")
    if args.json:
        write_json(args.json, r.__dict__, indent=1)
    return 0
