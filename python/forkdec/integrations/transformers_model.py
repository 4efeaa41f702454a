"""A loaded transformers model and tokenizer behind forkdec.models' interface, weights used in place.

`TransformersModel` runs the HF model's own modules (embedding, RMSNorms, the
q/k/v/o and MLP nn.Linear layers, rotary embedding, final norm, LM head) and
leaves attention to forkdec's `attend`, so `forkdec.Engine` decodes on the very
parameters the user loaded. Nothing is fused or copied (forkdec's LlamaModel
fuses q/k/v and gate/up into new matrices, which would double the memory); the
price is three q/k/v GEMMs instead of one.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from forkdec.integrations.transformers import check_model
from forkdec.models.config import ModelConfig
from forkdec.models.llama import _rotate
from forkdec.validation import require

Attend = Callable[..., Tensor]


def _eos_ids(*values: Any) -> list[int]:
    out: list[int] = []
    for v in values:
        for e in (v if isinstance(v, (list, tuple)) else [v]):
            if e is not None and int(e) not in out:
                out.append(int(e))
    return out


def model_config(model: Any) -> ModelConfig:
    """forkdec's ModelConfig of a supported transformers model. Sliding windows cap the context:
    below the window, windowed attention equals full attention, so the engine never needs one."""
    cfg = check_model(model)
    heads = cfg.num_attention_heads
    context = int(getattr(cfg, "max_position_embeddings", 2048))
    window = getattr(cfg, "sliding_window", None)
    if window and (cfg.model_type != "qwen2" or getattr(cfg, "use_sliding_window", False)):
        context = min(context, int(window))
    gen = getattr(model, "generation_config", None)
    return ModelConfig(
        architecture=cfg.model_type, vocab_size=int(cfg.vocab_size), hidden_size=int(cfg.hidden_size),
        intermediate_size=int(cfg.intermediate_size), num_layers=int(cfg.num_hidden_layers), num_heads=int(heads),
        num_kv_heads=int(getattr(cfg, "num_key_value_heads", None) or heads),
        head_dim=int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads),
        # RoPE is computed by the model's own rotary module (any scaling it implements); theta is informational.
        rope_theta=float((getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", 10000.0)),
        rms_norm_eps=float(getattr(cfg, "rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)), max_position_embeddings=context,
        bos_token_id=cfg.bos_token_id, eos_token_ids=_eos_ids(cfg.eos_token_id, getattr(gen, "eos_token_id", None)),
        attention_bias=bool(getattr(cfg, "attention_bias", False) or cfg.model_type == "qwen2"))


class TransformersModel:
    """forkdec.models' model interface over a transformers *ForCausalLM (Llama, Mistral, Qwen2).

    forward(tokens [T] int64, positions [T] int64, attend, logits_rows [R] | None) -> fp32 [R or T, V];
    attend(layer, q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D]) -> [T, Hq, D], q and k after RoPE,
    in the model's dtype; attends that set `needs_layer_input` also get x= the layer's
    normed attention input [T, hidden] and residual= its pre-norm residual stream.
    The HF modules are held by reference.
    """

    def __init__(self, hf_model: Any) -> None:
        self.config = model_config(hf_model)
        inner = getattr(hf_model, "model", None)
        layers = getattr(inner, "layers", None)
        require(layers is not None and hasattr(hf_model, "lm_head") and hasattr(inner, "rotary_emb"), "model",
                f"{type(hf_model).__name__} lacks the .model.layers / .model.rotary_emb / .lm_head of a "
                "*ForCausalLM decoder")
        for i, layer in enumerate(layers):
            attn = getattr(layer, "self_attn", None)
            require(all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
                    and hasattr(layer, "mlp") and hasattr(layer, "input_layernorm"), "model",
                    f"layer {i} is not a Llama-style decoder layer")
            scale = getattr(attn, "scaling", self.config.head_dim ** -0.5)
            require(abs(scale * self.config.head_dim ** 0.5 - 1) < 1e-6, "model",
                    f"layer {i} scales attention by {scale}, the engine's attention uses 1/sqrt(head_dim)")
        self.hf = hf_model  # held by reference: its parameters are the ones the engine runs

    @property
    def dtype(self) -> torch.dtype:
        return self.hf.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.hf.model.embed_tokens.weight.device

    @torch.no_grad()
    def forward(self, tokens: Tensor, positions: Tensor, attend: Attend,
                logits_rows: Tensor | None = None) -> Tensor:
        cfg, inner = self.config, self.hf.model
        t, hq, hkv, d = tokens.shape[0], cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        pass_x = bool(getattr(attend, "needs_layer_input", False))
        x = inner.embed_tokens(tokens.to(self.device))
        # The model's rotary module gives cos/sin [1, T, D] (halves repeated, attention scaling applied).
        cos, sin = inner.rotary_emb(x[None], positions.to(self.device)[None])
        cos, sin = cos[0, :, None, : d // 2].to(x.dtype), sin[0, :, None, : d // 2].to(x.dtype)
        for i, layer in enumerate(inner.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = _rotate(attn.q_proj(h).view(t, hq, d), cos, sin)
            k = _rotate(attn.k_proj(h).view(t, hkv, d), cos, sin)
            v = attn.v_proj(h).view(t, hkv, d)
            extra = {"x": h, "residual": x} if pass_x else {}
            out = attend(i, q.contiguous(), k.contiguous(), v.contiguous(), **extra)
            x = x + attn.o_proj(out.reshape(t, hq * d))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        if logits_rows is not None:
            x = x.index_select(0, logits_rows.to(device=x.device, dtype=torch.long))
        return self.hf.lm_head(inner.norm(x)).float()

    __call__ = forward


class TransformersTokenizer:
    """forkdec's tokenizer interface over a transformers tokenizer: encode(text, add_bos=False),
    decode(ids, skip_special=True), apply_chat_template(messages, add_generation_prompt=True),
    eos_token_ids, bos_token_id."""

    def __init__(self, tokenizer: Any, eos_token_ids: list[int] | None = None) -> None:
        require(callable(getattr(tokenizer, "encode", None)) and callable(getattr(tokenizer, "decode", None)),
                "tokenizer", f"expected a transformers tokenizer, got {type(tokenizer).__name__}")
        self.hf = tokenizer
        self.bos_token_id = tokenizer.bos_token_id
        self.eos_token_ids = _eos_ids(tokenizer.eos_token_id, eos_token_ids)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        require(isinstance(text, str), "text", f"expected str, got {type(text).__name__}")
        ids = list(self.hf.encode(text, add_special_tokens=False))
        if add_bos:
            require(self.bos_token_id is not None, "add_bos", "this tokenizer has no BOS token")
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **variables: Any) -> str:
        require(getattr(self.hf, "chat_template", None) is not None, "messages", "this tokenizer has no chat template")
        return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                           **variables)


def adapt(model: Any, tokenizer: Any) -> tuple[TransformersModel, TransformersTokenizer]:
    """The (model, tokenizer) pair forkdec.Engine takes, over a loaded transformers model and tokenizer."""
    adapted = TransformersModel(model)
    return adapted, TransformersTokenizer(tokenizer, adapted.config.eos_token_ids)
