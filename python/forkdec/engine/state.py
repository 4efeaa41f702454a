"""Book-keeping of prompts and paths while a `generate` call runs."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from forkdec.engine.completion import Completion


@dataclass(eq=False)  # identity, never field-wise (fields hold tensors)
class PromptState:
    """A prompt: its tokens live once in `pages` (the last page may be partial
    and is never written after prefill: paths write into their own pages)."""
    index: int
    token_ids: list[int]
    n: int
    pages: list[int] = field(default_factory=list)
    cached: int = 0                     # leading tokens whose pages came from the prefix cache
    last_logits: Tensor | None = None   # [V] fp32 logits after the prompt, set by prefill
    admitted: int = 0                   # paths started so far
    running: int = 0                    # paths in the batch now
    results: list[Completion | None] = field(default_factory=list)
    finished: int = 0
    cancelled: bool = False

    @property
    def prefilled(self) -> bool:
        return self.last_logits is not None

    @property
    def waiting(self) -> int:
        return 0 if self.cancelled else self.n - self.admitted

    @property
    def done(self) -> bool:
        return self.prefilled and self.waiting == 0 and self.running == 0


@dataclass(eq=False)
class PathState:
    """One path: generated tokens; the K/V of all but the last of them live in `pages`."""
    prompt: PromptState
    index: int
    reserved: int                       # pages promised by the allocator, not yet taken
    pages: list[int] = field(default_factory=list)
    kv_len: int = 0                     # own tokens whose K/V are in `pages`
    token_ids: list[int] = field(default_factory=list)
    token_logprobs: list[float] = field(default_factory=list)
    token_confidences: list[float] = field(default_factory=list)      # when params.confidence_k
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)  # when params.top_logprobs
    reported: int = 0                   # tokens already shown to per-step hooks / the stream
    finished: bool = False

    @property
    def position(self) -> int:
        """Position of the last generated token, the one the next step feeds."""
        return len(self.prompt.token_ids) + self.kv_len
