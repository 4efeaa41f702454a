"""The OpenAI-compatible HTTP app: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics.

Errors are OpenAI's JSON shape, {"error": {"message", "type", "param", "code"}},
with 400 for a bad field (named in `param` and the message), 404 for an unknown
model, 413 for a request larger than the whole KV budget, 429 when the waiting
queue is full, 503 while shutting down. Nothing a client sends crashes the server.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from forkdec.serve.metrics import metrics_registry, render
from forkdec.serve.protocol import ChatCompletionRequest, CompletionRequest, GenerationRequest, RequestError
from forkdec.serve.responses import Choice, chat_logprobs, completion_logprobs, new_id, now, usage
from forkdec.serve.scheduler import Overloaded, Scheduler, TokenEvent
from forkdec.serve.service import Service
from forkdec.serve.textstream import TextStream


def error_response(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                   code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


def _validation_error(e: ValidationError) -> RequestError:
    first = e.errors()[0]
    param = ".".join(str(p) for p in first["loc"]) or None
    return RequestError(param, first["msg"])


class _Call:
    """One HTTP request in flight: its prompts' tickets and their choices."""

    def __init__(self, service: Service, gens: list[GenerationRequest], stops: tuple[str, ...]) -> None:
        self.service, self.gens = service, gens
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.choices = [[Choice(TextStream(service.tokenizer, stops)) for _ in range(g.n)] for g in gens]
        self.tickets = []
        self.finished = [0] * len(gens)

    def submit(self, scheduler: Scheduler) -> None:
        for gi, g in enumerate(self.gens):
            def emit(kind: str, choice: int | None, payload: Any, gi: int = gi) -> None:
                self.loop.call_soon_threadsafe(self.events.put_nowait, (gi, kind, choice, payload))
            try:
                self.tickets.append(scheduler.submit(g, emit))
            except Overloaded:
                self.cancel(scheduler)
                raise

    def cancel(self, scheduler: Scheduler) -> None:
        for t in self.tickets:
            scheduler.cancel(t)

    async def events_until_done(self) -> AsyncIterator[tuple[int, int, str, TokenEvent]]:
        """(prompt index, choice, text delta, event) for every token; raises what the engine raised."""
        done = 0
        while done < len(self.gens):
            gi, kind, choice, payload = await self.events.get()
            if kind == "error":
                raise payload
            if kind == "done":
                done += 1
                continue
            c = self.choices[gi][choice]
            delta = c.add(payload)
            if payload.finish_reason is not None:
                c.finish_order = self.finished[gi]
                self.finished[gi] += 1
            yield gi, choice, delta, payload

    def usage(self) -> dict[str, Any]:
        flat = [c for cs in self.choices for c in cs]
        return usage(sum(len(g.prompt_ids) for g in self.gens), flat,
                     sum(g.prompt_tokens_reused for g in self.gens))

    def votes(self, strategy: str | None) -> list[dict[str, Any]] | None:
        if strategy is None:
            return None
        from forkdec.strategies import STRATEGIES, first_finish

        out = []
        for cs in self.choices:
            paths = [_VotePath(c) for c in cs]
            v = first_finish(paths, max(1, len(paths) // 4)) if strategy == "first-finish" else STRATEGIES[strategy](paths)
            out.append({"strategy": strategy, "answer": v.answer, "votes": v.votes, "chosen": v.chosen})
        return out


class _VotePath:
    """A finished choice as forkdec.strategies reads a path."""

    def __init__(self, c: Choice) -> None:
        self.text, self.token_ids, self.finish_reason = c.text, c.token_ids, c.finish_reason or "stop"
        self.cumulative_logprob, self.finish_order = c.cumulative_logprob, c.finish_order

    @property
    def mean_logprob(self) -> float:
        return self.cumulative_logprob / max(1, len(self.token_ids))


def create_app(service: Service) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        service.close()

    app = FastAPI(title="forkdec", description="OpenAI-compatible server: n choices of a prompt share its KV",
                  lifespan=lifespan)
    scheduler = service.scheduler
    registry = metrics_registry(scheduler.snapshot)

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, e: RequestError) -> JSONResponse:
        return error_response(e.status, str(e), e.param, e.kind)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": service.model_name, "object": "model", "created": service.created,
                                            "owned_by": "forkdec", "max_model_len": service.context}]}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(render(registry), media_type="text/plain; version=0.0.4")

    async def parse(request: Request, schema: type) -> Any:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(None, f"the body is not valid JSON ({e})")
        if not isinstance(body, dict):
            raise RequestError(None, "the body must be a JSON object")
        try:
            req = schema.model_validate(body)
        except ValidationError as e:
            raise _validation_error(e) from None
        req.refuse_unsupported()
        if req.model != service.model_name:
            raise RequestError("model", f"the model {req.model!r} does not exist; this server serves "
                               f"{service.model_name!r}", status=404, kind="not_found_error")
        return req

    async def run(request: Request, req: Any, gens: list[GenerationRequest], chat: bool) -> Response:
        stops = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        call = _Call(service, gens, stops)
        try:
            call.submit(scheduler)
        except Overloaded as e:
            return error_response(429, f"server busy: {e}; retry later", kind="rate_limit_error")
        if req.stream:
            return StreamingResponse(_stream(call, req, chat), media_type="text/event-stream")
        watcher = asyncio.create_task(_watch_disconnect(request, call))
        try:
            async for _ in call.events_until_done():
                pass
        except MemoryError as e:
            return error_response(413, str(e), "max_tokens")
        except Exception as e:
            return error_response(500, f"engine error: {e}", kind="server_error")
        finally:
            watcher.cancel()
        return JSONResponse(_whole(call, req, chat))

    async def _watch_disconnect(request: Request, call: _Call) -> None:
        while True:
            if await request.is_disconnected():
                call.cancel(scheduler)
                return
            await asyncio.sleep(0.1)

    def _whole(call: _Call, req: Any, chat: bool) -> dict[str, Any]:
        tok = service.tokenizer
        choices = []
        for gi, cs in enumerate(call.choices):
            for i, c in enumerate(cs):
                index = call.gens[gi].first_index + i
                if chat:
                    lp = chat_logprobs(tok, c, 0) if req.logprobs else None
                    choices.append({"index": index, "message": {"role": "assistant", "content": c.text},
                                    "logprobs": lp, "finish_reason": c.finish_reason})
                else:
                    lp = completion_logprobs(tok, c, 0) if req.logprobs is not None else None
                    choices.append({"index": index, "text": c.text, "logprobs": lp, "finish_reason": c.finish_reason})
        body = {"id": new_id("chatcmpl" if chat else "cmpl"), "object": "chat.completion" if chat else "text_completion",
                "created": now(), "model": service.model_name, "choices": choices, "usage": call.usage()}
        votes = call.votes(req.vote)
        if votes is not None:
            body["forkdec"] = {"votes": votes}
        return body

    async def _stream(call: _Call, req: Any, chat: bool) -> AsyncIterator[str]:
        rid, created, tok = new_id("chatcmpl" if chat else "cmpl"), now(), service.tokenizer
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
            return "data: " + json.dumps({"id": rid, "object": kind, "created": created, "model": service.model_name,
                                          "choices": choices, **extra}) + "\n\n"
        try:
            if chat:
                yield chunk([{"index": g.first_index + i, "delta": {"role": "assistant", "content": ""},
                              "logprobs": None, "finish_reason": None} for g in call.gens for i in range(g.n)])
            async for gi, i, delta, ev in call.events_until_done():
                c, index = call.choices[gi][i], call.gens[gi].first_index + i
                k = len(c.token_ids)
                has_token = ev.token_id is not None
                if chat:
                    lp = chat_logprobs(tok, c, k - 1, k) if req.logprobs and has_token else None
                    yield chunk([{"index": index, "delta": {"content": delta} if delta else {}, "logprobs": lp,
                                  "finish_reason": ev.finish_reason}])
                else:
                    lp = completion_logprobs(tok, c, k - 1, k) if req.logprobs is not None and has_token else None
                    yield chunk([{"index": index, "text": delta, "logprobs": lp, "finish_reason": ev.finish_reason}])
            if req.stream_options is not None and req.stream_options.include_usage:
                yield chunk([], usage=call.usage())
            votes = call.votes(req.vote)
            if votes is not None:
                yield chunk([], forkdec={"votes": votes})
        except Exception as e:  # after the first chunk the status is sent: report the error in the stream
            yield "data: " + json.dumps({"error": {"message": str(e), "type": "server_error", "param": None,
                                                   "code": None}}) + "\n\n"
        finally:
            call.cancel(scheduler)  # a client that went away stops its paths (no-op once they are done)
        yield "data: [DONE]\n\n"

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req = await parse(request, CompletionRequest)
        prompts = service.completion_prompts(req.prompt)
        gens = [service.generation(ids, req, req.max_tokens, req.logprobs, first_index=p * req.n)
                for p, ids in enumerate(prompts)]
        return await run(request, req, gens, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req = await parse(request, ChatCompletionRequest)
        ids = service.chat_prompt(req.messages)
        want = (req.top_logprobs or 0) if req.logprobs else None
        if req.top_logprobs and not req.logprobs:
            raise RequestError("top_logprobs", "needs logprobs: true")
        gens = [service.generation(ids, req, req.max_completion_tokens or req.max_tokens, want)]
        return await run(request, req, gens, chat=True)

    return app

