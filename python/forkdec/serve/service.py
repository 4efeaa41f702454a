"""What the app serves: the model's name, tokenizer and context, the scheduler, and the
checks that turn a parsed request into `GenerationRequest`s or a 4xx naming a field."""
from __future__ import annotations

import time
from typing import Any

from forkdec.serve.protocol import ChatMessage, GenerationRequest, RequestError
from forkdec.serve.scheduler import Driver, Scheduler


class Service:
    """model_name: the id clients must send. driver: the engine's side (serve/driver.py)."""

    def __init__(self, driver: Driver, tokenizer: Any, model_name: str, context: int, vocab_size: int,
                 max_waiting: int = 64) -> None:
        self.driver, self.tokenizer = driver, tokenizer
        self.model_name, self.context, self.vocab_size = model_name, context, vocab_size
        self.created = int(time.time())
        self.scheduler = Scheduler(driver, max_waiting=max_waiting)

    def close(self) -> None:
        self.scheduler.close()

    # ---- prompts --------------------------------------------------------------------------------
    def completion_prompts(self, prompt: Any) -> list[list[int]]:
        """Token ids of each prompt: a string, a list of strings, token ids, or lists of token ids."""
        if isinstance(prompt, str):
            prompts = [self.tokenizer.encode(prompt)]
        elif prompt and all(isinstance(p, int) for p in prompt):
            prompts = [list(prompt)]
        elif prompt and all(isinstance(p, str) for p in prompt):
            prompts = [self.tokenizer.encode(p) for p in prompt]
        elif prompt and all(isinstance(p, list) for p in prompt):
            prompts = [list(p) for p in prompt]
        else:
            raise RequestError("prompt", "is empty")
        for ids in prompts:
            if not ids:
                raise RequestError("prompt", "is empty (encodes to no tokens)")
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise RequestError("prompt", f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        return prompts

    def chat_prompt(self, messages: list[ChatMessage]) -> list[int]:
        turns = [{"role": m.role, "content": m.text()} for m in messages]
        try:
            text = self.tokenizer.apply_chat_template(turns, add_generation_prompt=True)
        except Exception as e:  # a template may raise on roles it does not know
            raise RequestError("messages", f"the chat template refused them: {e}") from None
        ids = self.tokenizer.encode(text)
        if not ids:
            raise RequestError("messages", "render to an empty prompt")
        return ids

    # ---- requests -------------------------------------------------------------------------------
    def generation(self, prompt_ids: list[int], req: Any, max_tokens: int | None, logprobs: int | None,
                   first_index: int = 0) -> GenerationRequest:
        room = self.context - len(prompt_ids)
        if room < 1:
            raise RequestError("messages" if hasattr(req, "messages") else "prompt",
                               f"has {len(prompt_ids)} tokens; the context holds {self.context}")
        if max_tokens is None:
            max_tokens = room
        if max_tokens > room:
            raise RequestError("max_tokens", f"{max_tokens} new tokens after {len(prompt_ids)} prompt tokens "
                               f"exceed the model's context of {self.context}")
        if req.min_tokens > max_tokens:
            raise RequestError("min_tokens", f"{req.min_tokens} is more than max_tokens {max_tokens}")
        try:
            params = req.sampling(max_tokens, logprobs or 0)
        except ValueError as e:
            param = str(e).split(":", 1)[0]
            raise RequestError({"max_new_tokens": "max_tokens"}.get(param, param), str(e).split(":", 1)[-1].strip())
        gen = GenerationRequest(prompt_ids, req.n, params, logprobs, first_index)
        why = self.driver.never_fits(gen)
        if why:
            raise RequestError("n" if req.n > 1 else "max_tokens", why, status=413)
        return gen
