"""`forkdec eval ppl --kv KIND --data PATH [--windows N --window 2048 --chunk 128]`.

Prints one progress line per window on stderr and the result on stdout. User
errors raise ValueError naming the option; `forkdec.cli.main` prints it as one
line and exits with code 2.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from forkdec.engine.cli import DTYPES, OneLineParser, add_calib_options, apply_calib, check_calib
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


def run(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: forkdec eval ppl --kv KIND --data PATH [--windows N --window 2048 --chunk 128]",
              file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    require(argv[0] == "ppl", "task", f"unknown evaluation {argv[0]!r}; expected ppl")
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
    print(f"kv {args.kv}: ppl {r.ppl:.4f} (nll {r.nll:.5f}) over {r.tokens} predictions in {r.windows} windows "
          f"of {r.window} tokens, chunks of {r.chunk}, {r.seconds:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r.__dict__, f, indent=1)
    return 0
