"""Exact memory accounting of every cache kind: bytes held per token of context.

A quantized stream of width W at b bits with groups of G costs W·b/8 bytes of
codes plus 4·W/G bytes of fp16 scale and zero per token (either axis: a
channel group covers G tokens of one channel, a token group G channels of one
token). The newest tokens sit in full-precision window pages: a sequence of n
tokens keeps f = n if n < R + P, else R + (n - R) mod P of them there (R the
window, P the page size; flushed a page at a time), in whole pages.
"""
from __future__ import annotations

import torch

from forkdec.validation import require
from forkdec.xquant.kinds import KVKind, parse_kind


def stream_widths(kind: KVKind, config) -> list[tuple[str, int, str]]:
    """(name, width, axis) of each stream a layer caches for `kind` and a model
    config; ValueError naming `kv` if a token-axis width is not a multiple of
    the group size or a latent rank exceeds the KV width."""
    kv_width = config.num_kv_heads * config.head_dim
    full = min(config.hidden_size, kv_width)  # the rank of Wk and Wv
    require(max(kind.rank, kind.rank_v) <= full, "kv",
            f"{kind.name!r}: latent rank {max(kind.rank, kind.rank_v)} exceeds the KV width {full}")
    width = {"xquant": {"x": config.hidden_size}, "xquant-cl": {"x": config.hidden_size},
             "xquant-latent": {"k": kind.rank or full, "v": kind.rank_v or full},
             "kivi": {"k": kv_width, "v": kv_width}}.get(kind.family, {"k": kv_width, "v": kv_width})
    streams = [(name, width[name], axis) for name, axis in kind.streams] or [("k", kv_width, ""), ("v", kv_width, "")]
    for name, w, axis in streams:
        require(axis != "token" or w % kind.group_size == 0, "kv",
                f"{kind.name!r}: the {name} stream is {w} wide, not a multiple of group size {kind.group_size}")
    return streams


def window_dtype(kind: KVKind, model_dtype: torch.dtype) -> torch.dtype:
    """Storage dtype of full-precision tokens: the fp kinds' own dtype; for quantized
    kinds 16-bit (the model's dtype if it is 16-bit, else fp16), as fp16 KV is the baseline."""
    if not kind.quantized:
        return kind.dtype
    return model_dtype if model_dtype in (torch.float16, torch.bfloat16) else torch.float16


def window_tokens(kind: KVKind, n: int, page_size: int) -> int:
    """Tokens of an n-token sequence that sit in full-precision pages."""
    if not kind.quantized:
        return n
    r = kind.residual
    return n if n < r + page_size else r + (n - r) % page_size


def bytes_held(kind: KVKind | str, config, context_len: int, *, page_size: int = 16,
               model_dtype: torch.dtype = torch.float32) -> int:
    """Bytes a cache of `kind` holds for one sequence of `context_len` tokens (whole pages)."""
    kind = parse_kind(kind) if isinstance(kind, str) else kind
    require(isinstance(context_len, int) and context_len >= 0, "context_len", f"must be an int >= 0, got {context_len!r}")
    p = kind.page_size(page_size)
    fp_tokens = window_tokens(kind, context_len, p)
    fp_el = torch.empty((), dtype=window_dtype(kind, model_dtype)).element_size()
    per_layer = 0
    for _, w, _ in stream_widths(kind, config):
        per_layer += -(-fp_tokens // p) * p * w * fp_el
        if kind.quantized:
            # whole pages are quantized: a page's codes are exact bytes even when a token's are not
            per_layer += (context_len - fp_tokens) // p * (p * w * kind.bits // 8 + 4 * p * w // kind.group_size)
    return config.num_layers * per_layer


def bytes_per_token(kind: KVKind | str, config, context_len: int, *, page_size: int = 16,
                    model_dtype: torch.dtype = torch.float32) -> float:
    """KV bytes per token of a sequence of `context_len` tokens: codes, scales, zeros
    and the full-precision window (whole pages), amortized over the context."""
    require(isinstance(context_len, int) and context_len >= 1, "context_len", f"must be an int >= 1, got {context_len!r}")
    return bytes_held(kind, config, context_len, page_size=page_size, model_dtype=model_dtype) / context_len


def fp16_fraction(kind: KVKind | str, config, context_len: int) -> float:
    """bytes_per_token as a fraction of an fp16 K/V cache's (no padding: context_len tokens)."""
    fp16 = 2 * config.num_layers * config.num_kv_heads * config.head_dim * 2
    return bytes_per_token(kind, config, context_len, page_size=1) / fp16
