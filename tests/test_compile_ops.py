"""torch.compile(fullgraph=True) over every forkdec op: the C++ CPU ops and the
Triton custom ops (under the interpreter without a GPU). Each op is traced
through its fake implementation into one graph (no graph break allowed) and the
compiled call must give the eager call's results, including the in-place
writes of append_kv."""
import pytest
import torch

import forkdec
from op_samples import op, samples

needs_ext = pytest.mark.skipif(forkdec._extension.load() is None,
                               reason=f"C++ extension unavailable: {forkdec._extension.error()}")
triton_reason = forkdec.backends.unavailable_reason("triton", "attention", torch.device("cpu"))
CPU = samples(triton=False)
TRITON = samples(triton=True)


def _clone(args):
    return tuple(a.clone() if isinstance(a, torch.Tensor) else
                 [x.clone() if isinstance(x, torch.Tensor) else x for x in a] if isinstance(a, list) else a
                 for a in args)


def _flat(result):
    if result is None:
        return []
    return list(result) if isinstance(result, (tuple, list)) else [result]


def _check_compiled(name, args):
    torch._dynamo.reset()
    fn = op(name)

    def f(*a):
        return fn(*a)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    eager_args, compiled_args = _clone(args), _clone(args)
    want, got = _flat(f(*eager_args)), _flat(compiled(*compiled_args))
    assert len(want) == len(got)
    for w, g in zip(want, got):
        assert g.shape == w.shape and g.dtype == w.dtype
        torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True)
    for w, g in zip(eager_args, compiled_args):  # in-place writes (append_kv's caches)
        if isinstance(w, torch.Tensor):
            torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True)


@needs_ext
@pytest.mark.parametrize("case", CPU, ids=[c[0] for c in CPU])
def test_compile_fullgraph_cpu(case):
    _check_compiled(case[1], case[2])


@pytest.mark.skipif(triton_reason is not None, reason=f"triton cannot run here: {triton_reason}")
@pytest.mark.parametrize("case", TRITON, ids=[c[0] for c in TRITON])
def test_compile_fullgraph_triton(case):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    args = tuple(a.to(device) if isinstance(a, torch.Tensor) else
                 [x.to(device) if isinstance(x, torch.Tensor) else x for x in a] if isinstance(a, list) else a
                 for a in case[2])
    _check_compiled(case[1], args)
