"""forkdec.Engine.from_transformers: forkdec's engine on a loaded transformers model's own weights.

Greedy paths must equal transformers' greedy `generate` and forkdec's own
LlamaModel engine token for token (fp32 on both sides; attention summation
order is the only difference). Logits of tiny random models through the
adapter match the HF forward within 1e-4.
"""
from __future__ import annotations

import pytest
import torch

import forkdec
from forkdec.engine import SamplingParams
from forkdec.integrations.transformers_model import TransformersModel, TransformersTokenizer, adapt
from forkdec.models import ContiguousAttention, load_model
from integrations_fixtures import NEEDS_MODEL, NEEDS_TRANSFORMERS, load_default_hf, tiny_hf

pytestmark = NEEDS_TRANSFORMERS
PROMPT = "What is 17 * 23?"
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=40, seed=0)


@pytest.fixture(scope="module")
def default_hf():
    return load_default_hf()


def param_ptrs(model) -> dict[str, int]:
    return {name: p.data_ptr() for name, p in model.named_parameters()}


@NEEDS_MODEL
def test_greedy_paths_equal_transformers_generate_and_forkdec_engine(default_hf):
    model, tok = default_hf
    before = param_ptrs(model)
    engine = forkdec.Engine.from_transformers(model, tok)
    out = engine.generate([PROMPT], n=3, params=GREEDY)[0]
    assert len(out) == 3 and all(c.token_ids == out[0].token_ids for c in out)
    # The weights the engine ran are the model's own, where they were.
    assert engine.model.hf is model and param_ptrs(model) == before
    assert not any(isinstance(v, torch.Tensor) for v in vars(engine.model).values())

    ids = torch.tensor([engine.encode(PROMPT)])
    model.set_attn_implementation("sdpa")
    ref = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=GREEDY.max_new_tokens,
                         do_sample=False)[0, ids.shape[1]:].tolist()
    eos = set(engine.eos_ids())
    ref = ref[: next((i + 1 for i, t in enumerate(ref) if t in eos), len(ref))]
    assert out[0].token_ids == ref

    own = forkdec.Engine(load_model(dtype=torch.float32))
    assert own.generate([PROMPT], n=1, params=GREEDY)[0][0].token_ids == ref


@NEEDS_MODEL
def test_many_sampled_paths_in_one_line(default_hf):
    model, tok = default_hf
    out = forkdec.Engine.from_transformers(model, tok).generate(
        [PROMPT], n=32, params=SamplingParams(temperature=0.8, max_new_tokens=6, seed=1))
    assert len(out) == 1 and len(out[0]) == 32
    assert all(1 <= len(c.token_ids) <= 6 for c in out[0])
    assert len({tuple(c.token_ids) for c in out[0]}) > 1, "32 sampled paths should not all agree"


@NEEDS_MODEL
def test_tokenizer_adapter_equals_forkdec_tokenizer(default_hf):
    _, hf_tok = default_hf
    _, ours = load_model(dtype=torch.float32)
    tok = TransformersTokenizer(hf_tok)
    for text in ["Hello world", "  spaces\tand\nlines", "unicode: café 東京", "<|im_start|>user\nhi<|im_end|>"]:
        assert tok.encode(text) == ours.encode(text)
        assert tok.decode(tok.encode(text)) == ours.decode(ours.encode(text))
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    assert tok.apply_chat_template(messages) == ours.apply_chat_template(messages)
    assert tok.eos_token_ids == ours.eos_token_ids == [2]
    assert tok.encode("hi", add_bos=True)[0] == hf_tok.bos_token_id


