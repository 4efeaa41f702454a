"""`forkdec generate PROMPT --search beam|tree`: beam search or step-level tree search
(forkdec.search) on a Session, printed like `generate`'s paths, with --json."""
from __future__ import annotations

import argparse
import time

from forkdec.engine.params import SamplingParams
from forkdec.json_output import human_output, write_json
from forkdec.validation import require


def add_search_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--search", choices=["none", "beam", "tree"], default="none",
                   help="beam: beam search (-n best beams); tree: step-level tree search")
    p.add_argument("--beam-width", type=int, default=4, help="beam search: beams kept per step (default 4)")
    p.add_argument("--length-penalty", type=float, default=1.0, help="beam search: score = logp / length**this")
    p.add_argument("--branch", type=int, default=4, help="tree search: children per kept path (default 4)")
    p.add_argument("--keep", type=int, default=4, help="tree search: paths kept at each step boundary (default 4)")
    p.add_argument("--boundary", default="\n\n", help="tree search: the step delimiter (default a blank line)")
    p.add_argument("--max-steps", type=int, default=8, help="tree search: boundary rounds that branch (default 8)")


def check_search(args: argparse.Namespace) -> None:
    """The search options, before the model loads."""
    require(args.beam_width >= 1, "beam-width", f"must be >= 1, got {args.beam_width}")
    require(args.branch >= 1, "branch", f"must be >= 1, got {args.branch}")
    require(args.keep >= 1, "keep", f"must be >= 1, got {args.keep}")
    require(args.max_steps >= 0, "max-steps", f"must be >= 0, got {args.max_steps}")
    require(args.boundary != "", "boundary", "is empty")
    if args.search == "beam":
        require(args.n <= args.beam_width, "n", f"{args.n} beams asked of --beam-width {args.beam_width}")


def run_search(args: argparse.Namespace, model, tokenizer) -> int:
    from forkdec.engine.engine import Engine
    from forkdec.engine.session import Session
    from forkdec.search import beam_search, tree_search

    try:
        engine = Engine(model, tokenizer=tokenizer, kv_budget_bytes=args.max_kv_bytes, kv=args.kv)
        session = Session(engine)
        t0 = time.perf_counter()
        if args.search == "beam":
            beams = beam_search(session, args.prompt, width=args.beam_width, max_new_tokens=args.max_new_tokens,
                                length_penalty=args.length_penalty, n=args.n, chat=not args.raw)
            rows = [{"text": b.text, "token_ids": b.token_ids, "finish_reason": b.finish_reason,
                     "cumulative_logprob": b.cumulative_logprob, "score": b.score} for b in beams]
        else:
            params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                    min_p=args.min_p, max_new_tokens=args.max_new_tokens, stop=tuple(args.stop))
            found = tree_search(session, args.prompt, branch=args.branch, keep=args.keep, params=params,
                                boundary=(args.boundary.encode().decode("unicode_escape"),),
                                max_steps=args.max_steps, seed=args.seed or 0, chat=not args.raw)[:args.n]
            rows = []
            for score, pid in found:
                p = session.path(pid)
                rows.append({"text": p.stop.final_text(p.token_ids), "token_ids": p.token_ids,
                             "finish_reason": p.finish_reason, "cumulative_logprob": p.cumulative_logprob,
                             "score": score})
        seconds = time.perf_counter() - t0
    except ValueError as e:
        raise ValueError(str(e).replace("kv_budget_bytes:", "max-kv-bytes:", 1)) from None
    generated = sum(len(p.token_ids) for p in session.paths.values() if p.finish_reason != "forked")
    with human_output(args.json):
        print(f"{'rank':>4}  {'finish':<9} {'tokens':>6}  {'logprob':>8}  {'score':>8}  text")
        for i, r in enumerate(rows):
            flat = " ".join(r["text"].split())
            print(f"{i:>4}  {r['finish_reason']:<9} {len(r['token_ids']):>6}  {r['cumulative_logprob']:>8.3f}  "
                  f"{r['score']:>8.3f}  {flat[:90]}")
        print(f"stats: {args.search} search, {session.steps} steps, {len(session.paths)} paths made, {seconds:.2f} s; "
              f"prompt tokens prefilled {session.prefill_tokens}, reused {session.reused_tokens}; "
              f"partial pages copied on forks {session.memory.pages_copied}")
    if args.json:
        out = {"prompt": args.prompt, "search": args.search, "model": args.model or "default (SmolLM2-135M-Instruct GGUF)",
               "beam_width": args.beam_width, "length_penalty": args.length_penalty, "branch": args.branch,
               "keep": args.keep, "paths": rows,
               "stats": {"seconds": seconds, "steps": session.steps, "paths_made": len(session.paths),
                         "generated_tokens": generated, "prompt_tokens_prefilled": session.prefill_tokens}}
        write_json(args.json, out)
    session.close()
    return 0
