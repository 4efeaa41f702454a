"""What a per-step hook of `Engine.generate` sees, and how it stops paths.

After every decode step (and after the first tokens of newly started paths)
`on_step(view)` gets one `PathDelta` per path that gained tokens: the new
tokens, their logprobs and (SamplingParams.confidence_k) confidences, and the
finish reason if the path ended. `view.stop(prompt, path)` ends one live path
now (finish_reason "stopped"), `view.cancel(prompt)` ends all of a prompt's
remaining paths (finish_reason "cancelled"); their pages are freed at once, so
waiting paths are admitted at the next step. `Engine.stream` yields the same
deltas; `early_stop` is a hook of this kind (`early_stop_hook`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


@dataclass
class PathDelta:
    prompt: int                      # prompt index in the call
    path: int                        # path index within its prompt
    token_ids: list[int]             # tokens gained this step (a speculative step may add several)
    logprobs: list[float]
    confidences: list[float] | None  # when SamplingParams.confidence_k > 0
    finish_reason: str | None = None


@dataclass
class StepView:
    step: int
    events: list[PathDelta]
    _stop: Callable[[int, int], None] = field(repr=False, default=None)      # type: ignore[assignment]
    _cancel: Callable[[int], None] = field(repr=False, default=None)         # type: ignore[assignment]
    _finished: Callable[[int], list] = field(repr=False, default=None)       # type: ignore[assignment]

    def stop(self, prompt: int, path: int) -> None:
        """End one live path now (finish_reason "stopped"); a path already ended is left as it is."""
        self._stop(prompt, path)

    def cancel(self, prompt: int) -> None:
        """End every remaining path of a prompt (finish_reason "cancelled"), waiting ones included."""
        self._cancel(prompt)

    def finished(self, prompt: int) -> list:
        """The prompt's finished Completions so far, in finish order (cancelled and stopped left out)."""
        return self._finished(prompt)


def early_stop_hook(early_stop: Callable[[int, list], bool]) -> Callable[[StepView], None]:
    """`generate(early_stop=f)` as a per-step hook: after a step in which paths of a prompt
    finished, f(prompt, its finished Completions in finish order) returning True cancels the rest."""
    def hook(view: StepView) -> None:
        for prompt in dict.fromkeys(e.prompt for e in view.events if e.finish_reason not in (None, "cancelled",
                                                                                              "stopped")):
            if early_stop(prompt, view.finished(prompt)):
                view.cancel(prompt)
    return hook
