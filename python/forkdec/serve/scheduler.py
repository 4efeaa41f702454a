"""Continuous batching for the server: one thread owns the engine and runs its steps.

Requests arrive from the HTTP handlers (any thread or event loop) through
`submit`; each becomes n live paths of the engine's batch at the next step
after its pages fit the KV budget, and leaves it path by path as choices
finish. Requests that do not fit wait in a bounded FIFO; past its bound,
`submit` raises `Overloaded` (the app answers 429). A request whose client
went away is cancelled: its paths are stopped and their pages freed before
the next step.

The engine is reached through a `Driver` (serve/driver.py): start a prompt's
paths, run one step of every live path, stop a path.
"""
from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from forkdec.serve.protocol import GenerationRequest


@dataclass
class TokenEvent:
    """One new token of one path (path: the driver's handle), or its end (finish_reason set)."""
    path: Any
    token_id: int | None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None


class Driver(Protocol):
    def never_fits(self, request: GenerationRequest) -> str | None: ...  # why it cannot fit even alone
    def fits(self, request: GenerationRequest) -> bool: ...          # could its paths start now?
    def start(self, request: GenerationRequest) -> list[Any]: ...    # its n paths, in choice order
    def step(self) -> list[TokenEvent]: ...                           # one token of every live path
    def stop(self, path: Any) -> None: ...                            # end a path, free its pages
    def live_paths(self) -> int: ...
    def kv_bytes_used(self) -> int: ...
    def prompt_tokens_reused(self) -> int: ...


class Overloaded(Exception):
    """The waiting queue is full."""


@dataclass
class Ticket:
    """A submitted request as the scheduler thread sees it; `emit` is called (from the
    scheduler thread) with ("token", choice, TokenEvent), ("done", None, None) or ("error", None, exc)."""
    request: GenerationRequest
    emit: Callable[[str, int | None, Any], None]
    paths: list[Any] = field(default_factory=list)
    open_choices: int = 0
    cancelled: bool = False
    submitted: float = field(default_factory=time.perf_counter)


@dataclass
class Counters:
    requests_total: int = 0
    requests_rejected: int = 0
    generated_tokens: int = 0
    steps: int = 0
    step_seconds: float = 0.0


