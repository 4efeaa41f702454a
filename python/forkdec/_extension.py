"""Loads the compiled extension `forkdec._C`, which registers the C++/CUDA kernels
of `torch.ops.forkdec.*`. A missing or broken build never breaks `import forkdec`:
the error is kept and reported when a backend that needs it is asked for."""
from __future__ import annotations

import importlib
from types import ModuleType

_module: ModuleType | None = None
_error: str | None = None
_tried = False


def load() -> ModuleType | None:
    """The extension module, or None if it is not built (see `error()`)."""
    global _module, _error, _tried
    if not _tried:
        _tried = True
        try:
            import torch  # noqa: F401  (the extension links against torch's libraries)
            _module = importlib.import_module("forkdec._C")
        except ImportError as e:
            _error = f"the C++ extension forkdec._C is not built or failed to load ({e})"
    return _module


def error() -> str | None:
    load()
    return _error