@pytest.mark.parametrize("model_type, overrides", [
    ("llama", {}), ("llama", {"tie_word_embeddings": True}), ("mistral", {"sliding_window": 32}), ("qwen2", {}),
], ids=["llama", "llama_tied", "mistral", "qwen2"])
def test_adapter_logits_match_the_hf_forward(model_type, overrides):
    """Prefill then two single-token steps through ContiguousAttention, against one HF forward."""
    model = tiny_hf(model_type, **overrides)
    adapter = TransformersModel(model)
    ids = torch.randint(3, 97, (14,), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = model(ids[None]).logits[0]
    attend = ContiguousAttention(adapter.config.num_layers)
    got = torch.cat([adapter(ids[:12], torch.arange(12), attend),
                     adapter(ids[12:13], torch.tensor([12]), attend),
                     adapter(ids[13:], torch.tensor([13]), attend, logits_rows=torch.tensor([0]))])
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    if model_type == "mistral":  # the engine never goes past the window, where windowed = full attention
        assert adapter.config.max_position_embeddings == 32


@pytest.mark.parametrize("dtype, atol", [(torch.float16, 2e-2), (torch.bfloat16, 5e-2)], ids=str)
def test_adapter_runs_half_precision_models(dtype, atol):
    """A model loaded in half precision: the KV cache and q/k/v follow its dtype, logits come back fp32.
    Tolerance: a few units of the dtype's rounding on logits of magnitude ~1 (attention order differs)."""
    model = tiny_hf("llama").to(dtype)
    adapter = TransformersModel(model)
    assert adapter.dtype == dtype
    ids = torch.randint(3, 97, (10,), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        ref = model(ids[None]).logits[0].float()
    got = adapter(ids, torch.arange(10), ContiguousAttention(2))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=atol, rtol=0)


def test_engine_reads_the_weights_live():
    """Changing an HF weight in place changes the engine's logits: nothing was copied."""
    model = tiny_hf("llama")
    adapter, _ = adapt(model, _ByteTok())
    ids = torch.tensor([5, 6, 7])
    first = adapter(ids, torch.arange(3), ContiguousAttention(2))
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(2.0)
    second = adapter(ids, torch.arange(3), ContiguousAttention(2))
    assert not torch.allclose(first, second)


class _LayerInputAttend(ContiguousAttention):
    """An attend that asks for the layer's attention input, as XQuant caches do."""
    needs_layer_input = True

    def __init__(self, num_layers):
        super().__init__(num_layers)
        self.inputs, self.residuals = {}, {}

    def __call__(self, layer, q, k, v, *, x, residual):
        self.inputs[layer] = x
        self.residuals[layer] = residual
        return super().__call__(layer, q, k, v)


def test_layer_input_is_passed_when_asked():
    model = tiny_hf("qwen2")
    adapter = TransformersModel(model)
    ids = torch.tensor([3, 4, 5, 6])
    attend = _LayerInputAttend(2)
    got = adapter(ids, torch.arange(4), attend)
    torch.testing.assert_close(got, adapter(ids, torch.arange(4), ContiguousAttention(2)), atol=0, rtol=0)
    with torch.no_grad():
        embedded = model.model.embed_tokens(ids)
        expected = model.model.layers[0].input_layernorm(embedded)
    assert set(attend.inputs) == {0, 1} and attend.inputs[0].shape == (4, 128)
    torch.testing.assert_close(attend.inputs[0], expected, atol=0, rtol=0)
    torch.testing.assert_close(attend.residuals[0], embedded, atol=0, rtol=0)  # the stream before layer 0


class _ByteTok:
    eos_token_id, bos_token_id, chat_template = 2, 1, None

    def encode(self, text, add_special_tokens=False):
        return [3 + b % 90 for b in text.encode()]

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def test_tiny_engine_greedy_equals_transformers_generate():
    model = tiny_hf("qwen2", seed=3)
    engine = forkdec.Engine.from_transformers(model, _ByteTok(), page_size=4)
    out = engine.generate(["abcdefg"], n=2, params=SamplingParams(temperature=0.0, max_new_tokens=9,
                                                                   ignore_eos=True), chat=False)[0]
    ids = torch.tensor([engine.encode("abcdefg", chat=False)])
    ref = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=9, do_sample=False,
                         min_new_tokens=9, pad_token_id=0)[0, ids.shape[1]:].tolist()
    assert out[0].token_ids == out[1].token_ids == ref


def test_unsupported_models_are_refused():
    import transformers

    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="^model: model type 'gpt2' is not supported"):
        forkdec.Engine.from_transformers(gpt2, _ByteTok())
    with pytest.raises(ValueError, match="^tokenizer:"):
        forkdec.Engine.from_transformers(tiny_hf("llama"), object())
