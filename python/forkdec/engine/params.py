"""SamplingParams: how every path of a `generate` call is sampled and when it stops."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from forkdec.engine.drafter import DRAFTERS
from forkdec.validation import require


@dataclass(frozen=True)
class SamplingParams:
    """Per-call sampling settings, shared by all prompts and paths of one `generate`.

    temperature: 0 = greedy (argmax); > 0 scales the logits before the filters.
    top_k (0 = off), top_p (1 = off), min_p (0 = off): filters applied in that
        order to the temperature-scaled distribution (see the sampler).
    max_new_tokens: upper bound on generated tokens per path (finish_reason "length").
    stop: strings that end a path (finish_reason "stop"); the text is cut before them.
    stop_token_ids: extra token ids that end a path; the model's EOS ids always
        do unless ignore_eos.
    min_tokens: no EOS, stop token or stop string ends a path before it has this many
        tokens (the stop tokens are masked out of its distribution until then).
    top_logprobs: the k most likely tokens and their logprobs kept for every
        generated token (Completion.top_logprobs; 0 = none).
    confidence_k: DeepConf's token confidence -(1/k) * sum of the k largest
        logprobs kept for every generated token (Completion.token_confidences;
        0 = none; DeepConf uses 20).
    seed: seeds the engine's generator, so a call is reproducible; None = fresh randomness.
    speculate: "off", or "ngram": draft token trees from an n-gram table of the
        prompt and all its paths and verify them in one forward per step
        (docs/speculative.md); the output is distributed exactly as without it
        (token for token the same at temperature 0).
    draft_budget: most draft tokens verified per step over the whole batch (>= 1).
    draft_depth: deepest draft tree (>= 1); prompt + 1 + draft_depth must fit the context.
    draft_adaptive: verify only as many drafts as the measured step cost and
        acceptance make worth it (none when they do not pay); False verifies
        every draft the budget takes.
    """
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    max_new_tokens: int = 256
    stop: tuple[str, ...] = field(default_factory=tuple)
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    min_tokens: int = 0
    top_logprobs: int = 0
    confidence_k: int = 0
    seed: int | None = None
    speculate: str = "off"
    draft_budget: int = 24
    draft_depth: int = 12
    draft_adaptive: bool = True

    def __post_init__(self) -> None:
        # Lists are accepted for convenience and frozen to tuples so params stay hashable.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        t = self.temperature
        require(isinstance(t, (int, float)) and math.isfinite(t) and t >= 0, "temperature",
                f"must be a finite number >= 0 (0 = greedy), got {t!r}")
        require(isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1, "top_p",
                f"must be in (0, 1], got {self.top_p!r}")
        require(isinstance(self.top_k, int) and not isinstance(self.top_k, bool) and self.top_k >= 0, "top_k",
                f"must be an int >= 0 (0 = off), got {self.top_k!r}")
        require(isinstance(self.min_p, (int, float)) and 0 <= self.min_p < 1, "min_p",
                f"must be in [0, 1), got {self.min_p!r}")
        m = self.max_new_tokens
        require(isinstance(m, int) and not isinstance(m, bool) and m >= 1, "max_new_tokens",
                f"must be an int >= 1, got {m!r}")
        for name in ("min_tokens", "top_logprobs", "confidence_k"):
            v = getattr(self, name)
            require(isinstance(v, int) and not isinstance(v, bool) and v >= 0, name, f"must be an int >= 0, got {v!r}")
        require(self.min_tokens <= m, "min_tokens", f"{self.min_tokens} is more than max_new_tokens {m}")
        asked = [n for n in ("min_tokens", "top_logprobs", "confidence_k") if getattr(self, n)]
        require(self.speculate == "off" or not asked, "speculate",
                f"speculative decoding does not compute {', '.join(asked)}; use speculate='off'")
        for s in self.stop:
            require(isinstance(s, str), "stop", f"stop strings must be str, got {type(s).__name__}")
            require(len(s) > 0, "stop", "an empty stop string would stop every path at once")
        for i in self.stop_token_ids:
            require(isinstance(i, int) and not isinstance(i, bool) and i >= 0, "stop_token_ids",
                    f"token ids must be ints >= 0, got {i!r}")
        require(self.seed is None or (isinstance(self.seed, int) and not isinstance(self.seed, bool)), "seed",
                f"must be an int or None, got {self.seed!r}")
        require(self.speculate in DRAFTERS, "speculate", f"unknown drafter {self.speculate!r}; one of {DRAFTERS}")
        for name in ("draft_budget", "draft_depth"):
            v = getattr(self, name)
            require(isinstance(v, int) and not isinstance(v, bool) and v >= 1, name, f"must be an int >= 1, got {v!r}")
        require(isinstance(self.draft_adaptive, bool), "draft_adaptive", f"must be a bool, got {self.draft_adaptive!r}")

    def check_fits(self, prompt_len: int, context: int, which: str = "prompt") -> None:
        """ValueError naming max_new_tokens if a path of a prompt of `prompt_len`
        tokens could outgrow the model's `context` positions."""
        require(prompt_len + self.max_new_tokens <= context, "max_new_tokens",
                f"{which} has {prompt_len} tokens; {prompt_len} + max_new_tokens {self.max_new_tokens} "
                f"exceeds the model's context of {context} positions")
        if self.speculate != "off":  # a verification step feeds the root and a tree up to draft_depth deep
            require(prompt_len + 1 + self.draft_depth <= context, "draft_depth",
                    f"{which} has {prompt_len} tokens; a draft tree {self.draft_depth} deep after them "
                    f"exceeds the model's context of {context} positions")
