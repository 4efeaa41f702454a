"""DeepConf online (Fu et al., arXiv 2508.15260) on a Session: warm-up paths set a
confidence threshold, later paths stop as soon as their group confidence falls
below it, and sampling ends once the confidence-weighted vote reaches consensus.

The signals come from the sampler (SamplingParams.confidence_k = 20: the token
confidence of every drawn token, fused into the sampling kernel), and the tests
on them are forkdec.strategies.deepconf's, so the online run and the offline
replay (`simulate_online`) apply the same rule. The prompt is prefilled once:
the second phase's paths start from the prompt's pages in the prefix cache (only
its partial last page, under one page of tokens, runs through the model again).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from forkdec.engine.params import SamplingParams
from forkdec.strategies.deepconf import (DEFAULT_WINDOW, consensus_reached, deepconf_threshold,
                                         lowest_group_confidence, should_stop, weighted_votes)
from forkdec.strategies.voting import Vote, extract_answer
from forkdec.validation import require

VARIANTS = {"deepconf-low": 10.0, "deepconf-high": 90.0}


@dataclass
class _Text:
    text: str


@dataclass
class DeepConfRun:
    """vote: the answer; paths: every path's id in start order (warm-up first); stopped:
    the ids stopped early (by the threshold, or by consensus); generated_tokens: all
    paths' tokens, stopped ones to their stop; paths_not_started: budget left when
    consensus was reached."""
    vote: Vote
    threshold: float
    paths: list[int]
    stopped: list[int]
    generated_tokens: int
    paths_not_started: int
    consensus_stop: bool


def deepconf_online(session, prompt, n: int, params: SamplingParams, *, keep: float = 10.0, warmup: int | None = None,
                    window: int = DEFAULT_WINDOW, tau: float | None = 0.95, batch: int | None = None,
                    chat: bool = True) -> DeepConfRun:
    """Run DeepConf online for one prompt with a budget of n paths.

    keep: 10 = DeepConf-low (the threshold keeps the top 10% of warm-up paths), 90 = -high.
    warmup: warm-up paths (default max(2, n // 8), the paper's 16 at n = 128).
    window: group size of the sliding confidence (the paper's 2048; use less for short traces).
    tau: consensus that ends sampling (None: never). batch: paths decoded together in the
    second phase (default: all remaining), started again as earlier ones end.
    params.confidence_k is set to 20 if it is 0.
    """
    require(isinstance(n, int) and not isinstance(n, bool) and n >= 2, "n", f"must be an int >= 2, got {n!r}")
    warmup = max(2, n // 8) if warmup is None else warmup
    require(isinstance(warmup, int) and 1 <= warmup < n, "warmup", f"must be in 1..{n - 1}, got {warmup!r}")
    batch = n - warmup if batch is None else batch
    require(isinstance(batch, int) and batch >= 1, "batch", f"must be an int >= 1, got {batch!r}")
    require(isinstance(window, int) and window >= 1, "window", f"must be an int >= 1, got {window!r}")
    require(isinstance(keep, (int, float)) and 0 < keep < 100, "keep", f"must be in (0, 100), got {keep!r}")
    if not params.confidence_k:
        params = replace(params, confidence_k=20)
    seed = params.seed

    def confidences(pid: int) -> list[float]:
        return session.path(pid).token_confidences

    texts: dict[int, str] = {}

    def text(pid: int) -> str:  # only finished paths are asked, so their text is kept
        if pid not in texts:
            p = session.path(pid)
            texts[pid] = p.stop.final_text(p.token_ids)
        return texts[pid]

    # phase 1: warm-up paths run to their end
    warm = session.start(prompt, warmup, params, chat=chat,
                         seeds=None if seed is None else [seed + i for i in range(warmup)])
    while any(session.path(i).live for i in warm):
        session.step()
    scores = {i: lowest_group_confidence(confidences(i), window) for i in warm}
    threshold = deepconf_threshold(list(scores.values()), keep)
    count = max(1, math.ceil(warmup * keep / 100))
    voters = {i: scores[i] for i in sorted(warm, key=lambda i: -scores[i])[:count]}

    # phase 2: the rest of the budget, each path stopped once its confidence drops
    paths, stopped, started = list(warm), [], warmup
    live: list[int] = []
    consensus_stop = False

    def check(ids: list[int]) -> None:
        """Stop the paths whose last full window fell below the threshold; finished ones vote."""
        for pid in ids:
            p = session.path(pid)
            if p.live and should_stop(p.token_confidences, threshold, window):
                session.stop(pid, "stopped")
                stopped.append(pid)
            if not session.path(pid).live:
                live.remove(pid)
                if pid not in stopped:
                    voters[pid] = lowest_group_confidence(confidences(pid), window)

    def votes() -> dict[str, float]:
        ids = sorted(voters)
        return weighted_votes({i: _Text(text(i)) for i in ids}, ids, [voters[i] for i in ids], extract_answer)

    while True:
        if tau is not None and consensus_reached(votes(), tau):
            consensus_stop = True
            break
        if started < n and len(live) < batch:
            k = min(batch - len(live), n - started)
            new = session.start(prompt, k, params, chat=chat,
                                seeds=None if seed is None else [seed + started + i for i in range(k)])
            started += k
            paths += new
            live += new
            check(new)  # a first token may already end a window below the threshold
        if not live:
            break
        session.step()
        check(list(live))

    for pid in live:  # consensus reached: the paths still decoding end here
        session.stop(pid, "stopped")
        stopped.append(pid)
    final = votes()
    name = f"deepconf-online-{keep:g}"
    if final:
        winner = max(final, key=lambda a: final[a])
        chosen = max((i for i in voters if extract_answer(text(i)) == winner), key=lambda i: voters[i])
        vote = Vote(winner, {a: round(w, 6) for a, w in final.items()}, paths.index(chosen), name,
                    [paths.index(i) for i in sorted(voters)])
    else:
        vote = Vote(None, {}, None, name, [paths.index(i) for i in sorted(voters)])
    tokens = sum(len(session.path(i).token_ids) for i in paths)
    return DeepConfRun(vote, threshold, paths, stopped, tokens, n - started, consensus_stop)
