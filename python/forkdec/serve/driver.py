"""The server's side of the engine: a long-lived `Session` (forkdec.engine.session)
whose live paths belong to many requests, each with its own sampling parameters
and seeds, decoded together one step at a time."""
from __future__ import annotations

from forkdec.engine.session import Session
from forkdec.serve.protocol import GenerationRequest
from forkdec.serve.scheduler import TokenEvent


class EngineDriver:
    """Paths are the session's path ids. A request's choice i is seeded with seed + i."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.session = Session(engine)
        self.want_top: dict[int, int] = {}      # path -> top logprobs asked for
        self.pending: list[TokenEvent] = []     # first tokens, drawn when the paths start

    def _pages(self, r: GenerationRequest) -> int:
        return self.session.pages_for(len(r.prompt_ids), r.n, r.params)

    def never_fits(self, r: GenerationRequest) -> str | None:
        need, total = self._pages(r), self.engine.max_pages
        if need <= total:
            return None
        return (f"{r.n} choices of a {len(r.prompt_ids)}-token prompt with max_tokens {r.params.max_new_tokens} need "
                f"{need * self.engine.page_bytes} bytes of KV; the server's budget is "
                f"{total * self.engine.page_bytes}")

    def fits(self, r: GenerationRequest) -> bool:
        return self._pages(r) <= self.session.pages_available

    def start(self, r: GenerationRequest) -> list[int]:
        reused_before = self.session.prompt_tokens_reused
        ids = self.session.start(r.prompt_ids, r.n, r.params, chat=False, min_tokens=r.min_tokens)
        r.prompt_tokens_reused = self.session.prompt_tokens_reused - reused_before
        for pid in ids:
            if r.logprobs:
                self.want_top[pid] = r.logprobs
            self.pending.append(self._event(pid, last=True))
        return ids

    def step(self) -> list[TokenEvent]:
        events, self.pending = self.pending, []
        for ev in self.session.step():
            events.append(self._event(ev.path, ev.finish_reason is not None, ev))
        return events

    def _event(self, pid: int, last: bool, ev=None) -> TokenEvent:
        p = self.session.path(pid)
        top = None
        k = self.want_top.get(pid, 0)
        if k:
            top = self.session.top_logprobs(pid, k)
        reason = p.finish_reason if not p.live else None
        if reason is not None:
            self.want_top.pop(pid, None)
        return TokenEvent(pid, p.token_ids[-1], p.token_logprobs[-1], top, reason)

    def stop(self, path: int) -> None:
        if self.session.path(path).live:
            self.session.stop(path)
        self.want_top.pop(path, None)
        self.pending = [e for e in self.pending if e.path != path]

    def live_paths(self) -> int:
        return len(self.session.running())

    def kv_bytes_used(self) -> int:
        return self.session.cache.bytes_used

    def prompt_tokens_reused(self) -> int:
        return self.session.prompt_tokens_reused
