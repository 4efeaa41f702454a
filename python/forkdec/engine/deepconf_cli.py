"""`forkdec generate PROMPT -n N --vote deepconf-low|deepconf-high`: DeepConf online
(forkdec.search.deepconf_online) on a Session, with the tokens it saved."""
from __future__ import annotations

import argparse
import time

from forkdec.engine.params import SamplingParams
from forkdec.json_output import human_output, write_json
from forkdec.validation import require


def add_deepconf_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--warmup", type=int, default=None, help="deepconf: warm-up paths (default max(2, n // 8))")
    p.add_argument("--window", type=int, default=64,
                   help="deepconf: tokens per confidence group (default 64; the paper's 2048 suits long traces)")
    p.add_argument("--tau", type=float, default=0.95, help="deepconf: consensus that ends sampling (default 0.95)")


def run_deepconf(args: argparse.Namespace, params: SamplingParams, model, tokenizer) -> int:
    from forkdec.engine.engine import Engine
    from forkdec.engine.session import Session
    from forkdec.search.deepconf_online import VARIANTS, deepconf_online

    require(args.n >= 2, "n", f"DeepConf needs n >= 2 paths, got {args.n}")
    require(args.window >= 1, "window", f"must be >= 1, got {args.window}")
    require(0 < args.tau <= 1, "tau", f"must be in (0, 1], got {args.tau}")
    try:
        session = Session(Engine(model, tokenizer=tokenizer, kv_budget_bytes=args.max_kv_bytes, kv=args.kv))
        t0 = time.perf_counter()
        r = deepconf_online(session, args.prompt, args.n, params, keep=VARIANTS[args.vote], warmup=args.warmup,
                            window=args.window, tau=args.tau, chat=not args.raw)
        seconds = time.perf_counter() - t0
    except ValueError as e:
        raise ValueError(str(e).replace("kv_budget_bytes:", "max-kv-bytes:", 1)) from None
    full = [len(session.path(i).token_ids) for i in r.paths if i not in r.stopped]
    # what the stopped and unstarted paths would have cost run to the end, at the finished paths' mean length
    mean_full = sum(full) / max(1, len(full))
    if_full = sum(full) + (len(r.stopped) + r.paths_not_started) * mean_full
    saved = 1 - r.generated_tokens / if_full if if_full else 0.0
    rows = []
    with human_output(args.json):
        print(f"{'path':>4}  {'finish':<9} {'tokens':>6}  {'lowest conf':>11}  text")
        for k, pid in enumerate(r.paths):
            p = session.path(pid)
            text = p.stop.final_text(p.token_ids)
            mark = "*" if k == r.vote.chosen else " "
            print(f"{k:>4}{mark} {p.finish_reason:<9} {len(p.token_ids):>6}  "
                  f"{min(p.token_confidences or [0]):>11.3f}  {' '.join(text.split())[:90]}")
            rows.append({"text": text, "token_ids": p.token_ids, "finish_reason": p.finish_reason,
                         "cumulative_logprob": p.cumulative_logprob, "token_logprobs": p.token_logprobs,
                         "token_confidences": p.token_confidences})
        print(f"\nanswer: {r.vote.answer}   ({args.vote}; votes: {r.vote.votes or 'none'}; threshold "
              f"{r.threshold:.3f}; {len(r.stopped)} paths stopped early, {r.paths_not_started} not started"
              f"{' (consensus reached)' if r.consensus_stop else ''})")
        print(f"stats: {r.generated_tokens} tokens in {seconds:.2f} s; about {100 * saved:.0f}% fewer than {args.n} "
              f"paths run to the end (at the finished paths' mean length); prompt tokens prefilled "
              f"{session.prefill_tokens}, reused {session.reused_tokens}")
    if args.json:
        write_json(args.json, {"prompt": args.prompt, "n": args.n, "vote": {
            "strategy": args.vote, "answer": r.vote.answer, "votes": r.vote.votes, "chosen": r.vote.chosen,
            "threshold": r.threshold}, "paths": rows,
            "stats": {"generated_tokens": r.generated_tokens, "seconds": seconds, "stopped": len(r.stopped),
                      "not_started": r.paths_not_started, "tokens_saved_share": saved,
                      "prompt_tokens_prefilled": session.prefill_tokens,
                      "prompt_tokens_reused": session.reused_tokens}})
    session.close()
    return 0
