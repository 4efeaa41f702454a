"""Load a llama- or qwen2-architecture GGUF file (llama.cpp's format) into LlamaModel.

Metadata and the tensor table are read by `gguf_file.GGUFFile`. With
quantized=False every tensor is dequantized with the `gguf` package (Q4_1, Q8_0,
F16, F32 and whatever else it can dequantize) to fp32, then cast to the model
dtype. With quantized=True the matrices in a format the qlinear kernels compute
with (Q4_0, Q4_1, Q8_0) stay as stored, packed by forkdec.qweight.pack_gguf; any
other matrix format (Q4_K, Q6_K, F16, ...) falls back to dequantized weights with
a warning naming the tensor and its type.
"""
from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

from forkdec.models.config import ModelConfig
from forkdec.models.gguf_file import GGUFFile
from forkdec.models.llama import LlamaModel
from forkdec.qweight import QuantizedWeight, ggml_type_name, pack_gguf, supported

# GGUF tensor name -> Hugging Face name (per block: "blk.{i}." -> "model.layers.{i}.").
_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
_BLOCK = {"attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
          "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
          "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
          "attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias",
          "attn_v.bias": "self_attn.v_proj.bias",
          "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
          "ffn_down.weight": "mlp.down_proj.weight"}
SUPPORTED_ARCHITECTURES = ("llama", "qwen2")


def open_gguf(path: str) -> GGUFFile:
    """The metadata and tensor table of the GGUF file `path`; a missing, truncated or
    corrupt file raises ValueError naming it."""
    return GGUFFile(path)


def field(reader: GGUFFile, key: str, default: Any = None) -> Any:
    """A metadata value as a Python scalar, str or list; `default` if absent."""
    return reader.field(key, default)


