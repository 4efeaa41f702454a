"""Progress reports during `generate`, and a tiny terminal progress bar."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import TextIO


@dataclass(frozen=True)
class Progress:
    """Passed to `generate(progress=...)` after prefill and after every decode step."""
    finished_paths: int
    total_paths: int
    running_paths: int
    generated_tokens: int
    elapsed_seconds: float
    kv_pages_used: int
    kv_pages_total: int

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.elapsed_seconds if self.elapsed_seconds > 0 else 0.0


class ProgressBar:
    """Redraws one status line on `stream` (at most every `interval` seconds);
    draws nothing when the stream is not a terminal, so logs stay clean."""

    def __init__(self, stream: TextIO | None = None, width: int = 30, interval: float = 0.1,
                 force: bool = False) -> None:
        self.stream = stream or sys.stderr
        self.width = width
        self.interval = interval
        self.enabled = force or (hasattr(self.stream, "isatty") and self.stream.isatty())
        self._last = 0.0
        self._drawn = False

    def __call__(self, p: Progress) -> None:
        now = time.monotonic()
        final = p.finished_paths == p.total_paths
        if not self.enabled or (now - self._last < self.interval and not final):
            return
        self._last = now
        filled = self.width * p.finished_paths // max(1, p.total_paths)
        bar = "#" * filled + "." * (self.width - filled)
        self.stream.write(f"\r[{bar}] {p.finished_paths}/{p.total_paths} paths  {p.running_paths} running  "
                          f"{p.generated_tokens} tok  {p.tokens_per_second:.1f} tok/s  "
                          f"KV {p.kv_pages_used}/{p.kv_pages_total} pages ")
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        """End the status line so later output starts on a fresh line."""
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False
