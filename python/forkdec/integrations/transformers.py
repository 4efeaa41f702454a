"""forkdec attention inside a Hugging Face transformers model: `enable(model)`.

transformers (5.x) lets a model's attention modules call any function
registered in its `AttentionInterface` under the name in
`config._attn_implementation`. `enable` registers `forkdec_attention` under
"forkdec" (or "forkdec_<backend>"), registers transformers' own `sdpa_mask` as
its mask builder (so padding and sliding windows arrive as boolean masks, or
None when plain causal attention is exact), and switches the model to it.

The function sees HF's tensors: query [B, Hq, S, D], key/value [B, Hkv, S_kv, D]
(the whole cache of the layer). They map onto `forkdec.ops.attention` without
copying K/V: key.transpose(1, 2) is a strided [B, S_kv, Hkv, D] view, i.e. B
pages of page_size S_kv, one per batch row. Only q is made token-major.
"""
from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

import forkdec.ops as ops
from forkdec.backends import resolve
from forkdec.ops.attention import BACKENDS, HEAD_DIMS, validate_tensors
from forkdec.validation import require, validation

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


def _page_table(batch: int, kv_len: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Batch row b is page b, full: kv_indptr [0..B], kv_indices [0..B-1], last_page_len S_kv."""
    indptr = torch.arange(batch + 1, dtype=torch.int32, device=device)
    return indptr, indptr[:-1], torch.full((batch,), kv_len, dtype=torch.int32, device=device)


def _window_mask(q_len: int, kv_len: int, window: int, device: torch.device) -> Tensor:
    """Causal (queries are the last q_len positions) and within `window` keys: [q_len, kv_len] bool."""
    qpos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    kpos = torch.arange(kv_len, device=device)[None, :]
    return (kpos <= qpos) & (kpos > qpos - window)


def _custom_mask(mask: Tensor, batch: int, q_len: int, kv_len: int) -> Tensor:
    """HF's [B or 1, 1, S, S_kv] mask (bool, or additive float 0 / very negative) as forkdec's
    flat custom mask: per batch row its [S, S_kv] matrix, row-major, concatenated."""
    require(mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[0] in (1, batch), "attention_mask",
            f"expected [B, 1, {q_len}, {kv_len}] (one mask for all heads), got {tuple(mask.shape)}")
    mask = mask[..., -kv_len:]  # eager-style masks may be wider than the layer's keys (sliding caches)
    require(tuple(mask.shape[2:]) == (q_len, kv_len), "attention_mask",
            f"expected [B, 1, {q_len}, {kv_len}], got {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        allowed = mask > torch.finfo(mask.dtype).min / 2
        require(bool((mask[allowed] == 0).all()), "attention_mask",
                "additive masks may hold only 0 (attend) and a very negative value (masked); biases are not supported")
        mask = allowed
    return mask.expand(batch, 1, q_len, kv_len).reshape(-1)


def forkdec_attention(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                      attention_mask: Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      sliding_window: int | None = None, backend: str = "auto",
                      **kwargs: Any) -> tuple[Tensor, None]:
    """A transformers attention function running `forkdec.ops.attention`.

    query [B, Hq, S, D], key/value [B, Hkv, S_kv, D] (fp32/fp16/bf16, Hq % Hkv == 0);
    attention_mask None (causal, queries are the last S positions) or [B, 1, S, S_kv]
    bool / additive; scaling: the softmax scale (default 1/sqrt(D)); sliding_window:
    applied when no mask is given. Returns (out [B, S, Hq, D] in query's dtype, None).
    """
    require(dropout == 0.0, "dropout", f"attention dropout {dropout} is not supported (use model.eval())")
    require(kwargs.get("softcap") is None, "softcap", "logit soft-capping is not supported")
    require(kwargs.get("s_aux") is None, "s_aux", "attention sinks are not supported")
    batch, hq, q_len, d = query.shape
    kv_len = key.shape[2]
    # Token-major views: no copy of the cache; q is copied only when B > 1 (rows cannot merge).
    q = query.transpose(1, 2).reshape(batch * q_len, hq, d)
    k_cache = key.transpose(1, 2).to(q.dtype)
    v_cache = value.transpose(1, 2).to(q.dtype)
    validate_tensors(q, k_cache, v_cache, scaling)
    causal, custom = True, None
    if attention_mask is not None:
        causal, custom = False, _custom_mask(attention_mask, batch, q_len, kv_len)
    elif sliding_window is not None and kv_len > sliding_window:
        causal = False
        custom = _window_mask(q_len, kv_len, sliding_window, q.device).expand(batch, -1, -1).reshape(-1)
    qo_indptr = torch.arange(0, (batch + 1) * q_len, q_len, dtype=torch.int32, device=q.device)
    kv_indptr, kv_indices, last = _page_table(batch, kv_len, q.device)
    # The page table is built here and correct by construction: skip the checks that read it.
    with validation(False):
        out = ops.attention(q, qo_indptr, k_cache, v_cache, kv_indptr, kv_indices, last, causal=causal,
                            custom_mask=custom, sm_scale=scaling, backend=backend)
    return out.view(batch, q_len, hq, d), None


def implementation_name(backend: str = "auto") -> str:
    """The attention implementation name `enable` registers for `backend`."""
    return "forkdec" if backend == "auto" else f"forkdec_{backend}"


def check_model(model: Any) -> Any:
    """The model's config if its architecture is supported; ValueError naming the model type otherwise."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    require(model_type in SUPPORTED_MODEL_TYPES, "model",
            f"model type {model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    require(head_dim in HEAD_DIMS, "model", f"{model_type} head dim {head_dim} is not supported (supported: {HEAD_DIMS})")
    return config


def enable(model: Any, backend: str = "auto") -> Any:
    """Switch a loaded transformers Llama/Mistral/Qwen2 model to forkdec attention; returns the model.

    backend: "auto", "reference", "cpu" or "triton" (as for forkdec.ops.attention).
    Unsupported models raise ValueError naming their model type before anything is
    registered. `model.set_attn_implementation("sdpa")` switches back.
    """
    check_model(model)
    require(backend == "auto" or backend in BACKENDS, "backend",
            f"unknown backend {backend!r}; expected 'auto' or one of {BACKENDS}")
    if backend != "auto":
        device = next(model.parameters()).device
        resolve(backend, "attention", device, BACKENDS)  # raises now if this backend cannot run here
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    name = implementation_name(backend)
    AttentionInterface.register(name, functools.partial(forkdec_attention, backend=backend))
    AttentionMaskInterface.register(name, sdpa_mask)
    model.set_attn_implementation(name)
    return model
