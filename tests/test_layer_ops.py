"""Fused decoder-layer ops beyond the harness: bad input, equality with the unfused
sequence of torch ops, torch.compile tracing."""
import pytest
import torch
import torch.nn.functional as F

import forkdec
from forkdec import ops, reference

needs_ext = pytest.mark.skipif(forkdec._extension.load() is None,
                               reason=f"C++ extension unavailable: {forkdec._extension.error()}")


@pytest.mark.parametrize("call,name", [
    (lambda: ops.rms_norm(torch.randn(2, 4).long(), torch.ones(4)), "x"),
    (lambda: ops.rms_norm(torch.randn(2, 4), torch.ones(5)), "weight"),
    (lambda: ops.rms_norm(torch.randn(2, 4), torch.ones(4), eps=-1.0), "eps"),
    (lambda: ops.rms_norm(torch.randn(2, 4), torch.ones(4), eps=float("nan")), "eps"),
    (lambda: ops.add_rms_norm(torch.randn(2, 4), torch.randn(3, 4), torch.ones(4)), "residual"),
    (lambda: ops.add_rms_norm(torch.randn(2, 4), torch.randn(2, 4).half(), torch.ones(4)), "residual"),
    (lambda: ops.rope_qkv(torch.randn(2, 5 * 8), torch.ones(2, 4), torch.ones(2, 4), 3, 0), "num_kv_heads"),
    (lambda: ops.rope_qkv(torch.randn(2, 5 * 8), torch.ones(2, 4), torch.ones(2, 4), 0, 1), "num_q_heads"),
    (lambda: ops.rope_qkv(torch.randn(2, 41), torch.ones(2, 4), torch.ones(2, 4), 3, 1), "qkv"),
    (lambda: ops.rope_qkv(torch.randn(2, 5 * 5), torch.ones(2, 2), torch.ones(2, 2), 3, 1), "qkv"),  # odd D
    (lambda: ops.rope_qkv(torch.randn(2, 5 * 8), torch.ones(2, 3), torch.ones(2, 4), 3, 1), "cos"),
    (lambda: ops.rope_qkv(torch.randn(2, 5 * 8), torch.ones(2, 4), torch.ones(2, 4).double(), 3, 1), "sin"),
    (lambda: ops.silu_and_mul(torch.randn(3, 7)), "x"),
    (lambda: ops.silu_and_mul(torch.randn(3, 8).int()), "x"),
])
def test_bad_input_names_the_argument(call, name):
    with pytest.raises(ValueError, match=f"^{name}:"):
        call()


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_rms_norm_equals_add_then_rms_norm(dtype):
    """The fused pair is exactly the unfused two steps: the norm is of the rounded sum."""
    g = torch.Generator().manual_seed(3)
    x, r = (torch.randn(17, 300, generator=g) * 5).to(dtype), torch.randn(17, 300, generator=g).to(dtype)
    w = torch.randn(300, generator=g).to(dtype)
    out, total = ops.add_rms_norm(x, r, w, 1e-5, backend="cpu")
    assert torch.equal(total, x + r)
    torch.testing.assert_close(out, ops.rms_norm(x + r, w, 1e-5, backend="cpu"), rtol=0, atol=0)


@needs_ext
def test_rope_qkv_matches_torch_rotate_half_and_keeps_norms():
    """Against the model's own unfused formula, and rotation preserves each pair's length."""
    from forkdec.models.llama import _rotate

    g = torch.Generator().manual_seed(4)
    t, hq, hkv, d = 6, 9, 3, 64
    qkv = torch.randn(t, (hq + 2 * hkv) * d, generator=g)
    angles = torch.randint(0, 8000, (t,), generator=g).float()[:, None] * (
        1.0 / 1e5 ** (torch.arange(0, d, 2).float() / d))[None, :]
    q, k, v = ops.rope_qkv(qkv, angles.cos(), angles.sin(), hq, hkv, backend="cpu")
    heads = qkv.view(t, hq + 2 * hkv, d)
    rotated = _rotate(heads[:, : hq + hkv], angles.cos()[:, None], angles.sin()[:, None])
    torch.testing.assert_close(torch.cat([q, k], 1), rotated, rtol=1e-5, atol=1e-5)
    assert torch.equal(v, heads[:, hq + hkv:])
    pair_len = (heads[:, :hq, : d // 2] ** 2 + heads[:, :hq, d // 2:] ** 2)
    torch.testing.assert_close(q[..., : d // 2] ** 2 + q[..., d // 2:] ** 2, pair_len, rtol=1e-4, atol=1e-4)


@needs_ext
def test_silu_and_mul_matches_torch():
    x = torch.randn(5, 2 * 99)
    torch.testing.assert_close(ops.silu_and_mul(x, backend="cpu"), F.silu(x[:, :99]) * x[:, 99:])


@needs_ext
def test_direct_torch_ops_reject_bad_input_without_crashing():
    with pytest.raises(RuntimeError):
        torch.ops.forkdec.rms_norm(torch.randn(2, 3), torch.ones(4), 1e-5)
    with pytest.raises(RuntimeError):
        torch.ops.forkdec.add_rms_norm(torch.randn(2, 3), torch.randn(3, 3), torch.ones(3), 1e-5)
    with pytest.raises(RuntimeError):
        torch.ops.forkdec.rope_qkv(torch.randn(2, 40), torch.ones(2, 3), torch.ones(2, 4), 3, 1)
    with pytest.raises(RuntimeError):
        torch.ops.forkdec.silu_and_mul(torch.randn(2, 3))


@needs_ext
def test_torch_compile_fullgraph_traces_the_ops():
    torch._dynamo.reset()

    def f(x, r, w, qkv, c, s):
        h, total = torch.ops.forkdec.add_rms_norm(x, r, w, 1e-5)
        q, k, v = torch.ops.forkdec.rope_qkv(qkv, c, s, 2, 1)
        return torch.ops.forkdec.silu_and_mul(h) + 1, total, q, k, v

    args = (torch.randn(3, 8), torch.randn(3, 8), torch.ones(8), torch.randn(3, 4 * 8), torch.ones(3, 4),
            torch.zeros(3, 4))
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for a, b in zip(compiled(*args), f(*args)):
        torch.testing.assert_close(a, b)
