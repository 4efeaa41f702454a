"""The server's side of the engine: one long-lived `Session` (forkdec.engine.session)
whose live paths belong to many requests, each with its own sampling parameters
and seeds, decoded together one step at a time."""
from __future__ import annotations

from forkdec.engine.session import Session
from forkdec.serve.protocol import GenerationRequest
from forkdec.serve.scheduler import TokenEvent


class EngineDriver:
    """Paths are the session's path ids. A request's choice i draws from a generator
    seeded with seed + i, so a seeded request gives the same choices whatever else runs."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.session = Session(engine)
        self.pending: list[TokenEvent] = []  # first tokens, drawn when their paths start

    def never_fits(self, r: GenerationRequest) -> str | None:
        need, total = self.session.pages_for(len(r.prompt_ids), r.n, r.params), self.engine.max_pages
        if need <= total:
            return None
        pb = self.engine.page_bytes
        return (f"{r.n} choices of a {len(r.prompt_ids)}-token prompt with max_tokens {r.params.max_new_tokens} "
                f"need {need * pb} bytes of KV; the server's budget holds {total * pb}")

    def fits(self, r: GenerationRequest) -> bool:
        return self.session.pages_for(len(r.prompt_ids), r.n, r.params) <= self.session.pages_available

    def start(self, r: GenerationRequest) -> list[int]:
        before = self.session.reused_tokens
        ids = self.session.start(r.prompt_ids, r.n, r.params, chat=False)
        r.prompt_tokens_reused = self.session.reused_tokens - before
        self.pending += [self._event(pid) for pid in ids]
        return ids

    def step(self) -> list[TokenEvent]:
        events, self.pending = self.pending, []
        return events + [self._event(ev.path) for ev in self.session.step()]

    def _event(self, pid: int) -> TokenEvent:
        p = self.session.path(pid)
        ev = TokenEvent(pid, p.token_ids[-1], p.token_logprobs[-1],
                        p.top_logprobs[-1] if p.params.top_logprobs else None, p.finish_reason)
        if not p.live:
            self.session.forget(pid)
        return ev

    def stop(self, path: int) -> None:
        if path in self.session.paths:
            if self.session.path(path).live:
                self.session.stop(path)
            self.session.forget(path)
        self.pending = [e for e in self.pending if e.path != path]

    def live_paths(self) -> int:
        return len(self.session.running())

    def kv_bytes_used(self) -> int:
        return self.session.cache.bytes_used

    def prompt_tokens_reused(self) -> int:
        return self.session.reused_tokens
