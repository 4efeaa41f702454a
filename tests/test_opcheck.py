"""torch.library.opcheck for every forkdec op on every backend that runs here:
the C++ CPU ops, and the Triton custom ops (under the interpreter without a GPU).
opcheck checks the schema (aliasing, mutation), the fake implementation against
the real op (shapes, dtypes, strides), autograd registration and AOT dispatch."""
import os

import pytest
import torch

import forkdec
from op_samples import op, samples

needs_ext = pytest.mark.skipif(forkdec._extension.load() is None,
                               reason=f"C++ extension unavailable: {forkdec._extension.error()}")
triton_reason = forkdec.backends.unavailable_reason("triton", "attention", torch.device("cpu"))
CPU = samples(triton=False)
TRITON = samples(triton=True)


@needs_ext
@pytest.mark.parametrize("case", CPU, ids=[c[0] for c in CPU])
def test_opcheck_cpu(case):
    _, name, args = case
    torch.library.opcheck(op(name), args)


@pytest.mark.skipif(triton_reason is not None, reason=f"triton cannot run here: {triton_reason}")
@pytest.mark.parametrize("case", TRITON, ids=[c[0] for c in TRITON])
def test_opcheck_triton(case):
    _, name, args = case
    device = "cuda" if torch.cuda.is_available() else "cpu"
    args = tuple(a.to(device) if isinstance(a, torch.Tensor) else
                 [x.to(device) if isinstance(x, torch.Tensor) else x for x in a] if isinstance(a, list) else a
                 for a in args)
    torch.library.opcheck(op(name), args)


def test_every_op_has_a_sample():
    import forkdec.ops  # noqa: F401  (registers the Triton custom ops)
    names = {s.name.split("::")[1] for s in torch._C._jit_get_all_schemas() if s.name.startswith("forkdec::")}
    sampled = {c[1] for c in CPU + TRITON}
    assert names <= sampled, f"ops opcheck does not cover: {sorted(names - sampled)}"
