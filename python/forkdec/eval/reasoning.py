"""What each answer-selection strategy buys: accuracy against generated tokens and time.

For every budget n, n sampled paths of every question are decoded to their end
on one Session (all questions side by side, each prompt prefilled once; path i
drawn with seed + i); the strategies that choose among finished paths (majority,
best-logprob, DeepConf offline, first-finish replayed) are applied to those same
paths, so they share their cost. DeepConf online (`deepconf-online-low|high`)
is a real run of forkdec.search.deepconf_online on its own Session, with the
same seeds, so its paths are prefixes of the full run's: its tokens and seconds
are measured, and its accuracy differs from majority's only by what it stopped
and how it voted. first-finish runs its own `generate` call with early_stop
(k = max(1, n // 4) finished paths per prompt); greedy is one path at temperature
0, the same for every budget.

Per-token confidences (DeepConf's -(1/k) * sum of the top-k logprobs, k = 20) come
from the sampler as it decodes. `score_confidences` computes them for paths
decoded elsewhere (one prefill forward over prompt + path).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch

from forkdec.eval.arith import DEFAULT_STEPS, arith_problems
from forkdec.eval.session_runs import ScoredPath, decode_all, online_runs
from forkdec.strategies import STRATEGIES, extract_answer, first_finish, first_finish_stopper, normalize_answer
from forkdec.validation import require

# The bare question: asking SmolLM2-135M for a "#### N" line made it repeat that line to the token limit.
PROMPT = "{question}"
SAMPLED = ("majority", "best-logprob", "deepconf-low", "deepconf-high", "deepconf-online-low",
           "deepconf-online-high", "first-finish-replay")
KNOWN = SAMPLED + ("first-finish", "greedy")  # first-finish-replay: see replay_first_finish
CONFIDENCE_K = 20


@dataclass(frozen=True)
class Question:
    question: str
    answer: str  # normalized


def parse_strategies(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    require(len(names) > 0, "strategies", "no strategy given")
    for s in names:
        require(s in KNOWN, "strategies", f"unknown strategy {s!r}; choose from {', '.join(KNOWN)}")
    return names


def parse_budgets(text: str) -> list[int]:
    try:
        budgets = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"n: expected comma-separated integers, got {text!r}") from None
    require(len(budgets) > 0 and all(b >= 1 for b in budgets), "n", f"budgets must be integers >= 1, got {text!r}")
    return budgets


def load_questions(data: str, limit: int | None = None, seed: int | None = None) -> list[Question]:
    """`arith` (the generated set, forkdec.eval.arith, optionally `arith:STEPS`) or a
    JSONL file whose lines have `question` and `answer` fields (GSM8K: the number
    after `####` in answer). ValueError naming `data` for anything else."""
    require(limit is None or limit >= 1, "limit", f"must be >= 1, got {limit}")
    if data == "arith" or data.startswith("arith:"):
        steps = DEFAULT_STEPS
        if data != "arith":
            try:
                steps = int(data.split(":", 1)[1])
            except ValueError:
                raise ValueError(f"data: expected arith or arith:STEPS, got {data!r}") from None
        kw = {} if seed is None else {"seed": seed}
        return [Question(p.question, p.answer) for p in arith_problems(limit or 100, steps=steps, **kw)]
    try:
        with open(data, encoding="utf-8") as f:
            lines = [line for line in f if line.strip()]
    except OSError as e:
        raise ValueError(f"data: cannot read {data}: {e.strerror or e}") from None
    questions = []
    for number, line in enumerate(lines[:limit] if limit else lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"data: line {number} of {data} is not JSON ({e.msg})") from None
        require(isinstance(row, dict) and "question" in row and "answer" in row, "data",
                f"line {number} of {data} has no question/answer fields")
        answer = extract_answer(str(row["answer"])) if "####" in str(row["answer"]) else \
            normalize_answer(str(row["answer"]))
        require(answer is not None, "data", f"line {number} of {data}: no answer in {row['answer']!r}")
        questions.append(Question(str(row["question"]), answer))
    require(len(questions) > 0, "data", f"{data} holds no question")
    return questions


# ---- per-token confidences by a scoring pass ---------------------------------------------------

def score_confidences(model, prompt_ids: list[int], paths: Sequence[Sequence[int]], k: int = CONFIDENCE_K,
                      batch_tokens: int = 4096) -> list[tuple[list[float], list[float]]]:
    """(token_logprobs, token_confidences) of every path's tokens given the prompt,
    from prefill forwards of prompt + path (fp32 cache, paths batched up to
    `batch_tokens` tokens per forward): the distribution each token was drawn
    from, at temperature 1 and unfiltered, as the sampler's signals define it."""
    from forkdec.cache import StepBatch, make_attend, make_kv_cache
    from forkdec.ops import CascadeLevel

    out: list[tuple[list[float], list[float]]] = [([], []) for _ in paths]
    seqs = [list(prompt_ids) + list(p) for p in paths]
    page = 16
    order = [i for i in range(len(paths)) if len(paths[i]) > 0]
    groups: list[list[int]] = []
    for i in order:
        if groups and sum(len(seqs[j]) for j in groups[-1]) + len(seqs[i]) <= batch_tokens:
            groups[-1].append(i)
        else:
            groups.append([i])
    for group in groups:
        lengths = [len(seqs[i]) for i in group]
        pages = [-(-n // page) for n in lengths]
        cache = make_kv_cache(None, model, sum(pages), page_size=page)
        first_page = [sum(pages[:j]) for j in range(len(group))]
        tokens = torch.tensor([t for i in group for t in seqs[i]], dtype=torch.long)
        positions = torch.cat([torch.arange(n) for n in lengths])
        slots = torch.cat([(first_page[j] + torch.arange(n) // page) * page + torch.arange(n) % page
                           for j, n in enumerate(lengths)]).long()
        qo = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0).int()
        kv = torch.tensor([0] + pages, dtype=torch.int32).cumsum(0).int()
        last = torch.tensor([n - (p - 1) * page for n, p in zip(lengths, pages)], dtype=torch.int32)
        level = CascadeLevel(qo, kv, torch.arange(sum(pages), dtype=torch.int32), last, causal=True)
        with torch.inference_mode():
            attend = make_attend(StepBatch(tokens, positions, slots, [level]), cache, prefill=True)
            logits = model.forward(tokens, positions, attend).float()
        for j, i in enumerate(group):
            start = int(qo[j]) + len(prompt_ids) - 1  # the row that predicts the path's first token
            rows = logits[start:start + len(paths[i])]
            lse = torch.logsumexp(rows, dim=-1)
            target = torch.tensor(list(paths[i]), dtype=torch.long)
            lp = rows.gather(1, target[:, None])[:, 0] - lse
            top = rows.topk(min(k, rows.shape[1]), dim=-1).values - lse[:, None]
            out[i] = (lp.tolist(), (-top.mean(dim=-1)).tolist())
        del cache, logits
    return out


# ---- the evaluation ----------------------------------------------------------------------------

@dataclass
class Tally:
    correct: int = 0
    questions: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0
    seconds_estimated: bool = False

    def as_dict(self) -> dict:
        return {"accuracy": self.correct / self.questions if self.questions else 0.0,
                "generated_tokens": self.generated_tokens,
                "tokens_per_question": self.generated_tokens / self.questions if self.questions else 0.0,
                "seconds": round(self.seconds, 3), "correct": self.correct, "questions": self.questions,
                "seconds_estimated": self.seconds_estimated}


@dataclass
class ReasoningResult:
    config: dict
    tallies: dict[str, dict[int, Tally]]

    def as_dict(self) -> dict:
        return {"config": self.config,
                "strategies": {s: {str(n): t.as_dict() for n, t in by_n.items()} for s, by_n in self.tallies.items()}}


def evaluate(engine, questions: Sequence[Question], strategies: Sequence[str], budgets: Sequence[int], params,
             window: int = 32, warmup: int | None = None,
             progress: Callable[[str], None] | None = None) -> ReasoningResult:
    """Runs every strategy at every budget on every question (see the module
    docstring). `seconds` are the runs' wall times over all questions (per-question
    seconds are those divided by the count). warmup: DeepConf online's warm-up paths
    (default max(2, n // 8))."""
    online = [s for s in strategies if s.startswith("deepconf-online")]
    require(not online or min(budgets) >= 2, "n", f"{online[0] if online else ''} needs budgets >= 2, got {budgets}")
    tallies = {s: {n: Tally() for n in budgets} for s in strategies}
    prompts = [PROMPT.format(question=q.question) for q in questions]
    sampled = replace(params, confidence_k=CONFIDENCE_K)

    def note(line: str) -> None:
        if progress is not None:
            progress(line)

    if "greedy" in strategies:
        t = time.perf_counter()
        outs = engine.generate(prompts, 1, replace(params, temperature=0.0))
        seconds = time.perf_counter() - t
        for n in budgets:
            for q, out in zip(questions, outs):
                _add(tallies["greedy"][n], extract_answer(out[0].text) == q.answer, len(out[0].token_ids))
            tallies["greedy"][n].seconds += seconds
        note(f"greedy: {tallies['greedy'][budgets[0]].correct}/{len(questions)} in {seconds:.1f} s")
    for n in budgets:
        full = [s for s in strategies if s in SAMPLED and s not in online]
        if full:
            t = time.perf_counter()
            outs = decode_all(engine, prompts, n, sampled)
            seconds = time.perf_counter() - t
            all_tokens = sum(len(p.token_ids) for paths in outs for p in paths)
            for q, paths in zip(questions, outs):
                tokens = sum(len(p.token_ids) for p in paths)
                for s in full:
                    if s == "first-finish-replay":
                        vote, replay_tokens = replay_first_finish(paths, max(1, n // 4))
                        _add(tallies[s][n], vote.answer == q.answer, replay_tokens, estimated=True)
                    else:
                        fn = STRATEGIES[s]
                        vote = fn(paths, window=window) if s.startswith("deepconf") else fn(paths)
                        _add(tallies[s][n], vote.answer == q.answer, tokens)
            for s in full:
                share = tallies[s][n].generated_tokens / max(1, all_tokens) if s == "first-finish-replay" else 1.0
                tallies[s][n].seconds += seconds * share
            note(f"n={n}: {all_tokens} tokens in {seconds:.1f} s; "
                 + ", ".join(f"{s} {tallies[s][n].correct}/{len(questions)}" for s in full))
        for s in online:
            t = time.perf_counter()
            runs = online_runs(engine, prompts, n, sampled, keep=10.0 if s.endswith("low") else 90.0,
                               window=window, warmup=warmup)
            tallies[s][n].seconds += time.perf_counter() - t
            for q, r in zip(questions, runs):
                _add(tallies[s][n], r.vote.answer == q.answer, r.generated_tokens)
            note(f"n={n}: {s} {tallies[s][n].correct}/{len(questions)}, {tallies[s][n].generated_tokens} tokens "
                 f"in {tallies[s][n].seconds:.1f} s")
        if "first-finish" in strategies:
            k = max(1, n // 4)
            t = time.perf_counter()
            outs = engine.generate(prompts, n, params, early_stop=first_finish_stopper(k))
            seconds = time.perf_counter() - t
            for q, completions in zip(questions, outs):
                vote = first_finish(completions, k)
                _add(tallies["first-finish"][n], vote.answer == q.answer, sum(len(c.token_ids) for c in completions))
            tallies["first-finish"][n].seconds += seconds
            note(f"n={n}: first-finish {tallies['first-finish'][n].correct}/{len(questions)} in {seconds:.1f} s")
    config = {"questions": len(questions), "budgets": list(budgets), "strategies": list(strategies),
              "temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k,
              "max_new_tokens": params.max_new_tokens, "seed": params.seed, "window": window,
              "warmup": "max(2, n // 8)" if warmup is None else warmup, "tau": 0.95,
              "confidence_k": CONFIDENCE_K, "prompt": PROMPT}
    return ReasoningResult(config, tallies)


def replay_first_finish(paths: Sequence, k: int):
    """first-finish(k) replayed on paths decoded in full in one lockstep batch:
    the prompt stops at the step L where its k-th path ends naturally, so path i
    costs min(len_i, L) tokens and the paths longer than L count as cancelled.
    Returns (vote, tokens). Exact for the engine's batch when all n paths are
    admitted at once (they decode one token per step together)."""
    from types import SimpleNamespace

    ends = sorted(len(p.token_ids) for p in paths if p.finish_reason == "stop")
    limit = ends[k - 1] if len(ends) >= k else math.inf
    rank = {i: r for r, i in enumerate(sorted(range(len(paths)), key=lambda i: (len(paths[i].token_ids), i)))}
    replayed = [SimpleNamespace(text=p.text, token_ids=p.token_ids, cumulative_logprob=p.cumulative_logprob,
                                finish_order=rank[i],
                                finish_reason=p.finish_reason if len(p.token_ids) <= limit else "cancelled")
                for i, p in enumerate(paths)]
    tokens = sum(min(len(p.token_ids), limit) for p in paths)
    return first_finish(replayed, k), int(tokens)


def _add(t: Tally, ok: bool, tokens: int, estimated: bool = False) -> None:
    t.correct += int(ok)
    t.questions += 1
    t.generated_tokens += tokens
    t.seconds_estimated |= estimated


def format_table(result: ReasoningResult) -> str:
    lines = ["| strategy | n | accuracy | generated tokens / question | seconds / question |",
             "|---|---:|---:|---:|---:|"]
    for s, by_n in result.tallies.items():
        for n, t in by_n.items():
            d = t.as_dict()
            q = max(1, t.questions)
            estimated = " (est.)" if t.seconds_estimated else ""
            lines.append(f"| {s} | {n} | {d['accuracy']:.3f} ({t.correct}/{t.questions}) | "
                         f"{t.generated_tokens / q:.1f} | {t.seconds / q:.2f}{estimated} |")
    return "\n".join(lines)


def accuracy_interval(correct: int, total: int) -> tuple[float, float]:
    """Wilson 95% interval of a proportion."""
    if total == 0:
        return 0.0, 1.0
    z, p = 1.96, correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return max(0.0, centre - half), min(1.0, centre + half)
