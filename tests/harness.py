"""The shared harness: every backend of every op against `forkdec.reference`.

An op joins by adding an `OpSpec` to `SPECS` (usually from its own module
`tests/specs/<op>.py`): its backends, dtypes, input cases and how to compare.
`tests/test_harness.py` runs the cross product; a backend that cannot run here
is skipped with the reason `forkdec` gives.

Where each backend runs (`device_for`): cpu and reference on CPU tensors; cuda
on CUDA tensors; triton on CUDA tensors whenever a GPU is present (compiled
kernels), else on CPU tensors in Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 only when there is no GPU). Inputs are made on the CPU with
a seeded generator and moved, so every backend sees the same values.

Exact and approximate comparisons (the specs' `compare`), the same on both
devices:
- exact: append_kv (copies), speculative verification and sampling (integer
  tokens; the kernels compare and sum, and their launches turn FMA contraction
  off), softmax's NaN pattern.
- tolerance, because GPU math differs from the reference's: attention, cascade,
  merge and xquant outputs (tensor-core dots multiply fp16/bf16 operands, P is
  rounded to the value dtype before P·V, exp2/log2 are the GPU's approximate
  ex2/lg2, FMA contraction), fp32 to ~1e-4, half types to 2e-2; LSE to 1e-4;
  layer ops and softmax to a few fp32 ulps (approximate division, rsqrt and
  exp), half types to one ulp on almost every element.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from forkdec import _extension
from forkdec.backends import unavailable_reason

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class Case:
    """One input: `make(dtype, generator)` returns (args, kwargs) for the op."""
    id: str
    make: Callable[[torch.dtype, torch.Generator], tuple[tuple, dict]]
    triton: bool = True  # small enough for the Triton interpreter


@dataclass
class OpSpec:
    name: str
    op: Callable[..., Any]            # forkdec.ops.<name>, takes backend=
    reference: Callable[..., Any]     # forkdec.reference.<name>
    backends: tuple[str, ...]
    cases: list[Case]
    compare: Callable[[Any, Any, torch.dtype], None]
    dtypes: tuple[torch.dtype, ...] = DTYPES
    device: str = "cpu"
    extra: dict = field(default_factory=dict)


SPECS: list[OpSpec] = []


def cpu_isas() -> list[str]:
    ext = _extension.load()
    return list(ext.available_cpu_isas()) if ext is not None else []


def backend_variants(spec: OpSpec) -> list[str]:
    """Backends to test; the cpu backend once per instruction set this CPU has."""
    out = []
    for backend in spec.backends:
        if backend == "reference":
            continue
        if backend == "cpu" and cpu_isas():
            out += [f"cpu[{isa}]" for isa in cpu_isas()]
        else:
            out.append(backend)
    return out


def device_for(spec: OpSpec, backend: str) -> torch.device:
    """Where `backend` runs this spec's cases: triton on the GPU when there is one."""
    if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device(spec.device)


def skip_reason(spec: OpSpec, variant: str, case: Case) -> str | None:
    backend = variant.split("[")[0]
    device = device_for(spec, backend)
    reason = unavailable_reason(backend, spec.name, device)
    if reason is None and backend == "triton" and device.type == "cpu" and not case.triton:
        reason = "too large for the Triton interpreter; smaller cases cover this backend"
    return reason