class Scheduler:
    """The engine's thread. `max_waiting`: most requests queued for admission before 429."""

    def __init__(self, driver: Driver, max_waiting: int = 64) -> None:
        self.driver, self.max_waiting = driver, max_waiting
        self.waiting: collections.deque[Ticket] = collections.deque()
        self.running: dict[int, Ticket] = {}  # id(ticket) -> ticket
        self.by_path: dict[Any, tuple[Ticket, int]] = {}  # path handle (hashable) -> (ticket, choice)
        self.counters = Counters()
        self.engine_figures = {"live_paths": 0, "kv_bytes_used": 0, "prompt_tokens_reused": 0}
        self.cv = threading.Condition()
        self.closing = False
        self.thread = threading.Thread(target=self._loop, name="forkdec-scheduler", daemon=True)
        self.thread.start()

    # ---- called from request handlers ----------------------------------------------------------
    def submit(self, request: GenerationRequest, emit: Callable[[str, int | None, Any], None]) -> Ticket:
        ticket = Ticket(request, emit)
        with self.cv:
            if len(self.waiting) >= self.max_waiting:
                self.counters.requests_rejected += 1
                raise Overloaded(f"{len(self.waiting)} requests are already waiting")
            self.counters.requests_total += 1
            self.waiting.append(ticket)
            self.cv.notify()
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        with self.cv:
            ticket.cancelled = True
            self.cv.notify()

    def close(self) -> None:
        with self.cv:
            self.closing = True
            self.cv.notify()
        self.thread.join(timeout=30)

    def snapshot(self) -> dict[str, float]:
        """Counters and gauges for /metrics. The engine's figures are read by the scheduler
        thread after each step (the engine is not read from other threads)."""
        with self.cv:
            c = self.counters
            return {"running_requests": len(self.running), "waiting_requests": len(self.waiting),
                    **self.engine_figures, "requests_total": c.requests_total,
                    "requests_rejected": c.requests_rejected, "generated_tokens": c.generated_tokens,
                    "steps": c.steps, "step_seconds": c.step_seconds}

    # ---- the scheduler thread ------------------------------------------------------------------
    # The engine is touched only here, outside the lock: a prefill or a step never blocks the
    # HTTP handlers' submit/cancel (which take the lock for the queue only).
    def _loop(self) -> None:
        while True:
            with self.cv:
                while not self.closing and not self.waiting and not self.running:
                    self.cv.wait()
                if self.closing:
                    break
            self._drop_cancelled()
            self._admit()
            if not self.running:
                with self.cv:  # nothing fits yet: wait for a cancel, a new request or close
                    self.cv.wait(timeout=0.05)
                continue
            t = time.perf_counter()
            try:
                events = self.driver.step()
            except Exception as e:  # an engine failure ends the running requests, not the server
                self._fail_running(e, waiting_too=False)
                continue
            with self.cv:
                self.counters.steps += 1
                self.counters.step_seconds += time.perf_counter() - t
            self._dispatch(events)
            self._read_engine()
        self._fail_running(RuntimeError("the server is shutting down"))

    def _read_engine(self) -> None:
        figures = {"live_paths": self.driver.live_paths(), "kv_bytes_used": self.driver.kv_bytes_used(),
                   "prompt_tokens_reused": self.driver.prompt_tokens_reused()}
        with self.cv:
            self.engine_figures = figures

    def _next_waiting(self) -> Ticket | None:
        with self.cv:
            while self.waiting and self.waiting[0].cancelled:
                self.waiting.popleft()
            return self.waiting[0] if self.waiting else None

    def _admit(self) -> None:
        """Start waiting requests in arrival order while their pages fit."""
        while (ticket := self._next_waiting()) is not None:
            fits = self.driver.fits(ticket.request)
            if not fits and self.running:
                return  # running paths will free pages
            with self.cv:
                self.waiting.popleft()
            if not fits:  # nothing runs and it still does not fit: it never will
                ticket.emit("error", None, MemoryError("the request does not fit the KV budget"))
                continue
            try:
                ticket.paths = self.driver.start(ticket.request)
            except Exception as e:
                ticket.emit("error", None, e)
                continue
            ticket.open_choices = len(ticket.paths)
            with self.cv:
                self.running[id(ticket)] = ticket
            for choice, path in enumerate(ticket.paths):
                self.by_path[path] = (ticket, choice)
        self._read_engine()

    def _drop_cancelled(self) -> None:
        for key, ticket in list(self.running.items()):
            if ticket.cancelled:
                for path in ticket.paths:
                    if path in self.by_path:
                        self.driver.stop(path)
                        del self.by_path[path]
                with self.cv:
                    del self.running[key]

    def _dispatch(self, events: list[TokenEvent]) -> None:
        for ev in events:
            owner = self.by_path.get(ev.path)
            if owner is None:
                continue
            ticket, choice = owner
            if ev.token_id is not None:
                self.counters.generated_tokens += 1  # (a plain int: the GIL keeps it whole)
            ticket.emit("token", choice, ev)
            if ev.finish_reason is not None:
                del self.by_path[ev.path]
                ticket.open_choices -= 1
                if ticket.open_choices == 0:
                    with self.cv:
                        self.running.pop(id(ticket), None)
                    ticket.emit("done", None, None)

    def _fail_running(self, error: Exception, waiting_too: bool = True) -> None:
        with self.cv:
            tickets = list(self.running.values()) + (list(self.waiting) if waiting_too else [])
            self.running.clear()
            if waiting_too:
                self.waiting.clear()
        for ticket in tickets:
            for path in ticket.paths:
                if path in self.by_path:
                    try:
                        self.driver.stop(path)
                    except Exception:
                        pass
                    del self.by_path[path]
            ticket.emit("error", None, error)
