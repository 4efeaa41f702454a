"""The OpenAI request bodies `forkdec serve` accepts, parsed once into `GenerationRequest`s.

Fields follow OpenAI's semantics; `top_k`, `min_p`, `ignore_eos`, `min_tokens`
and `stop_token_ids` are vLLM's extensions under vLLM's names; `vote` is
forkdec's own (pick one answer from the n choices: majority, first-finish,
best-logprob). Unknown fields are ignored, as OpenAI's server does; a known
field of the wrong type or range is a 400 naming it. Fields whose effect
forkdec does not implement (penalties, echo, best_of != n, logit_bias) are
refused with a 400 rather than silently ignored.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from forkdec.engine.params import SamplingParams

MAX_N = 256
MAX_LOGPROBS = 20


class RequestError(ValueError):
    """A request the server refuses: HTTP `status`, the offending field in `param`."""

    def __init__(self, param: str | None, message: str, status: int = 400, kind: str = "invalid_request_error"):
        super().__init__(f"{param}: {message}" if param else message)
        self.param, self.status, self.kind = param, status, kind


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Optional[dict[str, float]] = None
    user: Optional[str] = None
    # vLLM's extensions
    top_k: int = Field(0, ge=-1)
    min_p: float = Field(0.0, ge=0.0, lt=1.0)
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    stop_token_ids: Optional[list[int]] = None
    # forkdec's own
    vote: Optional[Literal["majority", "first-finish", "best-logprob"]] = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: Any) -> Any:
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop strings")
        if any(s == "" for s in stops):
            raise ValueError("an empty stop string would end every choice at once")
        return v

    def refuse_unsupported(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) != 0:
                raise RequestError(name, "is not supported by forkdec (only 0)")
        if self.logit_bias:
            raise RequestError("logit_bias", "is not supported by forkdec")

    def sampling(self, max_tokens: int, top_logprobs: int) -> SamplingParams:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(temperature=self.temperature, top_p=self.top_p,
                              top_k=max(self.top_k, 0), min_p=self.min_p, max_new_tokens=max_tokens, stop=stop,
                              stop_token_ids=tuple(self.stop_token_ids or ()), ignore_eos=self.ignore_eos,
                              min_tokens=self.min_tokens, top_logprobs=top_logprobs, seed=self.seed)


class CompletionRequest(_Common):
    """POST /v1/completions."""
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = Field(16, ge=1)
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: Optional[int] = None
    suffix: Optional[str] = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.echo:
            raise RequestError("echo", "is not supported by forkdec")
        if self.suffix:
            raise RequestError("suffix", "is not supported by forkdec")
        if self.best_of is not None and self.best_of != self.n:
            raise RequestError("best_of", "only best_of == n is supported (use `vote` to pick one choice)")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Union[str, list[dict[str, Any]], None] = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RequestError("messages", "only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(_Common):
    """POST /v1/chat/completions."""
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)


@dataclass
class GenerationRequest:
    """One prompt's worth of work for the scheduler: its n choices share the prompt's pages.

    logprobs: None = none; 0 = each sampled token's logprob; k > 0 = also the k most likely.
    """
    prompt_ids: list[int]
    n: int
    params: SamplingParams
    logprobs: int | None
    first_index: int = 0  # index of this prompt's first choice in the response
    prompt_tokens_reused: int = 0  # set by the driver when the paths start: prompt tokens the prefix cache held
