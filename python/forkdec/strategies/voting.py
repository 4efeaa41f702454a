"""Choosing one answer from many paths: majority vote, first-finish, best-of-n.

Answers are extracted from each path's text (`extract_answer`): the last
`\\boxed{...}`, else the number after the last `####`, else the last number in
the text; numbers are normalized ("1,000" -> "1000", "42.0" -> "42", "$5" -> "5")
so equal values vote together. Every strategy returns a `Vote`: the chosen
answer, the votes per answer, and the index of the path it trusts.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Callable, Protocol, Sequence


class PathLike(Protocol):
    text: str
    token_ids: list[int]
    finish_reason: str
    cumulative_logprob: float
    finish_order: int


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def _boxed(text: str) -> str | None:
    """Content of the last \\boxed{...}, braces balanced."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def normalize_answer(answer: str) -> str:
    """Canonical form: numbers without thousands separators, trailing zeros,
    currency or percent signs; other answers stripped of spaces, $ and a final period."""
    s = answer.strip().strip("$").strip().rstrip(".").strip()
    s = s.replace("\\$", "").replace("\\%", "").replace("%", "").strip()
    if re.fullmatch(r"-?\$?\d[\d,]*(\.\d+)?|-?\$?\.\d+", s):
        s = s.replace("$", "").replace(",", "")
        try:
            d = Decimal(s)
        except InvalidOperation:
            return s
        if d == d.to_integral_value():
            return str(int(d))
        return format(d.normalize(), "f")
    return re.sub(r"\s+", "", s)


def extract_answer(text: str) -> str | None:
    """The final answer in a reasoning text, normalized; None if there is none."""
    boxed = _boxed(text)
    if boxed is not None and boxed.strip():
        return normalize_answer(boxed)
    if "####" in text:
        tail = text.rsplit("####", 1)[1]
        m = _NUMBER.search(tail)
        if m:
            return normalize_answer(m.group())
    nums = _NUMBER.findall(text)
    return normalize_answer(nums[-1]) if nums else None


@dataclass
class Vote:
    """answer: the chosen answer (None if no path had one). votes: answer ->
    number of paths (paths without an answer are not counted). chosen: index
    of the representative path. considered: indices of the paths that voted."""
    answer: str | None
    votes: dict[str, int]
    chosen: int | None
    strategy: str
    considered: list[int] = field(default_factory=list)


def _eligible(paths: Sequence[PathLike]) -> list[int]:
    return [i for i, p in enumerate(paths) if p.finish_reason != "cancelled"]


def _count(paths: Sequence[PathLike], idx: list[int],
           extract: Callable[[str], str | None]) -> tuple[Counter, dict[int, str]]:
    answers = {i: a for i in idx if (a := extract(paths[i].text)) is not None}
    return Counter(answers.values()), answers


def _mean_lp(p: PathLike) -> float:
    return p.cumulative_logprob / max(1, len(p.token_ids))


def majority_vote(paths: Sequence[PathLike], extract: Callable[[str], str | None] = extract_answer) -> Vote:
    """Self-consistency: the most frequent answer; a tie goes to the answer whose
    best path has the highest mean logprob."""
    idx = _eligible(paths)
    votes, answers = _count(paths, idx, extract)
    if not votes:
        return Vote(None, {}, None, "majority", idx)
    top = max(votes.values())

    def best_path(a: str) -> int:
        return max((i for i, x in answers.items() if x == a), key=lambda i: _mean_lp(paths[i]))

    winner = max((a for a, c in votes.items() if c == top), key=lambda a: _mean_lp(paths[best_path(a)]))
    return Vote(winner, dict(votes.most_common()), best_path(winner), "majority", idx)


def first_finish(paths: Sequence[PathLike], k: int = 1,
                 extract: Callable[[str], str | None] = extract_answer) -> Vote:
    """Majority vote among the first `k` paths to finish naturally (finish_reason
    "stop"; if fewer did, paths cut at the length limit fill in, in finish order)."""
    if k < 1:
        raise ValueError(f"k: must be >= 1, got {k}")
    idx = _eligible(paths)
    ordered = sorted(idx, key=lambda i: (paths[i].finish_reason != "stop", paths[i].finish_order))
    first = ordered[:k]
    v = majority_vote([paths[i] for i in first], extract)
    chosen = first[v.chosen] if v.chosen is not None else None
    return Vote(v.answer, v.votes, chosen, "first-finish", first)


def first_finish_stopper(k: int) -> Callable[[int, list], bool]:
    """An `Engine.generate(early_stop=...)` callback: a prompt stops once k of its
    paths have finished naturally."""
    if k < 1:
        raise ValueError(f"k: must be >= 1, got {k}")
    return lambda prompt_index, finished: sum(c.finish_reason == "stop" for c in finished) >= k


def best_logprob(paths: Sequence[PathLike], extract: Callable[[str], str | None] = extract_answer) -> Vote:
    """Best-of-n: the path with the highest mean token logprob; its answer wins.
    `votes` still counts every path's answer, for comparison."""
    idx = [i for i in _eligible(paths) if paths[i].token_ids]
    votes, answers = _count(paths, idx, extract)
    if not idx:
        return Vote(None, {}, None, "best-logprob", idx)
    best = max(idx, key=lambda i: _mean_lp(paths[i]))
    return Vote(answers.get(best), dict(votes.most_common()), best, "best-logprob", idx)


STRATEGIES: dict[str, Callable[..., Vote]] = {
    "majority": majority_vote, "first-finish": first_finish, "best-logprob": best_logprob,
}
