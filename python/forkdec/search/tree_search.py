"""Step-level tree search on a Session: expand the best partial solutions at each step.

Paths decode until they reach a step boundary (e.g. a blank line) or end. At each
boundary round the paused paths are scored by `score(session, path_id)` (a caller's
function: mean log p, a confidence, a verifier...), the best `keep` are forked into
`branch` children each (own seeds, derived from `seed`), the rest are stopped. The
search ends when no path is left running or paused, or after `max_steps` rounds
(the survivors then decode to their end without branching). Returns the finished
paths' ids, best score first (a finished path is scored once, when it ends).
"""
from __future__ import annotations

from typing import Callable

from forkdec.engine.params import SamplingParams
from forkdec.validation import require

Score = Callable[[object, int], float]


def mean_logprob(session, path_id: int) -> float:
    """The default score: mean log p of the path's tokens so far."""
    lps = session.path(path_id).token_logprobs
    return sum(lps) / max(1, len(lps))


def _scored(session, ids: list[int], score: Score) -> list[tuple[float, int]]:
    out = []
    for i in ids:
        try:
            value = float(score(session, i))
        except Exception as e:  # the caller's function: say which argument failed, keep the session usable
            raise ValueError(f"score: raised {type(e).__name__}: {e} on path {i}") from e
        out.append((value, i))
    return out


def tree_search(session, prompt, *, branch: int = 4, keep: int = 4, params: SamplingParams | None = None,
                boundary: tuple[str, ...] = ("\n\n",), score: Score = mean_logprob, max_steps: int = 8,
                seed: int = 0, chat: bool = True) -> list[tuple[float, int]]:
    """(score, path id) of every finished path, best first; read them with session.path / session.text."""
    require(isinstance(branch, int) and branch >= 1, "branch", f"must be an int >= 1, got {branch!r}")
    require(isinstance(keep, int) and keep >= 1, "keep", f"must be an int >= 1, got {keep!r}")
    require(callable(score), "score", "must be callable(session, path_id) -> float")
    require(isinstance(max_steps, int) and max_steps >= 0, "max_steps", f"must be an int >= 0, got {max_steps!r}")
    params = params if params is not None else SamplingParams(temperature=1.0)
    next_seed = [seed]

    def seeds(k: int) -> list[int]:
        out = list(range(next_seed[0], next_seed[0] + k))
        next_seed[0] += k
        return out

    live = session.start(prompt, branch, params, chat=chat, seeds=seeds(branch), boundary=boundary)
    finished: list[tuple[float, int]] = []
    rounds = 0
    try:
        while True:
            while any(session.path(i).state == "running" for i in live):
                session.step()
            done = [i for i in live if session.path(i).state == "finished"]
            finished += _scored(session, done, score)
            paused = [i for i in live if session.path(i).state == "paused"]
            if not paused:
                break
            ranked = sorted(_scored(session, paused, score), key=lambda t: (-t[0], t[1]))
            best = [i for _, i in ranked[:keep]]
            for _, i in ranked[keep:]:
                session.stop(i)
            rounds += 1
            if rounds > max_steps:  # no more branching: survivors decode to their end
                for i in best:
                    session.path(i).boundary = ()
                    session.resume(i)
                live = best
                continue
            live = [c for i in best for c in session.fork(i, branch, seeds=seeds(branch))]
    except ValueError:
        for i in live:
            if session.path(i).live:
                session.stop(i)
        raise
    return sorted(finished, key=lambda t: (-t[0], t[1]))
