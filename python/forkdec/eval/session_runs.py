"""An evaluation's sampled paths and its DeepConf online runs, decoded on Sessions.

Path i of a question is drawn with seed `params.seed + i` in both runs, so the
paths DeepConf online decodes are prefixes of the full run's paths: majority
vote and DeepConf online are compared on the same samples (paired), and differ
only in what they stop and how they vote. Questions start as the engine's KV
budget allows; every step decodes the live paths of all started questions in one
forward.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

from forkdec.engine.params import SamplingParams
from forkdec.engine.session import Session
from forkdec.search.deepconf_online import DeepConfRun, OnlineSearch, deepconf_online_many


@dataclass
class ScoredPath:
    """A finished path with its per-token signals: token_logprobs and
    token_confidences hold one float per entry of token_ids."""
    text: str
    token_ids: list[int]
    finish_reason: str
    cumulative_logprob: float
    finish_order: int
    token_logprobs: list[float] = field(default_factory=list)
    token_confidences: list[float] | None = None


def decode_all(engine, prompts: Sequence[str], n: int, params: SamplingParams,
               progress: Callable[[int, int], None] | None = None) -> list[list[ScoredPath]]:
    """n paths of every prompt (chat template) decoded to their end; per prompt, its
    paths in seed order. finish_order ranks a prompt's paths by length (ties by index):
    its paths start together and decode one token per step, so that is the order in
    which they end."""
    session = Session(engine)
    ids = [engine.encode(p) for p in prompts]
    started: list[list[int]] = []
    done = 0
    while len(started) < len(ids) or session.running():
        while len(started) < len(ids) and (not session.running() or session.pages_available >=
                                           session.pages_for(len(ids[len(started)]), n, params)):
            started.append(session.start(ids[len(started)], n, params))
        session.step()
        finished = sum(all(not session.path(i).live for i in q) for q in started)
        if progress is not None and finished > done:
            done = finished
            progress(done, len(ids))
    out = []
    for q in started:
        rank = {pid: r for r, pid in enumerate(sorted(q, key=lambda pid: (len(session.path(pid).token_ids), pid)))}
        paths = []
        for pid in q:
            p = session.path(pid)
            paths.append(ScoredPath(p.stop.final_text(p.token_ids), list(p.token_ids), p.finish_reason,
                                    p.cumulative_logprob, rank[pid], list(p.token_logprobs),
                                    list(p.token_confidences) if params.confidence_k else None))
        out.append(paths)
    session.close()
    return out


def online_runs(engine, prompts: Sequence[str], n: int, params: SamplingParams, *, keep: float, window: int,
                warmup: int | None = None, tau: float | None = 0.95,
                progress: Callable[[int, int], None] | None = None) -> list[DeepConfRun]:
    """DeepConf online (forkdec.search.deepconf_online) for every prompt with a budget of
    n paths, all prompts' searches side by side in one Session."""
    session = Session(engine)
    searches = [OnlineSearch(session, p, n, params, keep=keep, warmup=warmup, window=window, tau=tau)
                for p in prompts]
    runs = deepconf_online_many(session, searches, progress)
    session.close()
    return runs
