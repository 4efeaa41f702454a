"""A scripted stand-in for the engine behind the server: every path spells out a
fixed text one byte-token per step, so the HTTP layer is tested without a model."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from forkdec.serve.protocol import GenerationRequest
from forkdec.serve.scheduler import TokenEvent


@dataclass(eq=False)
class ScriptPath:
    script: list[int]
    max_tokens: int
    stop_ids: set[int]
    done: int = 0
    stopped: bool = False


@dataclass
class ScriptDriver:
    """text(prompt_ids, seed, choice) -> the path's bytes; `capacity`: most live paths at once."""
    capacity: int = 64
    step_delay: float = 0.0
    eos: int = 257
    paths: list[ScriptPath] = field(default_factory=list)
    started: int = 0

    @staticmethod
    def text(prompt_ids: list[int], seed: int | None, choice: int) -> bytes:
        return f"answer {sum(prompt_ids) % 97} seed {seed} choice {choice}. The end".encode()

    def never_fits(self, r: GenerationRequest) -> str | None:
        return None if r.n <= self.capacity else f"{r.n} paths exceed the {self.capacity} the budget holds"

    def fits(self, r: GenerationRequest) -> bool:
        return len(self.paths) + r.n <= self.capacity

    def start(self, r: GenerationRequest) -> list[ScriptPath]:
        self.started += 1
        new = [ScriptPath(list(self.text(r.prompt_ids, r.params.seed, i)) + [self.eos], r.params.max_new_tokens,
                          ({self.eos} - ({self.eos} if r.params.ignore_eos else set())) | set(r.params.stop_token_ids))
               for i in range(r.n)]
        self.paths += new
        return new

    def step(self) -> list[TokenEvent]:
        time.sleep(self.step_delay)
        events = []
        for p in self.paths:
            tok = p.script[p.done % len(p.script)]  # ignore_eos: the script repeats
            p.done += 1
            reason = "stop" if tok in p.stop_ids else ("length" if p.done >= p.max_tokens else None)
            events.append(TokenEvent(p, tok, -0.5, [(tok, -0.5), (65, -1.5)], reason))
        self.paths = [p for p, e in zip(self.paths, events) if e.finish_reason is None]
        return events

    def stop(self, path: ScriptPath) -> None:
        path.stopped = True
        self.paths = [p for p in self.paths if p is not path]

    def live_paths(self) -> int:
        return len(self.paths)

    def kv_bytes_used(self) -> int:
        return 100 * len(self.paths)

    def prompt_tokens_reused(self) -> int:
        return 0
