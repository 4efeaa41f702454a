"""forkdec.integrations.transformers.enable against the model's own sdpa attention.

Same weights, same fp32 arithmetic outside attention: logits may differ only by
attention's summation order. Tolerance 2e-3 absolute on logits of magnitude up
to ~40 (as tests/test_model.py; measured about 1e-4), argmax equal, and greedy
`generate` tokens identical.
"""
from __future__ import annotations

import pytest
import torch

from forkdec.backends import unavailable_reason
from forkdec.integrations.transformers import enable, forkdec_attention, implementation_name
from integrations_fixtures import NEEDS_MODEL, NEEDS_TRANSFORMERS, WIKI, load_default_hf, tiny_hf

pytestmark = NEEDS_TRANSFORMERS
LOGIT_ATOL = 2e-3
TINY_ATOL = 1e-4  # random tiny models: logits of magnitude ~1


@pytest.fixture(scope="module")
def default_hf():
    return load_default_hf()


def logits(model, impl, **inputs):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model(**inputs).logits.float()


@NEEDS_MODEL
def test_prefill_logits_match_sdpa(default_hf):
    model, tok = default_hf
    with open(WIKI, encoding="utf-8") as f:
        ids = torch.tensor([tok.encode(f.read(), add_special_tokens=False)[:160]])
    ref = logits(model, "sdpa", input_ids=ids)
    enable(model)
    assert model.config._attn_implementation == "forkdec"
    got = logits(model, "forkdec", input_ids=ids)
    torch.testing.assert_close(got, ref, atol=LOGIT_ATOL, rtol=0)
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


@NEEDS_MODEL
def test_left_padded_batch_matches_sdpa(default_hf):
    """Two prompts of different lengths, left-padded: the padding arrives as a boolean mask."""
    model, tok = default_hf
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    batch = tok(["The capital of France is", "One, two, three, four, five, six, seven,"], return_tensors="pt",
                padding=True)
    assert not bool(batch["attention_mask"].all()), "the batch must contain padding"
    ref = logits(model, "sdpa", **batch)
    enable(model)
    got = logits(model, "forkdec", **batch)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got[real], ref[real], atol=LOGIT_ATOL, rtol=0)


@NEEDS_MODEL
def test_generate_greedy_tokens_identical(default_hf):
    model, tok = default_hf
    text = tok.apply_chat_template([{"role": "user", "content": "What is 17 * 23?"}], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=False)
    kwargs = dict(max_new_tokens=32, do_sample=False)
    model.set_attn_implementation("sdpa")
    ref = model.generate(**ids, **kwargs)
    enable(model)
    got = model.generate(**ids, **kwargs)
    assert got.tolist() == ref.tolist()


def backends():
    out = []
    for b in ("reference", "cpu", "triton"):
        reason = unavailable_reason(b, "attention", torch.device("cpu"))
        out.append(pytest.param(b, marks=pytest.mark.skip(reason=reason)) if reason else b)
    return out


@pytest.mark.parametrize("model_type, overrides", [
    ("llama", {}),
    ("llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 64}}),
    ("mistral", {"sliding_window": 7}),  # shorter than the prompt: the window mask must bite
    ("qwen2", {}),
], ids=["llama", "llama3_rope", "mistral_window7", "qwen2"])
@pytest.mark.parametrize("backend", backends())
def test_tiny_models_prefill_and_cached_decode(model_type, overrides, backend):
    """Prefill of a padded batch of two, then three cached decode steps, per backend."""
    model = tiny_hf(model_type, **overrides)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 97, (2, 11), generator=gen)
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, :3] = 0  # left padding in the second row
    impl = implementation_name(backend)

    def run(name):
        model.set_attn_implementation(name)
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                                  output_logits=True, return_dict_in_generate=True, pad_token_id=0)

    ref = run("sdpa")
    enable(model, backend=backend)
    got = run(impl)
    assert got.sequences.tolist() == ref.sequences.tolist()
    for a, b in zip(got.logits, ref.logits):
        torch.testing.assert_close(a, b, atol=TINY_ATOL, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_attention_function_masks_match_sdpa(dtype):
    """The function alone on HF-shaped tensors: no mask (causal, S < S_kv as after a cache),
    a boolean mask, an additive float mask and a sliding window, against torch's SDPA."""
    gen = torch.Generator().manual_seed(2)
    b, hq, hkv, s, skv, d = 2, 4, 2, 3, 9, 32
    q = torch.randn(b, hq, s, d, generator=gen).to(dtype)
    k = torch.randn(b, hkv, skv, d, generator=gen).to(dtype)
    v = torch.randn(b, hkv, skv, d, generator=gen).to(dtype)
    module = torch.nn.Module()
    causal = torch.ones(s, skv, dtype=torch.bool).tril(skv - s)
    boolean = causal.expand(b, 1, s, skv).clone()
    boolean[0, 0, :, :2] = False  # two padded keys in the first row
    window = causal & ~torch.ones(s, skv, dtype=torch.bool).tril(skv - s - 4)

    def sdpa(mask):
        kk, vv = k.repeat_interleave(2, 1).float(), v.repeat_interleave(2, 1).float()
        out = torch.nn.functional.scaled_dot_product_attention(q.float(), kk, vv, attn_mask=mask, scale=0.3)
        return out.transpose(1, 2)

    tol = 2e-5 if dtype == torch.float32 else 2e-2
    cases = [(None, {}, causal), (boolean, {}, boolean),
             (torch.where(boolean, 0.0, torch.finfo(dtype).min).to(dtype), {}, boolean),
             (None, {"sliding_window": 4}, window)]
    for mask, kwargs, expected_mask in cases:
        out, weights = forkdec_attention(module, q, k, v, mask, scaling=0.3, **kwargs)
        assert weights is None and out.shape == (b, s, hq, d) and out.dtype == dtype
        torch.testing.assert_close(out.float(), sdpa(expected_mask), atol=tol, rtol=tol)


def test_attention_function_refuses_what_it_cannot_do():
    q, k = torch.zeros(1, 2, 3, 32), torch.zeros(1, 2, 3, 32)
    module = torch.nn.Module()
    for kwargs, arg in [({"dropout": 0.1}, "dropout"), ({"softcap": 30.0}, "softcap"),
                        ({"attention_mask": torch.ones(1, 2, 3, 3, dtype=torch.bool)}, "attention_mask"),
                        ({"attention_mask": torch.full((1, 1, 3, 3), 0.5)}, "attention_mask")]:
        kwargs.setdefault("attention_mask", None)
        with pytest.raises(ValueError, match=f"^{arg}:"):
            forkdec_attention(module, q, k, k, **kwargs)
    with pytest.raises(ValueError, match="^q:"):
        forkdec_attention(module, torch.zeros(1, 2, 3, 48), torch.zeros(1, 2, 3, 48), torch.zeros(1, 2, 3, 48), None)


def test_unsupported_model_type_is_refused_before_anything_runs():
    import transformers

    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, attn_implementation="sdpa")
    model = transformers.GPT2LMHeadModel(config).eval()
    with pytest.raises(ValueError, match="^model: model type 'gpt2' is not supported"):
        enable(model)
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="^model:"):
        enable(object())


def test_bad_backend_names_the_argument():
    with pytest.raises(ValueError, match="^backend:"):
        enable(tiny_hf("llama"), backend="nope")
