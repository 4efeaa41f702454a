"""DeepConf (Fu et al., arXiv 2508.15260): confidence-filtered, confidence-weighted voting.

Pure functions over finished (or, online, partial) paths that carry per-token
confidences. A path's `token_confidences` is a list of floats, one per entry of
its `token_ids`: C_t = -(1/k) * sum of the k largest logprobs at step t
(k = 20; `forkdec.ops.sample_with_logprobs` returns it as `confidence`). Higher
means the model was more certain.

  group confidence    mean of C over a sliding window of the last `window` tokens;
                      a path shorter than the window has one group, its whole length
  lowest group        min over the path's groups (DeepConf's stopping signal)
  bottom-10% group    mean of the lowest 10% of the path's groups
  tail                mean of C over the path's last `tail` tokens
  threshold           from warm-up paths: the (100 - keep)-th percentile of their
                      lowest group confidences; DeepConf-low keeps the top 10%
                      (keep = 10), DeepConf-high the top 90% (keep = 90)
  online stop         a path stops at the first token where its group confidence
                      (a full window) falls below the threshold
  consensus           the confidence-weighted share of the leading answer; sampling
                      stops once it reaches tau

Offline, `deepconf_vote` keeps the paths whose score is in the top `keep`
percent and takes a confidence-weighted majority vote among them.
`simulate_online` replays the online algorithm on paths decoded in full (what
a path would have cost had it been stopped), the paper's own offline protocol.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import numpy as np

from forkdec.strategies.voting import Vote, extract_answer

DEFAULT_WINDOW = 2048  # the paper's group size; pass a smaller one for short traces
DEFAULT_TAIL = 2048


class ConfidentPath(Protocol):
    text: str
    token_ids: list[int]
    finish_reason: str
    token_confidences: list[float] | None


def _check_window(window: int, name: str = "window") -> None:
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"{name}: must be an int >= 1, got {window!r}")


def _check_percent(value: float, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 100:
        raise ValueError(f"{name}: must be a percentage in (0, 100), got {value!r}")


def _confidences(path: ConfidentPath) -> list[float]:
    conf = getattr(path, "token_confidences", None)
    if conf is None:
        raise ValueError("paths: a path has no token_confidences (decode with per-token signals, or score the "
                         "paths with forkdec.eval.reasoning.score_confidences)")
    return list(conf)


def group_confidences(confidences: Sequence[float], window: int = DEFAULT_WINDOW) -> list[float]:
    """Mean confidence of every full window of `window` consecutive tokens, in
    order (len - window + 1 groups); one group, the mean of all, when the path is
    shorter than the window; [] for an empty path."""
    _check_window(window)
    c = np.asarray(confidences, dtype=np.float64)
    if c.size == 0:
        return []
    if c.size <= window:
        return [float(c.mean())]
    sums = np.convolve(c, np.ones(window), mode="valid")
    return (sums / window).tolist()


def lowest_group_confidence(confidences: Sequence[float], window: int = DEFAULT_WINDOW) -> float:
    groups = group_confidences(confidences, window)
    return min(groups) if groups else -math.inf


def bottom_group_confidence(confidences: Sequence[float], window: int = DEFAULT_WINDOW,
                            percent: float = 10.0) -> float:
    """Mean of the lowest `percent` % of the path's groups (at least one group)."""
    _check_percent(percent, "percent")
    groups = sorted(group_confidences(confidences, window))
    if not groups:
        return -math.inf
    count = max(1, int(len(groups) * percent / 100))
    return float(np.mean(groups[:count]))


def tail_confidence(confidences: Sequence[float], tail: int = DEFAULT_TAIL) -> float:
    """Mean confidence of the last `tail` tokens (all of them when fewer)."""
    _check_window(tail, "tail")
    c = list(confidences)[-tail:]
    return float(np.mean(c)) if c else -math.inf


def mean_confidence(confidences: Sequence[float]) -> float:
    return float(np.mean(confidences)) if len(confidences) else -math.inf


