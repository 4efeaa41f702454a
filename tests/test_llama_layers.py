"""torch.ops.forkdec.llama_layers, LlamaModel's layer loop in C++, against its reference:
the Python loop (model.cxx_layers = False). Same ops in the same order, so decoding must
give bitwise the same tokens and log-probabilities."""
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import forkdec
from engine_fixtures import ByteTokenizer
from forkdec.engine import Engine, SamplingParams
from forkdec.models.config import ModelConfig
from forkdec.models.llama import LlamaModel

needs_ext = pytest.mark.skipif(forkdec._extension.load() is None,
                               reason=f"C++ extension unavailable: {forkdec._extension.error()}")


def _decode(model, n, prompt, cxx):
    """Completions of n sampled paths and whether the C++ loop ran."""
    model.cxx_layers = cxx
    params = SamplingParams(temperature=0.9, max_new_tokens=12, ignore_eos=True, seed=5, top_logprobs=3)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = Engine(model, tokenizer=model.test_tokenizer).generate(prompt, n, params)
    ran = any(e.key == "forkdec::llama_layers" for e in prof.key_averages())
    return out, ran


@pytest.fixture(scope="module")
def smollm():
    from forkdec.models import load_model

    try:
        model, tokenizer = load_model(weights="gguf+bf16")
    except RuntimeError as e:  # the embedded model's package is missing
        pytest.skip(str(e))
    model.test_tokenizer = tokenizer
    return model


@needs_ext
# 1 and 5 paths: the stored blocks (qlinear); 70: the bf16 copies (more than qlinear_max_rows rows)
@pytest.mark.parametrize("n", [1, 5, 70])
def test_smollm_decodes_bitwise_as_the_python_loop(smollm, n):
    got, ran = _decode(smollm, n, "The three largest cities of France are", cxx=True)
    want, ran_python = _decode(smollm, n, "The three largest cities of France are", cxx=False)
    assert ran and not ran_python
    assert got == want


@needs_ext
@pytest.mark.parametrize("bias", [False, True])
def test_random_fp32_model_decodes_bitwise_as_the_python_loop(bias):
    cfg = ModelConfig("llama", vocab_size=300, hidden_size=128, intermediate_size=96, num_layers=3, num_heads=4,
                      num_kv_heads=2, head_dim=32, attention_bias=bias, tie_word_embeddings=True)
    model = LlamaModel(cfg)
    g = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        p.copy_(torch.randn(p.shape, generator=g) / 8 + (1.0 if "norm" in name else 0.0))
    model.test_tokenizer = ByteTokenizer()
    got, ran = _decode(model, 3, "abc", cxx=True)
    want, _ = _decode(model, 3, "abc", cxx=False)
    assert ran and got == want


@needs_ext
def test_bad_lists_are_refused():
    from op_samples import _llama_layers

    args = list(_llama_layers(torch.Generator().manual_seed(0)))
    with pytest.raises(RuntimeError, match="weights must hold 15 tensors per layer"):
        torch.ops.forkdec.llama_layers(*args[:3], args[3][:-1], *args[4:])
    with pytest.raises(RuntimeError, match="qbits must hold 4 values per layer"):
        torch.ops.forkdec.llama_layers(*args[:4], args[4][:-1], *args[5:])
    with pytest.raises(RuntimeError, match="k_caches and v_caches"):
        torch.ops.forkdec.llama_layers(*args[:9], args[9][:1], *args[10:])