def read_config(reader: GGUFFile, path: str) -> ModelConfig:
    arch = field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"model: architecture {arch!r} in {path!r} is not supported "
                         f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")

    def meta(key: str, default: Any = None) -> Any:
        value = field(reader, f"{arch}.{key}", default)
        if value is None:
            raise ValueError(f"model: {path!r} lacks the metadata key {arch}.{key}")
        return value

    names = {t.name for t in reader.tensors}
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embd is None:
        raise ValueError(f"model: {path!r} has no token_embd.weight tensor")
    vocab = int(field(reader, f"{arch}.vocab_size", embd.shape[0]))
    hidden = int(meta("embedding_length"))
    heads = int(meta("attention.head_count"))
    head_dim = int(meta("attention.key_length", hidden // heads))
    # Refuse what the model would compute wrong rather than load it silently.
    if int(meta("rope.dimension_count", head_dim)) != head_dim:
        raise ValueError(f"model: {path!r} rotates {meta('rope.dimension_count')} of {head_dim} head dims "
                         "(partial RoPE is not supported)")
    if "rope_freqs.weight" in names:
        raise ValueError(f"model: {path!r} has per-frequency RoPE factors (rope_freqs.weight, Llama 3.1 style), "
                         "which are not supported; load the Hugging Face checkpoint instead")
    scaling = None
    kind = field(reader, f"{arch}.rope.scaling.type")
    if kind not in (None, "none"):
        scaling = {"rope_type": kind, "factor": float(meta("rope.scaling.factor"))}
        orig = field(reader, f"{arch}.rope.scaling.original_context_length")
        if orig is not None:
            scaling["original_max_position_embeddings"] = int(orig)
    eos: list[int] = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"):
        value = field(reader, key)
        if value is not None and int(value) not in eos:
            eos.append(int(value))
    return ModelConfig(
        architecture=arch, vocab_size=vocab, hidden_size=hidden,
        intermediate_size=int(meta("feed_forward_length")), num_layers=int(meta("block_count")),
        num_heads=heads, num_kv_heads=int(meta("attention.head_count_kv", heads)),
        head_dim=head_dim,
        rope_theta=float(meta("rope.freq_base", 10000.0)), rope_scaling=scaling,
        rms_norm_eps=float(meta("attention.layer_norm_rms_epsilon", 1e-5)),
        tie_word_embeddings="output.weight" not in names,
        max_position_embeddings=int(meta("context_length", 2048)),
        bos_token_id=field(reader, "tokenizer.ggml.bos_token_id"), eos_token_ids=eos,
        attention_bias="blk.0.attn_q.bias" in names)


def _unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo convert_hf_to_gguf's row permutation of q/k (llama.cpp rotates adjacent pairs;
    the Hugging Face layout, which LlamaModel uses, rotates pairs (i, i + D/2))."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _unpermute_index(rows: int, heads: int) -> torch.Tensor:
    """The row order `_unpermute` applies, as an index (to permute packed rows)."""
    return _unpermute(torch.arange(rows)[:, None], heads)[:, 0]


def read_weights(reader: GGUFFile, config: ModelConfig, path: str,
                 quantized: bool = False) -> dict[str, torch.Tensor | QuantizedWeight]:
    """Every tensor under its Hugging Face name, q/k rows un-permuted: fp32, or with
    quantized=True the Q4_0/Q4_1/Q8_0 matrices as packed QuantizedWeights."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    out: dict[str, torch.Tensor | QuantizedWeight] = {}
    fallbacks: list[str] = []
    for t in reader.tensors:
        name = _GLOBAL.get(t.name)
        if name is None and t.name.startswith("blk."):
            _, i, rest = t.name.split(".", 2)
            if rest in _BLOCK:
                name = f"model.layers.{i}.{_BLOCK[rest]}"
        if name is None:
            continue  # e.g. rope_freqs: derived from the config instead
        heads = None
        if config.architecture == "llama" and ".attn_q." in t.name:  # only llama's converter permutes q/k
            heads = config.num_heads
        elif config.architecture == "llama" and ".attn_k." in t.name:
            heads = config.num_kv_heads
        if quantized and len(t.shape) == 2:
            if supported(t.ggml_type):
                w = pack_gguf(reader.tensor_data(t), t.ggml_type, tuple(t.shape), name=t.name)
                out[name] = w if heads is None else w.rows(_unpermute_index(t.shape[0], heads))
                continue
            fallbacks.append(f"{t.name} ({ggml_type_name(t.ggml_type)})")
        try:
            kind = GGMLQuantizationType(t.ggml_type)
            array = dequantize(reader.tensor_data(t), kind)
        except Exception as e:  # NotImplementedError for types gguf cannot dequantize
            raise ValueError(f"model: cannot dequantize {t.name} (ggml type {t.ggml_type}) in {path!r}: {e}") from e
        array = np.ascontiguousarray(array, dtype=np.float32)
        if not array.flags.writeable:  # F32 tensors come back as views of the read-only map
            array = array.copy()
        w = torch.from_numpy(array).reshape(t.shape)
        out[name] = w if heads is None else _unpermute(w, heads)
    if fallbacks:
        warnings.warn(f"model: {len(fallbacks)} matrices of {path!r} are in GGUF types without a qlinear kernel "
                      f"and are dequantized instead: {', '.join(fallbacks[:6])}"
                      + (" ..." if len(fallbacks) > 6 else ""), stacklevel=3)
    return out


def load_gguf(path: str, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
              reader: GGUFFile | None = None, quantized: bool = False) -> LlamaModel:
    """LlamaModel with the weights of the GGUF file at `path`: activations and dense
    weights in `dtype`; with quantized=True the matrices stay in their GGUF blocks.
    `reader`: an `open_gguf(path)` already made (the tokenizer reads the same one)."""
    reader = open_gguf(path) if reader is None else reader
    config = read_config(reader, path)
    model = LlamaModel(config, dtype=dtype, device=device)
    model.load_weights(read_weights(reader, config, path, quantized=quantized))
    return model