# name -> score of one path's confidences (higher = more trusted)
TRACE_SCORES: dict[str, Callable[..., float]] = {
    "lowest-group": lowest_group_confidence, "bottom-10": bottom_group_confidence, "tail": tail_confidence,
    "mean": mean_confidence,
}


def trace_score(path: ConfidentPath, score: str = "lowest-group", window: int = DEFAULT_WINDOW) -> float:
    if score not in TRACE_SCORES:
        raise ValueError(f"score: unknown trace score {score!r}; choose from {', '.join(TRACE_SCORES)}")
    conf = _confidences(path)
    if score == "tail":
        return tail_confidence(conf, window)
    if score == "mean":
        return mean_confidence(conf)
    return TRACE_SCORES[score](conf, window)


def deepconf_threshold(warmup_scores: Sequence[float], keep: float) -> float:
    """The stopping threshold from the warm-up paths' lowest group confidences:
    their (100 - keep)-th percentile, so that `keep` % of them lie at or above it
    (DeepConf-low: keep = 10; DeepConf-high: keep = 90). Paths without tokens (score
    -inf: they ended at their first draw) carry no confidence and are left out; if no
    path has any, the threshold is -inf (nothing is stopped)."""
    _check_percent(keep, "keep")
    scores = np.asarray(list(warmup_scores), dtype=np.float64)
    if scores.size == 0:
        raise ValueError("warmup_scores: needs at least one warm-up path")
    scores = scores[np.isfinite(scores)]
    return float(np.percentile(scores, 100 - keep)) if scores.size else -math.inf


def should_stop(confidences: Sequence[float], threshold: float, window: int = DEFAULT_WINDOW) -> bool:
    """The online test after each token: the last full window's mean confidence is
    below the threshold (False until the path has `window` tokens)."""
    _check_window(window)
    if len(confidences) < window:
        return False
    return float(np.mean(list(confidences)[-window:])) < threshold


def stop_position(confidences: Sequence[float], threshold: float, window: int = DEFAULT_WINDOW) -> int | None:
    """The number of tokens after which `should_stop` first holds, or None if never."""
    _check_window(window)
    groups = group_confidences(confidences, window) if len(confidences) >= window else []
    for i, g in enumerate(groups):
        if g < threshold:
            return i + window
    return None


def weighted_votes(paths: Sequence[ConfidentPath], indices: Sequence[int], weights: Sequence[float],
                   extract: Callable[[str], str | None] = extract_answer) -> dict[str, float]:
    """answer -> sum of the weights of the paths (of `indices`) that give it."""
    votes: dict[str, float] = defaultdict(float)
    for i, w in zip(indices, weights):
        answer = extract(paths[i].text)
        if answer is not None:
            votes[answer] += w
    return dict(votes)


def consensus(votes: dict[str, float]) -> float:
    """The leading answer's share of the total (confidence-weighted) vote; 0 without votes."""
    total = sum(votes.values())
    return max(votes.values()) / total if votes and total > 0 else 0.0


def consensus_reached(votes: dict[str, float], tau: float = 0.95) -> bool:
    """Adaptive sampling's stopping test: the leading answer holds at least tau of the vote."""
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0 < tau <= 1:
        raise ValueError(f"tau: must be in (0, 1], got {tau!r}")
    return consensus(votes) >= tau


