"""Input validation switch. On by default; the hot path can turn it off:

    with forkdec.validation(False):
        ...

Validation errors are `ValueError`s whose message starts with the argument's name.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator

_state = threading.local()


def validation_enabled() -> bool:
    return getattr(_state, "enabled", True)


def set_validation(enabled: bool) -> None:
    _state.enabled = bool(enabled)


@contextlib.contextmanager
def validation(enabled: bool) -> Iterator[None]:
    previous = validation_enabled()
    set_validation(enabled)
    try:
        yield
    finally:
        set_validation(previous)


def require(condition: bool, arg: str, message: str) -> None:
    """Raise `ValueError("arg: message")` unless `condition` holds."""
    if not condition:
        raise ValueError(f"{arg}: {message}")
