"""A bounded load generator for OpenAI-compatible servers: C concurrent clients, each
sending chat completions with n choices, streamed, and timing every chunk.

Used by bench/serve.py for forkdec and its peer alike (the same client and load).
A server that ignores `n` (answers fewer choices than asked) is sent the missing
choices as further requests, one after another, as its users must.
"""
from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass, field

import httpx


@dataclass
class RequestTiming:
    start: float
    first_token: float | None = None
    chunk_times: dict[int, list[float]] = field(default_factory=dict)  # choice -> one time per token chunk
    completion_tokens: int = 0
    choices: int = 0
    error: str | None = None
    follow_up: bool = False  # asked again for a choice the server left out of a request with n > 1


@dataclass
class LoadResult:
    clients: int
    n: int
    seconds: float
    timings: list[RequestTiming]

    @property
    def ok(self) -> list[RequestTiming]:
        return [t for t in self.timings if t.error is None]

    def summary(self) -> dict[str, float]:
        ok = self.ok
        ttft = [t.first_token - t.start for t in ok if t.first_token is not None and not t.follow_up]
        gaps = [b - a for t in ok for ts in t.chunk_times.values() for a, b in zip(ts, ts[1:])]
        tokens = sum(t.completion_tokens for t in ok)
        asked = [t for t in ok if not t.follow_up]  # the requests the clients made, as a user sees them
        return {"requests": len(asked), "errors": len(self.timings) - len(ok), "seconds": self.seconds,
                "requests_per_s": len(asked) / self.seconds, "tokens": tokens, "tokens_per_s": tokens / self.seconds,
                "ttft_p50": _pct(ttft, 50), "ttft_p90": _pct(ttft, 90),
                "itl_p50": _pct(gaps, 50), "itl_p90": _pct(gaps, 90)}


def _pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    if len(xs) == 1:
        return xs[0]
    return statistics.quantiles(xs, n=100, method="inclusive")[int(p) - 1]


async def _one(client: httpx.AsyncClient, url: str, body: dict) -> RequestTiming:
    t = RequestTiming(time.perf_counter())
    seen: set[int] = set()
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                t.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return t
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                for ch in chunk.get("choices", []):
                    index = ch.get("index", 0)
                    delta = ch.get("delta") or {}
                    if "role" in delta or (not delta.get("content") and ch.get("finish_reason")):
                        continue  # a stream's opening chunk, or a closing one without text: no token
                    seen.add(index)  # a choice counts once it carries tokens
                    now = time.perf_counter()
                    t.first_token = t.first_token or now
                    t.chunk_times.setdefault(index, []).append(now)
                    t.completion_tokens += 1  # replaced by the server's own count when it sends usage
                if chunk.get("usage"):
                    t.completion_tokens = chunk["usage"]["completion_tokens"]
    except httpx.HTTPError as e:
        t.error = f"{type(e).__name__}: {e}"
    t.choices = len(seen)
    return t


async def _client(url: str, queue: asyncio.Queue, n: int, max_tokens: int, model: str, out: list[RequestTiming],
                  deadline: float) -> None:
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as client:
        while time.perf_counter() < deadline:
            try:
                question, seed = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            body = {"model": model, "messages": [{"role": "user", "content": question}], "n": n,
                    "max_tokens": max_tokens, "temperature": 0.7, "seed": seed, "stream": True,
                    "stream_options": {"include_usage": True}}
            t = await _one(client, url, body)
            out.append(t)
            missing = n - t.choices if t.error is None else 0
            for k in range(missing):  # a server that ignores n: ask again for each missing choice
                if time.perf_counter() >= deadline:
                    break
                extra = await _one(client, url, {**body, "n": 1, "seed": seed * 1000 + k + 1})
                extra.follow_up = True
                out.append(extra)


def run_load(url: str, model: str, questions: list[str], clients: int, n: int, max_tokens: int,
             max_seconds: float) -> LoadResult:
    """Send every question once (seeded), `clients` at a time; stop starting new ones after max_seconds."""
    async def main() -> LoadResult:
        queue: asyncio.Queue = asyncio.Queue()
        for i, q in enumerate(questions):
            queue.put_nowait((q, i))
        out: list[RequestTiming] = []
        t0 = time.perf_counter()
        await asyncio.gather(*(_client(url, queue, n, max_tokens, model, out, t0 + max_seconds)
                               for _ in range(clients)))
        return LoadResult(clients, n, time.perf_counter() - t0, out)
    return asyncio.run(main())
