"""qlinear beyond the harness: packing against gguf's own dequantizer, exactness when the
activations are int8-representable, the rounding bound, bad input, unsupported types."""
import numpy as np
import pytest
import torch

import forkdec
from forkdec import ops, reference
from forkdec.qweight import QuantizedWeight, concat_rows, dequantize, pack_gguf

needs_ext = pytest.mark.skipif(forkdec._extension.load() is None,
                               reason=f"C++ extension unavailable: {forkdec._extension.error()}")
GGML = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 8}


def _raw(qtype, n, k, seed=0):
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    w = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)
    return np.ascontiguousarray(quantize(w, GGMLQuantizationType(GGML[qtype])))


@pytest.mark.parametrize("qtype", list(GGML))
@pytest.mark.parametrize("k", [32, 64, 96, 128, 576])
def test_packing_keeps_every_stored_value(qtype, k):
    """dequantize(pack_gguf(bytes)) is exactly gguf's dequantization of the same bytes."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    raw = _raw(qtype, 7, k, seed=k)
    packed = pack_gguf(raw, GGML[qtype], (7, k))
    want = torch.from_numpy(gguf_dequantize(raw, GGMLQuantizationType(GGML[qtype])).astype(np.float32))
    assert torch.equal(dequantize(packed), want.reshape(7, k))
    rows = torch.tensor([5, 0, 3])
    assert torch.equal(dequantize(packed, rows), want.reshape(7, k)[rows])
    assert torch.equal(dequantize(packed.rows(rows)), want.reshape(7, k)[rows])


def _int8_exact_x(m, k, g):
    """Activations int8 rounding keeps exactly: integers in [-127, 127], each block's max 127."""
    x = torch.randint(-127, 128, (m, k), generator=g).float()
    x.view(m, k // 32, 32)[:, :, 0] = 127.0
    return x


@needs_ext
@pytest.mark.parametrize("qtype", list(GGML))
@pytest.mark.parametrize("isa", ["avx2", "avx512", "scalar"])
# Rows go 8 at a time with avx512 (4 with avx2 and scalar): whole groups (4, 8, 16, 64) and
# every remainder (1, 2, 3, 9 = 8 + 1, 17, 33, and 7 = 4 + 3 elsewhere).
@pytest.mark.parametrize("m", [1, 2, 3, 4, 7, 8, 9, 16, 17, 33, 64])
def test_cpu_is_exact_on_int8_representable_activations(qtype, isa, m):
    ext = forkdec._extension.load()
    if isa not in ext.available_cpu_isas():
        pytest.skip(f"this CPU has no {isa}")
    previous = ext.cpu_isa()
    ext.set_cpu_isa(isa)
    try:
        g = torch.Generator().manual_seed(1)
        w = pack_gguf(_raw(qtype, 50, 576, seed=2), GGML[qtype], (50, 576))
        x = _int8_exact_x(m, 576, g)
        got = ops.qlinear(x, w, backend="cpu")
    finally:
        ext.set_cpu_isa(previous)
    wd = dequantize(w).double()
    want = x.double() @ wd.t()
    # Only fp32 accumulation error: relative to the sum of the products' magnitudes.
    assert ((got.double() - want).abs() <= 1e-5 * (x.double().abs() @ wd.abs().t()) + 1e-6).all()


@needs_ext
@pytest.mark.parametrize("qtype", list(GGML))
def test_cpu_error_within_activation_rounding_bound(qtype):
    """|out - exact| <= sum over blocks of (max|x_b| / 127 / 2) * sum |w_b|, per output."""
    g = torch.Generator().manual_seed(3)
    w = pack_gguf(_raw(qtype, 64, 1536, seed=4), GGML[qtype], (64, 1536))
    x = torch.randn(5, 1536, generator=g) * torch.linspace(0.1, 10, 1536)  # blocks of different scales
    got = ops.qlinear(x, w, backend="cpu").double()
    wd = dequantize(w).double()
    exact = x.double() @ wd.t()
    step = x.abs().reshape(5, -1, 32).amax(-1).double() / 127 / 2  # [m, blocks]
    bound = step @ wd.abs().reshape(64, -1, 32).sum(-1).t()  # [m, n]
    assert ((got - exact).abs() <= bound * 1.0001 + 1e-4).all()
    assert ((got - exact).abs() > 0).any()  # the activations really were rounded


@needs_ext
def test_lm_head_fp32_out_from_bf16_x():
    g = torch.Generator().manual_seed(5)
    w = pack_gguf(_raw("Q8_0", 300, 576, seed=6), 8, (300, 576))
    x = torch.randn(3, 576, generator=g).bfloat16()
    out = ops.qlinear(x, w, out_dtype=torch.float32, backend="cpu")
    assert out.dtype == torch.float32
    ref = reference.qlinear(x, w, out_dtype=torch.float32)
    assert (out - ref).norm() / ref.norm() < 2e-2


def test_concat_rows_stacks_and_refuses_mixed_formats():
    a = pack_gguf(_raw("Q4_1", 4, 64), 3, (4, 64))
    b = pack_gguf(_raw("Q4_1", 2, 64, seed=1), 3, (2, 64))
    assert torch.equal(dequantize(concat_rows([a, b])), torch.cat([dequantize(a), dequantize(b)]))
    with pytest.raises(ValueError, match="^weights:"):
        concat_rows([a, pack_gguf(_raw("Q8_0", 2, 64), 8, (2, 64))])


@pytest.mark.parametrize("ggml_type,name", [(12, "Q4_K"), (14, "Q6_K"), (1, "F16"), (6, "Q5_0")])
def test_unsupported_type_names_tensor_and_type(ggml_type, name):
    with pytest.raises(ValueError, match=rf"^blk\.3\.ffn_down\.weight: GGUF type {name} has no qlinear kernel"):
        pack_gguf(np.zeros((2, 144), np.uint8), ggml_type, (2, 256), name="blk.3.ffn_down.weight")


def test_bad_bytes_and_width():
    with pytest.raises(ValueError, match="^w: expected 40 bytes"):
        pack_gguf(np.zeros((2, 19), np.uint8), 3, (2, 32), name="w")
    with pytest.raises(ValueError, match="^w: Q4_1 rows must hold"):
        pack_gguf(np.zeros((2, 20), np.uint8), 3, (2, 48), name="w")


@pytest.mark.parametrize("call,name", [
    (lambda w: ops.qlinear(torch.randn(2, 65), w), "x"),
    (lambda w: ops.qlinear(torch.randn(2, 64).long(), w), "x"),
    (lambda w: ops.qlinear(torch.randn(2, 64), torch.randn(4, 64)), "weight"),
    (lambda w: ops.qlinear(torch.randn(2, 64), w, torch.randn(5)), "bias"),
    (lambda w: ops.qlinear(torch.randn(2, 64), w, out_dtype=torch.int32), "out_dtype"),
    (lambda w: ops.qlinear(torch.randn(2, 64), w, backend="nope"), "backend"),
])
def test_bad_input_names_the_argument(call, name):
    w = pack_gguf(_raw("Q4_1", 4, 64), 3, (4, 64))
    with pytest.raises(ValueError, match=f"^{name}:"):
        call(w)


@needs_ext
def test_kernel_checks_hold_without_validation():
    """With validation off the C++ op still refuses a mismatched width instead of reading past the rows."""
    w = pack_gguf(_raw("Q4_1", 4, 64), 3, (4, 64))
    with forkdec.validation(False), pytest.raises(RuntimeError, match="x must be"):
        ops.qlinear(torch.randn(2, 96), w, backend="cpu")
    bad = QuantizedWeight(w.codes[:, :16].contiguous(), w.scale, w.offset, 4, 64, "Q4_1", 4)
    with forkdec.validation(False), pytest.raises(RuntimeError, match="codes must be"):
        ops.qlinear(torch.randn(2, 64), bad, backend="cpu")


@needs_ext
def test_torch_compile_traces_the_op():
    """The C++ op has a fake implementation: it traces into one graph."""
    w = pack_gguf(_raw("Q8_0", 16, 128), 8, (16, 128))
    op = torch.ops.forkdec.qlinear
    f = torch.compile(lambda x: op(x, w.codes, w.scale, w.offset, w.bits, w.k, w.n, None, None) * 2, backend="eager",
                      fullgraph=True)
    x = torch.randn(3, 128)
    torch.testing.assert_close(f(x), ops.qlinear(x, w, backend="cpu") * 2)


# ---- the model on stored blocks ---------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm_forms():
    from forkdec.models import load_model

    try:
        return {w: load_model(weights=w)[0] for w in ("gguf", "gguf+bf16", "bf16")}
    except RuntimeError as e:  # the embedded model's package is missing
        pytest.skip(str(e))


def _logits(model, ids):
    from forkdec.models import ContiguousAttention

    return model(torch.tensor(ids), torch.arange(len(ids)), ContiguousAttention(model.config.num_layers))


@needs_ext
def test_model_forms_route_products(smollm_forms):
    """gguf+bf16 computes forwards of at most qlinear_max_rows rows on the blocks (equal to
    the gguf model) and larger ones in bf16 (equal to the bf16 model); the stored-block
    logits agree with bf16 closely."""
    from forkdec.qweight import QuantizedWeight

    gguf, mixed, bf16 = smollm_forms["gguf"], smollm_forms["gguf+bf16"], smollm_forms["bf16"]
    assert isinstance(gguf.layers[0].qkv, QuantizedWeight) and gguf.layers[0].qkv.qtype == "Q4_1"
    assert isinstance(gguf.lm_head, QuantizedWeight) and gguf.lm_head.qtype == "Q8_0"
    assert mixed.layers[0].blocks is not None and not isinstance(mixed.layers[0].qkv, QuantizedWeight)
    with forkdec.validation(False):
        ids = [1, 504, 3458, 282, 4649, 314, 7042, 30]
        limit = mixed.qlinear_max_rows
        for rows in (1, 2, 9, limit):  # one row, a partial group of 8, a group and a remainder, the limit
            assert torch.equal(_logits(mixed, (ids * limit)[:rows]), _logits(gguf, (ids * limit)[:rows]))
        above = (ids * (limit + 1))[:limit + 1]
        assert torch.equal(_logits(mixed, above), _logits(bf16, above))
        a, b = _logits(gguf, ids), _logits(bf16, ids)
    assert (a - b).norm() / b.norm() < 0.08  # bf16 activations, int8-rounded per block: ~5% here
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.75


def test_load_model_refuses_unknown_weights():
    from forkdec.models import load_model

    with pytest.raises(ValueError, match="^weights: unknown choice 'int3'"):
        load_model(weights="int3")
    with pytest.raises(ValueError, match="^weights: 'bf16' conflicts with dtype"):
        load_model(weights="bf16", dtype=torch.float32)


def test_cli_unknown_weights_exits_2_with_one_line(capsys):
    from forkdec.cli import main

    assert main(["generate", "hi", "--weights", "int3", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "weights: unknown choice 'int3'" in err[0], err


_COMPILE_SCRIPT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import forkdec.triton_kernels.qlinear as k

for dtype in ("fp32", "bf16", "fp16"):
    sig = {"x_ptr": "*" + dtype, "codes_ptr": "*u8", "scale_ptr": "*fp16", "offset_ptr": "*fp16", "bias_ptr": "*fp32",
           "out_ptr": "*" + dtype, "M": "i32", "N": "i32", "K": "i32", "x_stride": "i32", "code_row": "i32",
           "scale_row": "i32", "BITS": "constexpr", "HAS_BIAS": "constexpr", "FP32_DOT": "constexpr",
           "BLOCK_M": "constexpr", "BLOCK_N": "constexpr"}
    for arch in (80, 90):
        for bits in (4, 8):
            src = ASTSource(k._qlinear_kernel, sig, constexprs={"BITS": bits, "HAS_BIAS": True,
                            "FP32_DOT": dtype == "fp32", "BLOCK_M": 16, "BLOCK_N": 32})
            assert "cubin" in triton.compile(src, target=GPUTarget("cuda", arch, 32)).asm
print("compiled")
"""


def test_triton_kernel_compiles_for_sm80_and_sm90():
    """Triton's real compiler (to cubin, no GPU needed) on the kernel the interpreter tests."""
    import importlib.util
    import os
    import subprocess
    import sys

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], capture_output=True, text=True, env=env,
                         timeout=900)
    assert run.returncode == 0 and "compiled" in run.stdout, run.stdout[-2000:] + run.stderr[-4000:]
