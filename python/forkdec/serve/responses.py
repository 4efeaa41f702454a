"""OpenAI response bodies: whole responses and streamed chunks, built from the token events of each choice."""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from forkdec.serve.scheduler import TokenEvent
from forkdec.serve.textstream import TextStream, final_text


@dataclass
class Choice:
    """One choice's tokens as they arrive, and the text that may be streamed."""
    stream: TextStream
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    finish_reason: str | None = None
    finish_order: int = -1

    def add(self, ev: TokenEvent) -> str:
        """Take one event; returns the text delta that became safe to send."""
        if ev.token_id is not None:
            self.token_ids.append(ev.token_id)
            self.logprobs.append(ev.logprob if ev.logprob is not None else 0.0)
            self.top_logprobs.append(ev.top_logprobs or [])
        if ev.finish_reason is not None:
            self.finish_reason = ev.finish_reason
            return self.stream.finish(self.token_ids)
        return self.stream.push(self.token_ids)

    @property
    def text(self) -> str:
        return final_text(self.stream.tokenizer.decode(self.token_ids, skip_special=True), self.stream.stop)

    @property
    def cumulative_logprob(self) -> float:
        return float(sum(self.logprobs))


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def token_text(tokenizer: Any, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special=False)


def completion_logprobs(tokenizer: Any, c: Choice, start: int, stop: int | None = None,
                        offset: int = 0) -> dict[str, Any]:
    """/v1/completions `logprobs` for tokens [start, stop) of a choice."""
    ids = c.token_ids[start:stop]
    tokens = [token_text(tokenizer, t) for t in ids]
    offsets, pos = [], offset
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    tops = [{token_text(tokenizer, i): lp for i, lp in top} for top in c.top_logprobs[start:stop]]
    return {"tokens": tokens, "token_logprobs": c.logprobs[start:stop],
            "top_logprobs": tops if any(c.top_logprobs[start:stop]) else None, "text_offset": offsets}


def chat_logprobs(tokenizer: Any, c: Choice, start: int, stop: int | None = None) -> dict[str, Any]:
    """/v1/chat/completions `logprobs` for tokens [start, stop) of a choice."""
    def entry(tid: int, lp: float) -> dict[str, Any]:
        s = token_text(tokenizer, tid)
        return {"token": s, "logprob": lp, "bytes": list(s.encode())}
    return {"content": [{**entry(t, lp), "top_logprobs": [entry(i, v) for i, v in top]}
                        for t, lp, top in zip(c.token_ids[start:stop], c.logprobs[start:stop],
                                              c.top_logprobs[start:stop])]}


def usage(prompt_tokens: int, choices: list[Choice], reused: int) -> dict[str, Any]:
    """Prompt tokens counted once per prompt however many choices read them (forkdec stores them once);
    `prompt_tokens_details.cached_tokens` is what the prefix cache already held."""
    completion = sum(len(c.token_ids) for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": reused}}