def deepconf_vote(paths: Sequence[ConfidentPath], keep: float = 10.0, score: str = "lowest-group",
                  window: int = DEFAULT_WINDOW, extract: Callable[[str], str | None] = extract_answer) -> Vote:
    """Offline DeepConf: keep the paths whose `score` is in the top `keep` % (at
    least one), then the answer with the largest sum of kept paths' scores wins
    (confidences are positive; a tie goes to the answer seen first in path order).
    Cancelled paths do not vote."""
    _check_percent(keep, "keep")
    idx = [i for i, p in enumerate(paths) if p.finish_reason != "cancelled" and p.token_ids]
    name = f"deepconf-{score}-{keep:g}"
    if not idx:
        return Vote(None, {}, None, name, [])
    scores = {i: trace_score(paths[i], score, window) for i in idx}
    count = max(1, math.ceil(len(idx) * keep / 100))
    kept = sorted(idx, key=lambda i: -scores[i])[:count]
    kept.sort()
    votes = weighted_votes(paths, kept, [scores[i] for i in kept], extract)
    if not votes:
        return Vote(None, {}, None, name, kept)
    winner = max(votes, key=lambda a: votes[a])
    chosen = max((i for i in kept if extract(paths[i].text) == winner), key=lambda i: scores[i])
    return Vote(winner, {a: round(w, 6) for a, w in votes.items()}, chosen, name, kept)


@dataclass
class OnlineResult:
    """What DeepConf online would have done with these paths, in order: the vote,
    the tokens it generates (stopped paths counted to their stop), the paths it
    runs (warm-up included) and the threshold it learned."""
    vote: Vote
    generated_tokens: int
    paths_run: int
    threshold: float


def simulate_online(paths: Sequence[ConfidentPath], warmup: int, keep: float = 10.0,
                    window: int = DEFAULT_WINDOW, tau: float | None = 0.95,
                    extract: Callable[[str], str | None] = extract_answer) -> OnlineResult:
    """Replays DeepConf online on paths decoded in full, in their order: the first
    `warmup` paths run to the end and set the threshold (percentile of their
    lowest group confidence, see `deepconf_threshold`); each later path stops at
    `stop_position` (it then votes nothing); after each later path that finishes,
    the run ends once the confidence-weighted consensus of all warm-up paths and the
    later finished ones reaches tau (None: never; as in the paper's Algorithm 2, the
    warm-up set is the consensus's starting pool, so a single kept warm-up path
    cannot end the run alone). The vote is the confidence-weighted majority over the
    warm-up paths in the top `keep` % and the later paths that finished, each
    weighted by its lowest group confidence."""
    _check_window(window)
    _check_percent(keep, "keep")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or not 1 <= warmup <= len(paths):
        raise ValueError(f"warmup: must be in 1..{len(paths)} (the number of paths), got {warmup!r}")
    name = f"deepconf-online-{keep:g}"
    warm = list(range(warmup))
    warm_scores = {i: lowest_group_confidence(_confidences(paths[i]), window) for i in warm}
    threshold = deepconf_threshold(list(warm_scores.values()), keep)
    tokens = sum(len(paths[i].token_ids) for i in warm)
    count = max(1, math.ceil(warmup * keep / 100))
    voters = {i: warm_scores[i] for i in sorted(warm, key=lambda i: -warm_scores[i])[:count]}
    pool = {i: c for i, c in warm_scores.items() if math.isfinite(c)}  # consensus: every warm-up path
    run = warmup
    for i in range(warmup, len(paths)):
        conf = _confidences(paths[i])
        stop = stop_position(conf, threshold, window)
        run += 1
        if stop is not None and stop < len(paths[i].token_ids):
            tokens += stop
            continue
        tokens += len(paths[i].token_ids)
        if paths[i].finish_reason != "cancelled":
            voters[i] = pool[i] = lowest_group_confidence(conf, window)
            if tau is not None and consensus_reached(weighted_votes(paths, list(pool), list(pool.values()),
                                                                    extract), tau):
                break
    kept = sorted(voters)
    votes = weighted_votes(paths, kept, [voters[i] for i in kept], extract)
    if not votes:
        return OnlineResult(Vote(None, {}, None, name, kept), tokens, run, threshold)
    winner = max(votes, key=lambda a: votes[a])
    chosen = max((i for i in kept if extract(paths[i].text) == winner), key=lambda i: voters[i])
    return OnlineResult(Vote(winner, {a: round(w, 6) for a, w in votes.items()}, chosen, name, kept), tokens, run,
                        threshold)
