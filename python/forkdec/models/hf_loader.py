"""Load a local Hugging Face checkpoint directory (config.json + *.safetensors) into LlamaModel."""
from __future__ import annotations

import json
import os

import torch

from forkdec.models.config import ModelConfig
from forkdec.models.llama import LlamaModel

SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}


def read_hf_config(path: str) -> ModelConfig:
    """ModelConfig from `path`/config.json; ValueError naming an unsupported architecture."""
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise ValueError(f"model: {path!r} has no config.json")
    try:
        with open(file, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"model: cannot read {file!r}: {e}") from e
    archs = cfg.get("architectures") or []
    known = [a for a in archs if a in SUPPORTED_ARCHITECTURES]
    if not known:
        raise ValueError(f"model: architecture {archs or cfg.get('model_type')!r} in {path!r} is not supported "
                         f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    arch = SUPPORTED_ARCHITECTURES[known[0]]
    # Variants the model does not implement: refuse rather than load them wrong.
    if cfg.get("mlp_bias"):
        raise ValueError(f"model: {known[0]} with mlp_bias=True in {path!r} is not supported")
    if arch == "llama" and cfg.get("attention_bias"):
        raise ValueError(f"model: {known[0]} with attention_bias=True (an o_proj bias) in {path!r} is not supported")
    if cfg.get("use_sliding_window"):
        raise ValueError(f"model: {known[0]} with use_sliding_window=True in {path!r} is not supported")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"model: {known[0]} with hidden_act={cfg['hidden_act']!r} in {path!r} is not supported")
    heads = int(cfg["num_attention_heads"])
    eos = cfg.get("eos_token_id")
    eos = [] if eos is None else [int(e) for e in (eos if isinstance(eos, list) else [eos])]
    scaling = cfg.get("rope_scaling")
    theta = cfg.get("rope_theta")
    params = cfg.get("rope_parameters")  # transformers 5 keeps theta and scaling here
    if isinstance(params, dict):
        theta = params.get("rope_theta", theta)
        kind = params.get("rope_type", params.get("type"))
        if scaling is None and kind not in (None, "default"):
            scaling = params
    if isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type")) == "default":
        scaling = None
    return ModelConfig(
        architecture=arch, vocab_size=int(cfg["vocab_size"]), hidden_size=int(cfg["hidden_size"]),
        intermediate_size=int(cfg["intermediate_size"]), num_layers=int(cfg["num_hidden_layers"]),
        num_heads=heads, num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads),
        rope_theta=float(theta if theta is not None else 10000.0), rope_scaling=scaling,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        bos_token_id=cfg.get("bos_token_id"), eos_token_ids=eos,
        attention_bias=arch == "qwen2")  # Qwen2 always has q/k/v biases


def read_safetensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise ValueError(f"model: {path!r} has no *.safetensors files")
    weights: dict[str, torch.Tensor] = {}
    for name in files:
        try:
            weights.update(load_file(os.path.join(path, name)))
        except Exception as e:  # safetensors raises its own error types on bad headers
            raise ValueError(f"model: cannot read {os.path.join(path, name)!r}: {e}") from e
    return weights


def load_hf(path: str, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> LlamaModel:
    """LlamaModel with the weights of the Hugging Face directory `path` (Llama, SmolLM, Qwen2)."""
    config = read_hf_config(path)
    model = LlamaModel(config, dtype=dtype, device=device)
    weights = read_safetensors(path)
    if config.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    model.load_weights(weights)
    return model
