"""When a path ends: stop token ids, stop strings, or its token budget."""
from __future__ import annotations

from typing import Protocol

from forkdec.engine.params import SamplingParams


class Detokenizer(Protocol):
    def decode(self, ids: list[int], skip_special: bool = True) -> str: ...


class StopChecker:
    """Checks one new token of a path; stop strings are searched only in the
    decoded tail of the path, wide enough to hold the longest stop string, so
    each check costs O(longest stop string), not O(path length)."""

    def __init__(self, params: SamplingParams, eos_ids: set[int], tokenizer: Detokenizer) -> None:
        self.stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_ids))
        self.stop = params.stop
        self.max_new = params.max_new_tokens
        self.min_new = params.min_tokens
        self.tokenizer = tokenizer
        # A character is at most 4 bytes, so at most 4 byte-level tokens; +2 for a partial one on each side.
        self.window = 4 * max((len(s) for s in self.stop), default=0) + 2

    def check(self, ids: list[int]) -> str | None:
        """Finish reason after the path's latest token `ids[-1]`, or None to go on."""
        if len(ids) < self.min_new:  # min_tokens: nothing but the budget ends a path before then
            return "length" if len(ids) >= self.max_new else None
        if ids[-1] in self.stop_ids:
            return "stop"
        if self.stop:
            tail = self.tokenizer.decode(ids[-self.window:], skip_special=False)
            if any(s in tail for s in self.stop):
                return "stop"
        return "length" if len(ids) >= self.max_new else None

    def final_text(self, ids: list[int]) -> str:
        """The path's text, cut before the first stop string."""
        text = self.tokenizer.decode(ids, skip_special=True)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=len(text))
        return text[:cut]
