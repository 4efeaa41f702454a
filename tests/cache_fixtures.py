"""Helpers of the transformers quantized-cache tests: perplexity through `forkdec_cache`, fed exactly
as forkdec.eval.perplexity feeds its windows, and tiny random checkpoints forkdec can load too."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def hf_perplexity(model, ids, kv: str, *, window: int, chunk: int, windows: int) -> float:
    """PPL of a transformers model over `windows` non-overlapping `window`-token windows of `ids`,
    each fed in `chunk`-token forwards through a fresh forkdec_cache(model, kv) (no BOS added)."""
    from forkdec.integrations.transformers_cache import forkdec_cache

    nll, count = 0.0, 0
    with torch.no_grad():
        for w in range(windows):
            toks = torch.as_tensor(ids[w * window:(w + 1) * window], dtype=torch.long)
            with forkdec_cache(model, kv) as cache:
                for start in range(0, window, chunk):
                    end = min(window, start + chunk)
                    logits = model(toks[None, start:end], past_key_values=cache, use_cache=True).logits[0]
                    targets = toks[start + 1:end + 1]
                    nll += float(F.cross_entropy(logits[:targets.numel()].float(), targets, reduction="sum"))
                    count += targets.numel()
    return math.exp(nll / count)


def tiny_checkpoint(tmp_path, model_type: str = "llama", seed: int = 0):
    """(transformers model, forkdec LlamaModel) of one random 2-layer checkpoint (GQA 4:2, head dim 32,
    hidden 128), saved by transformers and loaded back by forkdec's HF loader. Weights are large
    enough that every quantized term shows in the logits."""
    import transformers

    from forkdec.models.hf_loader import load_hf

    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[model_type]
    config = cls[0](vocab_size=96, hidden_size=128, intermediate_size=160, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
                    rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                    tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = cls[1](config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1 if p.dim() > 1 else 1.0)
    path = tmp_path / f"{model_type}-{seed}"
    model.save_pretrained(str(path))
    return model, load_hf(str(path), dtype=torch.float32)


class ForkdecOnHFWeights:
    """forkdec's model interface over a transformers model (TransformersModel) plus what forkdec's
    QuantizedKVCache reads from a forkdec LlamaModel: layers[i].qkv / attn_norm / qkv_bias and
    inv_freq. forkdec.eval.perplexity then runs forkdec's own cache on the very weights the
    transformers cache sees, isolating the cache path from model numerics (test-only: qkv is a copy)."""

    def __init__(self, hf) -> None:
        from types import SimpleNamespace

        from forkdec.integrations.transformers_model import TransformersModel

        self.inner = TransformersModel(hf)
        self.config, self.dtype, self.device = self.inner.config, self.inner.dtype, self.inner.device
        self.layers = []
        for layer in hf.model.layers:
            a = layer.self_attn
            projs = (a.q_proj, a.k_proj, a.v_proj)
            bias = None if a.k_proj.bias is None else torch.cat([p.bias.detach() for p in projs])
            self.layers.append(SimpleNamespace(qkv=torch.cat([p.weight.detach() for p in projs]),
                                               attn_norm=layer.input_layernorm.weight.detach(), qkv_bias=bias))
        self.inv_freq = hf.model.rotary_emb.inv_freq

    def forward(self, *args, **kwargs):
        return self.inner.forward(*args, **kwargs)

    __call__ = forward
