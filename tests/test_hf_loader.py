"""Hugging Face directory loader: tiny random Llama and Qwen2 checkpoints written by transformers'
own classes (save_pretrained, no network); our fp32 logits must equal transformers' within
1e-3 (absolute + relative; the random logits reach ~10, measured max |diff| about 1e-4:
RoPE angles and sums are rounded differently)."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from forkdec.models import ContiguousAttention, load_model
from forkdec.models.hf_loader import load_hf

pytestmark = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                reason="transformers is a test dependency: pip install '.[test]'")

VOCAB = 96
VARIANTS = {
    # GQA 4:2, untied head, llama3 RoPE scaling with a short original context so all three bands occur
    "llama-gqa-llama3": ("llama", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                       tie_word_embeddings=False, rope_theta=5000.0,
                                       rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    # MHA, tied embeddings, linear RoPE scaling, head dim 64
    "llama-mha-tied-linear": ("llama", dict(num_attention_heads=2, num_key_value_heads=2, head_dim=64,
                                            tie_word_embeddings=True, rope_theta=10000.0,
                                            rope_scaling={"rope_type": "linear", "factor": 4.0})),
    # Qwen2: q/k/v biases, tied
    "qwen2-tied": ("qwen2", dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True)),
    "qwen2-untied": ("qwen2", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)),
}


def _config(kind: str, extra: dict):
    from transformers import LlamaConfig, Qwen2Config

    extra = dict(extra)
    theta, scaling = extra.pop("rope_theta", 10000.0), extra.pop("rope_scaling", None)
    rope = {"rope_type": "default", "rope_theta": theta} if scaling is None else {**scaling, "rope_theta": theta}
    common = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=160, num_hidden_layers=2,
                  max_position_embeddings=512, rms_norm_eps=1e-6, rope_parameters=rope, **extra)
    return LlamaConfig(**common) if kind == "llama" else Qwen2Config(**common)


def _write(tmp_path, name: str):
    from transformers import LlamaForCausalLM, Qwen2ForCausalLM

    kind, extra = VARIANTS[name]
    torch.manual_seed(sum(map(ord, name)))
    model = (LlamaForCausalLM if kind == "llama" else Qwen2ForCausalLM)(_config(kind, extra)).eval()
    with torch.no_grad():  # large random weights (biases and norms included) so every term shows in the logits
        for p in model.parameters():
            p.normal_(0, 0.2 if p.dim() > 1 else 1.0)
    path = tmp_path / name
    model.save_pretrained(str(path))
    return model, str(path)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_match_transformers(tmp_path, name):
    ref_model, path = _write(tmp_path, name)
    ours = load_hf(path, dtype=torch.float32)
    kind, extra = VARIANTS[name]
    assert ours.config.architecture == kind
    assert ours.config.tie_word_embeddings == extra["tie_word_embeddings"]
    assert ours.config.attention_bias == (kind == "qwen2")
    assert (ours.lm_head is ours.embed) == extra["tie_word_embeddings"]
    torch.manual_seed(0)
    # 300 positions: past the llama3 variant's original context (64) and into scaled RoPE bands
    tokens = torch.randint(0, VOCAB, (300,))
    with torch.no_grad():
        want = ref_model(tokens[None]).logits[0].float()
    got = ours(tokens, torch.arange(300), ContiguousAttention(2))
    assert want.abs().max() > 1  # the check is not vacuous
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)


def test_bf16_load(tmp_path):
    ref_model, path = _write(tmp_path, "qwen2-tied")
    ours = load_hf(path, dtype=torch.bfloat16)
    assert ours.dtype == torch.bfloat16 and ours.embed.dtype == torch.bfloat16
    tokens = torch.randint(0, VOCAB, (20,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref_model(tokens[None]).logits[0]
    got = ours(tokens, torch.arange(20), ContiguousAttention(2))
    assert got.dtype == torch.float32
    # bf16 rounding of weights and activations: a few percent of the logits' spread
    assert (got - want).abs().mean() < 0.05 * want.std()


def test_load_model_directory_with_tokenizer(tmp_path):
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers

    ref_model, path = _write(tmp_path, "llama-gqa-llama3")
    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(VOCAB - 3)]
    backend = Backend(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.save(f"{path}/tokenizer.json")
    with open(f"{path}/tokenizer_config.json", "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>",
                   "chat_template": "{% for m in messages %}{{ m['content'] }} {% endfor %}"}, f)
    model, tok = load_model(path, dtype=torch.float32)
    assert tok.encode("w5 w7 zzz", add_bos=True) == [1, 8, 10, 0]
    assert tok.bos_token_id == 1 and tok.eos_token_ids == [2]
    assert tok.apply_chat_template([{"role": "user", "content": "w1"}]) == "w1 "
    tokens = torch.tensor(tok.encode("w1 w2 w3 w4"))
    with torch.no_grad():
        want = ref_model(tokens[None]).logits[0, -1:]
    got = model(tokens, torch.arange(4), ContiguousAttention(2), logits_rows=torch.tensor([3]))
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "vocab_size": 10}))
    with pytest.raises(ValueError, match="^model: architecture .*GPT2LMHeadModel"):
        load_hf(str(tmp_path))
    with pytest.raises(ValueError, match="^model: architecture .*GPT2LMHeadModel"):
        load_model(str(tmp_path))


def test_unsupported_variants(tmp_path):
    _, path = _write(tmp_path, "qwen2-tied")
    cfg = json.loads(open(f"{path}/config.json").read())
    for key, value in (("use_sliding_window", True), ("mlp_bias", True), ("hidden_act", "gelu")):
        with open(f"{path}/config.json", "w") as f:
            json.dump({**cfg, key: value}, f)
        with pytest.raises(ValueError, match=f"^model: .*{key}"):
            load_hf(path)


def test_bad_directories(tmp_path):
    with pytest.raises(ValueError, match="^model: .*config.json"):
        load_hf(str(tmp_path))
    _, path = _write(tmp_path, "qwen2-tied")
    with open(f"{path}/model.safetensors", "r+b") as f:
        f.truncate(100)
    with pytest.raises(ValueError, match="^model: cannot read .*model.safetensors"):
        load_hf(path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(open(f"{path}/config.json").read())
    with pytest.raises(ValueError, match="^model: .*safetensors"):
        load_hf(str(tmp_path / "empty"))
