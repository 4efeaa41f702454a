"""Backends and how `backend="auto"` is resolved.

- reference: plain PyTorch, the ground truth, any device.
- cpu:       C++ kernels in forkdec._C (AVX2/AVX-512, multi-threaded), CPU tensors.
- triton:    Triton kernels; CUDA tensors, or CPU tensors when TRITON_INTERPRET=1
             (how this project tests them without a GPU).
- cuda:      hand-written CUDA kernels in forkdec._C, built only with a CUDA toolkit.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from typing import Sequence

import torch

from forkdec import _extension

BACKENDS = ("reference", "cpu", "triton", "cuda")


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run this op here; the message says why."""


@functools.cache
def _has_kernel(op: str, dispatch_key: str) -> bool:
    # Asked only after the extension loaded, whose registrations never change afterwards.
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"forkdec::{op}", dispatch_key)


@functools.cache
def _triton_installed() -> bool:
    # find_spec walks sys.path on every call; the answer does not change within a process.
    return importlib.util.find_spec("triton") is not None


def unavailable_reason(backend: str, op: str, device: torch.device) -> str | None:
    """Why `backend` cannot run `op` on `device`, or None if it can."""
    if backend == "reference":
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"the cpu backend takes CPU tensors, got {device.type}"
        if _extension.load() is None:
            return _extension.error()
        if not _has_kernel(op, "CPU"):
            return f"forkdec._C has no CPU kernel for {op}"
        return None
    if backend == "triton":
        if not _triton_installed():
            return "triton is not installed (pip install triton)"
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return "triton needs a CUDA device, or TRITON_INTERPRET=1 for CPU tensors"
        if device.type not in ("cpu", "cuda"):
            return f"triton does not run on {device.type}"
        return None
    if backend == "cuda":
        if device.type != "cuda":
            return f"the cuda backend takes CUDA tensors, got {device.type}" + (
                "" if torch.cuda.is_available() else " (no GPU on this machine)")
        if _extension.load() is None:
            return _extension.error()
        if not _has_kernel(op, "CUDA"):
            return "forkdec._C was built without CUDA kernels (no CUDA toolkit or CPU-only torch at build time)"
        return None
    raise ValueError(f"backend: unknown backend {backend!r}; expected 'auto' or one of {BACKENDS}")


def resolve(backend: str, op: str, device: torch.device, supported: Sequence[str],
            preference: dict[str, Sequence[str]] | None = None) -> str:
    """The backend that runs `op` on `device`.

    `supported` lists the backends `op` has; `preference` maps a device type to
    the order `auto` tries them in (default: cuda, triton, cpu, reference).
    """
    if backend == "auto":
        order = (preference or {}).get(device.type, ("cuda", "triton", "cpu", "reference"))
        for name in order:
            if name in supported and unavailable_reason(name, op, device) is None:
                if name == "triton" and device.type == "cpu":
                    continue  # the interpreter is for testing, never the fast choice
                return name
        return "reference"
    if backend not in BACKENDS:
        raise ValueError(f"backend: unknown backend {backend!r}; expected 'auto' or one of {BACKENDS}")
    if backend not in supported:
        raise BackendUnavailable(f"{op} has no {backend} backend (it has {', '.join(supported)})")
    reason = unavailable_reason(backend, op, device)
    if reason is not None:
        raise BackendUnavailable(f"{op}: backend {backend!r} is unavailable: {reason}")
    return backend


def available_backends(op: str = "softmax", device: torch.device | str = "cpu") -> list[str]:
    """The backends that can run `op` on `device` in this process."""
    device = torch.device(device)
    return [b for b in BACKENDS if unavailable_reason(b, op, device) is None]
