"""Incremental text of one choice: what may be sent to a streaming client now.

A streamed choice must concatenate to exactly the text the same request gives
without streaming: the path's decoded tokens cut before the first stop string.
Two things make a naive per-token decode wrong: a token can end inside a UTF-8
character (the decoder then shows U+FFFD until the next token completes it),
and the text just decoded may be the beginning of a stop string that the next
token completes, so it must not be sent until that is ruled out.
"""
from __future__ import annotations

from typing import Protocol, Sequence


class Detokenizer(Protocol):
    def decode(self, ids: list[int], skip_special: bool = True) -> str: ...


def final_text(text: str, stop: Sequence[str]) -> str:
    """`text` cut before the first occurrence of any stop string (the engine's rule)."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    return text[:cut]


def _held_back(text: str, stop: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
    best = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class TextStream:
    """Text deltas of one choice as its tokens arrive.

    push(ids) takes all of the choice's token ids so far and returns the text
    that became safe to send; finish(ids) returns the rest of the final text.
    The concatenation of every delta equals final_text(decode(ids), stop).
    """

    def __init__(self, tokenizer: Detokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer, self.stop = tokenizer, tuple(stop)
        self.sent = 0  # characters of the final text already sent

    def push(self, ids: list[int]) -> str:
        full = self.tokenizer.decode(ids, skip_special=True)
        text = final_text(full, self.stop)
        if len(text) < len(full):
            return ""  # a stop string matched: the engine finishes the path; finish() sends the rest
        end = len(text) - _held_back(text, self.stop)
        while end > self.sent and text[end - 1] == "\ufffd":  # an unfinished UTF-8 character
            end -= 1
        return self._take(text, end)

    def finish(self, ids: list[int]) -> str:
        text = final_text(self.tokenizer.decode(ids, skip_special=True), self.stop)
        return self._take(text, len(text))

    def _take(self, text: str, end: int) -> str:
        if end <= self.sent:
            return ""
        delta, self.sent = text[self.sent:end], end
        return delta
