"""Softmax semantics beyond the harness: extreme inputs, bad input, backends, torch.compile."""
import pytest
import torch

import forkdec
from forkdec import reference
from forkdec.ops.softmax import softmax_three_pass

needs_ext = pytest.mark.skipif(forkdec._extension.load() is None,
                               reason=f"C++ extension unavailable: {forkdec._extension.error()}")


def _isas():
    ext = forkdec._extension.load()
    return list(ext.available_cpu_isas()) if ext is not None else ["(no extension)"]


@pytest.fixture(params=_isas())
def isa(request):
    ext = forkdec._extension.load()
    if ext is None:
        pytest.skip(f"C++ extension unavailable: {forkdec._extension.error()}")
    previous = ext.cpu_isa()
    ext.set_cpu_isa(request.param)
    yield request.param
    ext.set_cpu_isa(previous)


@needs_ext
@pytest.mark.parametrize("kernel", ["two_pass", "three_pass"])
def test_no_overflow_for_extreme_finite_inputs(isa, kernel):
    f = forkdec.ops.softmax if kernel == "two_pass" else softmax_three_pass
    x = torch.tensor([[1e30, -1e30, 0.0], [3.4e38, -3.4e38, 3.4e38], [-1e30, -1e30, 88.0]])
    y = f(x, -1) if kernel == "three_pass" else f(x, -1, backend="cpu")
    torch.testing.assert_close(y, torch.tensor([[1.0, 0, 0], [0.5, 0, 0.5], [0, 0, 1.0]]), rtol=1e-6, atol=0)


@needs_ext
def test_long_row_of_equal_large_values(isa):
    x = torch.full((2, 200_000), 1e30)
    y = forkdec.ops.softmax(x, backend="cpu")
    torch.testing.assert_close(y, torch.full_like(x, 1 / 200_000), rtol=1e-5, atol=0)
    assert abs(float(y[0].double().sum()) - 1) < 1e-5


@needs_ext
def test_special_values_match_torch(isa):
    inf, nan = float("inf"), float("nan")
    x = torch.tensor([[-inf, 0.0, 1.0], [-inf, -inf, -inf], [nan, 0.0, 1.0], [inf, 0.0, 1.0]])
    for f in (lambda t: forkdec.ops.softmax(t, backend="cpu"), softmax_three_pass):
        torch.testing.assert_close(f(x), torch.softmax(x, -1), equal_nan=True)


@needs_ext
def test_three_pass_control_matches_reference(isa):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 1025, generator=g) * 10
    t = torch.rand(7, generator=g) + 0.5
    torch.testing.assert_close(softmax_three_pass(x, temperature=t), reference.softmax(x, -1, t), rtol=1e-5, atol=1e-7)


@needs_ext
def test_long_single_row_is_split_across_threads_correctly():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 1_000_003, generator=g) * 30
    torch.testing.assert_close(forkdec.ops.softmax(x, backend="cpu"), torch.softmax(x, -1), rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("kwargs,arg", [
    (dict(x=torch.arange(6).reshape(2, 3)), "x"),
    (dict(x=torch.randn(2, 3, dtype=torch.float64)), "x"),
    (dict(x=[1.0, 2.0]), "x"),
    (dict(x=torch.randn(2, 3), dim=2), "dim"),
    (dict(x=torch.randn(2, 3), dim=-3), "dim"),
    (dict(x=torch.randn(2, 3), temperature=0.0), "temperature"),
    (dict(x=torch.randn(2, 3), temperature=-1.0), "temperature"),
    (dict(x=torch.randn(2, 3), temperature=float("nan")), "temperature"),
    (dict(x=torch.randn(2, 3), temperature="hot"), "temperature"),
    (dict(x=torch.randn(2, 3), temperature=torch.ones(3)), "temperature"),
    (dict(x=torch.randn(2, 3), temperature=torch.tensor([1.0, 0.0])), "temperature"),
    (dict(x=torch.randn(2, 3), temperature=torch.tensor([1.0, float("nan")])), "temperature"),
    (dict(x=torch.randn(2, 3), temperature=torch.tensor([1, 2])), "temperature"),
])
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_bad_input_raises_value_error_naming_the_argument(kwargs, arg, backend):
    with pytest.raises(ValueError, match=f"^{arg}: "):
        forkdec.ops.softmax(**kwargs, backend=backend)


def test_unknown_backend_is_a_value_error():
    with pytest.raises(ValueError, match="^backend: "):
        forkdec.ops.softmax(torch.randn(2, 3), backend="tpu")


def test_unavailable_backend_says_why():
    with pytest.raises(forkdec.BackendUnavailable, match="cuda.*CUDA tensors"):
        forkdec.ops.softmax(torch.randn(2, 3), backend="cuda")


@needs_ext
def test_auto_picks_the_cpu_kernel_and_validation_can_be_switched_off():
    assert forkdec.backends.resolve("auto", "softmax", torch.device("cpu"), ("reference", "cpu")) == "cpu"
    x = torch.randn(3, 5)
    with forkdec.validation(False):
        assert not forkdec.validation_enabled()
        y = forkdec.ops.softmax(x, temperature=2.0)
    assert forkdec.validation_enabled()
    torch.testing.assert_close(y, torch.softmax(x / 2, -1))


@needs_ext
def test_direct_torch_op_rejects_bad_input_without_crashing():
    with pytest.raises(RuntimeError):
        torch.ops.forkdec.softmax(torch.arange(3), -1, 1.0, None)
    with pytest.raises(RuntimeError):
        torch.ops.forkdec.softmax(torch.randn(2, 3), 5, 1.0, None)
    with pytest.raises(RuntimeError):
        torch.ops.forkdec.softmax(torch.randn(2, 3), -1, 1.0, torch.ones(5))


@needs_ext
def test_torch_compile_fullgraph_traces_the_op():
    torch._dynamo.reset()

    def f(x):
        return torch.ops.forkdec.softmax(x * 2, -1, 0.5, None) + 1

    x = torch.randn(4, 33)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), torch.softmax(x * 4, -1) + 1)
