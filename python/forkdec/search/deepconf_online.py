"""DeepConf online (Fu et al., arXiv 2508.15260) on a Session: warm-up paths set a
confidence threshold, later paths stop as soon as their group confidence falls
below it, and sampling ends once the confidence-weighted vote reaches consensus.

The signals come from the sampler (SamplingParams.confidence_k = 20: the token
confidence of every drawn token, fused into the sampling kernel), and the tests
on them are forkdec.strategies.deepconf's, so the online run and the offline
replay (`simulate_online`) apply the same rule. The prompt is prefilled once:
the second phase's paths start from the prompt's pages in the prefix cache (only
its partial last page, under one page of tokens, runs through the model again).

`deepconf_online` runs one prompt; `deepconf_online_many` runs several prompts'
searches side by side in one Session, so every step decodes the live paths of
all of them in one forward (an evaluation over many questions).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Sequence

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


class OnlineSearch:
    """One prompt's DeepConf online search, advanced between the Session's steps.

    `advance()` starts the paths the search wants now (as far as the KV budget allows)
    and applies the stopping rule to what the last step decoded; it returns True once
    the search is over (then `result()`). Arguments as `deepconf_online`'s.
    """

    def __init__(self, session, prompt, n: int, params: SamplingParams, *, keep: float = 10.0,
                 warmup: int | None = None, window: int = DEFAULT_WINDOW, tau: float | None = 0.95,
                 batch: int | None = None, chat: bool = True) -> None:
        require(isinstance(n, int) and not isinstance(n, bool) and n >= 2, "n", f"must be an int >= 2, got {n!r}")
        warmup = max(2, n // 8) if warmup is None else warmup
        require(isinstance(warmup, int) and 1 <= warmup < n, "warmup", f"must be in 1..{n - 1}, got {warmup!r}")
        batch = n - warmup if batch is None else batch
        require(isinstance(batch, int) and batch >= 1, "batch", f"must be an int >= 1, got {batch!r}")
        require(isinstance(window, int) and window >= 1, "window", f"must be an int >= 1, got {window!r}")
        require(isinstance(keep, (int, float)) and 0 < keep < 100, "keep", f"must be in (0, 100), got {keep!r}")
        self.session, self.n = session, n
        self.params = params if params.confidence_k else replace(params, confidence_k=20)
        self.keep, self.warmup, self.window, self.tau, self.batch = keep, warmup, window, tau, batch
        self.threshold = math.nan
        self.paths: list[int] = []
        self.live: list[int] = []
        self.stopped: list[int] = []
        self.voters: dict[int, float] = {}   # the final vote: kept warm-up paths, later finished ones
        self.pool: dict[int, float] = {}     # the consensus test: every warm-up path, later finished ones
        self.consensus_stop = False
        self.phase = "warmup"  # "warmup" -> "search" -> "done"
        self._texts: dict[int, str] = {}
        require(not isinstance(prompt, str) or prompt.strip() != "", "prompt", "is empty")
        # tokenized once: every start of this search passes the same ids
        self.prompt_ids = session.engine.encode(prompt, chat=chat) if isinstance(prompt, str) else list(prompt)
        require(len(self.prompt_ids) > 0, "prompt", "has no tokens")

    # ---- the rule -------------------------------------------------------------------------------
    def _confidences(self, pid: int) -> list[float]:
        return self.session.path(pid).token_confidences

    def _text(self, pid: int) -> str:  # only finished paths are asked, so their text is kept
        if pid not in self._texts:
            p = self.session.path(pid)
            self._texts[pid] = p.stop.final_text(p.token_ids)
        return self._texts[pid]

    def _votes(self, weights: dict[int, float]) -> dict[str, float]:
        ids = sorted(weights)
        return weighted_votes({i: _Text(self._text(i)) for i in ids}, ids, [weights[i] for i in ids],
                              extract_answer)

    def _check(self, ids: list[int]) -> bool:
        """Stop the paths whose last full window fell below the threshold; finished ones
        vote. True if any path voted."""
        voted = False
        for pid in ids:
            p = self.session.path(pid)
            if p.live and should_stop(p.token_confidences, self.threshold, self.window):
                self.session.stop(pid, "stopped")
                self.stopped.append(pid)
            if not self.session.path(pid).live:
                self.live.remove(pid)
                if pid not in self.stopped:
                    self.voters[pid] = self.pool[pid] = lowest_group_confidence(self._confidences(pid), self.window)
                    voted = True
        return voted

    # ---- driving --------------------------------------------------------------------------------
    def _fits(self, k: int) -> bool:
        return self.session.pages_available >= self.session.pages_for(len(self.prompt_ids), k, self.params)

    def _start(self, k: int, force: bool) -> list[int]:
        """Start up to k paths (fewer if the budget is short, none if nothing fits and not force)."""
        while k > 1 and not self._fits(k):
            k -= 1
        if not force and not self._fits(k):
            return []
        seed = self.params.seed
        first = len(self.paths)
        new = self.session.start(self.prompt_ids, k, self.params,
                                 seeds=None if seed is None else [seed + first + i for i in range(k)])
        self.paths += new
        self.live += new
        return new

    def advance(self, force: bool = False) -> bool:
        """Apply the rule to the last step and start what is wanted now; True once done.
        force: start a path even if the budget looks short (nothing else would free pages)."""
        if self.phase == "warmup":
            if len(self.paths) < self.warmup:
                self._start(self.warmup - len(self.paths), force)
            self.live = [i for i in self.live if self.session.path(i).live]
            if self.live or len(self.paths) < self.warmup:
                return False
            scores = {i: lowest_group_confidence(self._confidences(i), self.window) for i in self.paths}
            self.threshold = deepconf_threshold(list(scores.values()), self.keep)
            count = max(1, math.ceil(self.warmup * self.keep / 100))
            self.voters = {i: scores[i] for i in sorted(self.paths, key=lambda i: -scores[i])[:count]}
            self.pool = {i: c for i, c in scores.items() if math.isfinite(c)}
            self.phase = "search"
        if self.phase == "search":
            # consensus is tested after a later path finishes (the paper's Algorithm 2), over
            # every warm-up path and the later finished ones
            voted = self._check(list(self.live))
            while True:
                if voted and self.tau is not None and consensus_reached(self._votes(self.pool), self.tau):
                    self.consensus_stop = True
                    break
                voted = False
                if len(self.paths) < self.n and len(self.live) < self.batch:
                    new = self._start(min(self.batch - len(self.live), self.n - len(self.paths)),
                                      force and not self.live)
                    voted = self._check(new)  # a first token may already end a window below the threshold
                    if new and not self.live:
                        continue
                if self.live or len(self.paths) < self.n:
                    return False
                break
            for pid in self.live:  # consensus reached: the paths still decoding end here
                self.session.stop(pid, "stopped")
                self.stopped.append(pid)
            self.live = []
            self.phase = "done"
        return True

    def result(self) -> DeepConfRun:
        require(self.phase == "done", "search", "has not finished")
        final = self._votes(self.voters)
        name = f"deepconf-online-{self.keep:g}"
        order = [self.paths.index(i) for i in sorted(self.voters)]
        if final:
            winner = max(final, key=lambda a: final[a])
            chosen = max((i for i in self.voters if extract_answer(self._text(i)) == winner),
                         key=lambda i: self.voters[i])
            vote = Vote(winner, {a: round(w, 6) for a, w in final.items()}, self.paths.index(chosen), name, order)
        else:
            vote = Vote(None, {}, None, name, order)
        tokens = sum(len(self.session.path(i).token_ids) for i in self.paths)
        return DeepConfRun(vote, self.threshold, list(self.paths), list(self.stopped), tokens,
                           self.n - len(self.paths), self.consensus_stop)


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
    search = OnlineSearch(session, prompt, n, params, keep=keep, warmup=warmup, window=window, tau=tau,
                          batch=batch, chat=chat)
    return deepconf_online_many(session, [search])[0]


def deepconf_online_many(session, searches: Sequence[OnlineSearch],
                         progress: Callable[[int, int], None] | None = None) -> list[DeepConfRun]:
    """Run several prompts' searches side by side: each step decodes every live path of
    all of them in one forward. Searches join in order while their warm-up paths fit the
    KV budget (the first always joins when nothing runs); progress(done, total) is
    called as each one ends."""
    waiting, active, done = list(searches), [], 0
    while waiting or active:
        while waiting and waiting[0]._start(waiting[0].warmup, force=not active):
            active.append(waiting.pop(0))
        idle = not session.running()
        for s in list(active):
            if s.advance(force=idle):  # when idle, every unfinished search starts a path
                active.remove(s)
                done += 1
                if progress is not None:
                    progress(done, len(searches))
        if session.running():
            session.step()
    return [s.result() for s in searches]
