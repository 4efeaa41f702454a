"""forkdec: kernels and a minimal engine for decoding many reasoning paths of one prompt in one batch.

Ops live in `forkdec.ops` (torch ops in the `forkdec` namespace underneath);
each takes `backend="auto" | "reference" | "cpu" | "triton" | "cuda"`.
"""
from forkdec import ops, tree
from forkdec.backends import BackendUnavailable, available_backends
from forkdec.validation import set_validation, validation, validation_enabled

__version__ = "0.1.0"
__all__ = ["ops", "tree", "BackendUnavailable", "Engine", "SamplingParams", "available_backends", "set_validation",
           "validation", "validation_enabled"]

_ENGINE_EXPORTS = ("Engine", "SamplingParams", "Completion")


def __getattr__(name: str):
    # The engine is imported on first use so that `import forkdec` stays light.
    if name in _ENGINE_EXPORTS:
        from forkdec import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'forkdec' has no attribute {name!r}")
