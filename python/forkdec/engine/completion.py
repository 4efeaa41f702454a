"""What `Engine.generate` returns per path, and the run's statistics."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Completion:
    """One decoded path.

    token_ids: generated tokens, including the stop/EOS token that ended the path.
    text: decoded `token_ids` without special tokens, cut before a matched stop string.
    finish_reason: "stop" (EOS, stop token or stop string), "length" (max_new_tokens),
        "cancelled" (an early stop ended its prompt first) or "stopped" (a per-step hook
        ended this path, e.g. DeepConf's confidence test).
    cumulative_logprob: sum over token_ids of log p(token) under the model's own
        distribution, softmax(logits) at temperature 1 before any filter, so
        values are comparable across sampling settings.
    finish_order: 0 for the first path of its prompt to finish, 1 for the next, ...
    token_logprobs: log p of each token of token_ids (the same distribution as cumulative_logprob).
    token_confidences: DeepConf's confidence of each token's distribution, -(1/k) * sum of
        its k largest logprobs (SamplingParams.confidence_k; None when not asked for).
    top_logprobs: per token, the (token id, logprob) pairs of its distribution's
        SamplingParams.top_logprobs most likely tokens (None when not asked for).
    """
    token_ids: list[int]
    text: str
    finish_reason: str
    cumulative_logprob: float
    finish_order: int = -1
    token_logprobs: list[float] = field(default_factory=list)
    token_confidences: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None

    @property
    def mean_logprob(self) -> float:
        return self.cumulative_logprob / max(1, len(self.token_ids))


@dataclass
class GenerateStats:
    """Counters of the last `generate` call (Engine.last_stats)."""
    prompt_tokens: list[int] = field(default_factory=list)
    prompt_tokens_reused: int = 0     # prompt tokens whose K/V came from the prefix cache (whole pages)
    prompt_tokens_prefilled: int = 0  # prompt tokens run through the model
    generated_tokens: int = 0
    decode_steps: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    kv_bytes_per_token: int = 0
    kv_bytes_peak: int = 0          # pages held at the busiest step, prompt pages included
    kv_bytes_if_copied: int = 0     # the same step if every path held its own copy of its prompt
    kv_bytes_prompts: int = 0       # the prompts' pages, held once each
    max_batch: int = 0
    # speculative decoding (SamplingParams.speculate); zero without it
    speculative_steps: int = 0      # steps that verified draft trees
    draft_tokens: int = 0           # draft tokens verified
    accepted_draft_tokens: int = 0  # of which accepted
    path_steps: int = 0             # sum over steps (tree or plain) of the paths decoded in them
    path_step_tokens: int = 0       # tokens those steps emitted
    plain_step_seconds: float = 0.0  # decode steps that verified no tree (drafting included)
    plain_step_tokens: int = 0       # tokens those steps emitted

    @property
    def seconds(self) -> float:
        return self.prefill_seconds + self.decode_seconds

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def tokens_per_path_step(self) -> float:
        """Tokens a path gained per decode step (1 without speculation; accepted drafts + 1 with it)."""
        return self.path_step_tokens / self.path_steps if self.path_steps else 1.0

    @property
    def speedup_vs_plain_steps(self) -> float | None:
        """Decode tokens/s over the tokens/s of this run's own plain steps: an estimate of the
        speedup over decoding without speculation from one run (None: no plain step to compare).
        Plain steps include drafting, and a run's plain steps may have had other batch sizes than
        its tree steps, so a run with speculation off is the real baseline (bench/speculative.py)."""
        if not self.speculative_steps or not self.plain_step_seconds or not self.plain_step_tokens:
            return None
        return (self.generated_tokens / self.decode_seconds) / (self.plain_step_tokens / self.plain_step_seconds)

    @property
    def draft_acceptance(self) -> float:
        """Fraction of verified draft tokens that were accepted (0 without speculation)."""
        return self.accepted_draft_tokens / self.draft_tokens if self.draft_tokens else 0.0
