"""forkdec's quantized cache kinds as transformers `Cache` classes: `forkdec_cache(model, "kivi-4")`.

    cache = forkdec_cache(model, "xquant-latent-4")
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=64)
    cache.nbytes()      # bytes the cache holds now
    cache.close()       # XQuant: removes the pre-hooks (or use `with forkdec_cache(...) as cache:`)

The kinds are forkdec's (forkdec.xquant.kinds): same bits, group size, page
size and residual window, and the same flush rule as forkdec's
QuantizedKVCache: a step's tokens land in the 16-bit window, the step's
attention reads quantized pages and window, then each layer quantizes its
oldest whole pages while residual + page_size or more tokens are in the window.
- kivi-B: K (after RoPE) quantized per channel, V per token; `update` stores the
  model's K/V and returns the dequantized pages followed by the window.
- xquant-B, xquant-latent-B: a forward pre-hook on every attention module
  captures the X it receives (the post-norm hidden states) and its position
  ids; `update` ignores the model's K/V, caches X (raw) or the latents X·Uk,
  X·Uv, and rematerializes K and V for the whole context from the cache with
  that module's own k_proj/v_proj (latents: the SVD factors of those weights,
  forkdec.xquant.weights.scaled_factors) and the model's rotary embedding at
  the tokens' positions. No K or V outlives the layer's attention.
xquant-cl and calibrated (-cal) kinds are forkdec-engine only for now.
"""
from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin

from forkdec.integrations.quantized_stream import QuantizedStream
from forkdec.integrations.transformers_model import model_config
from forkdec.validation import require
from forkdec.xquant.accounting import stream_widths, window_dtype
from forkdec.xquant.kinds import KVKind, parse_kind
from forkdec.xquant.weights import scaled_factors

FAMILIES = ("kivi", "xquant", "xquant-latent")
# Latent factors per projection module, so a new cache per generate does not redo the SVDs;
# keyed on the weight's storage and version, so an in-place weight change recomputes them.
_FACTORS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _factors(proj: torch.nn.Module, rank: int) -> tuple[Tensor, Tensor]:
    """(down, up) fp32 of proj.weight (x @ w convention), forkdec.xquant.weights.scaled_factors."""
    w = proj.weight
    key = (rank, w.data_ptr(), w._version)
    per_module = {k: f for k, f in _FACTORS.get(proj, {}).items() if k[1:] == key[1:]}  # drop stale weights
    if key not in per_module:
        per_module[key] = scaled_factors(w.detach().t().float(), rank)
    _FACTORS[proj] = per_module
    return per_module[key]


class _StreamLayer(CacheLayerMixin):
    """One model layer's streams; holds no K/V (`keys`/`values` stay None)."""

    is_croppable = False

    def __init__(self, kind: KVKind, widths: list[tuple[str, int, str]], dtype: torch.dtype) -> None:
        super().__init__()
        p = kind.page_size()
        self.streams = {name: QuantizedStream(w, kind.bits, kind.group_size, axis, p, kind.residual, dtype)
                        for name, w, axis in widths}

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def _append_read_flush(self, values: dict[str, Tensor]) -> dict[str, Tensor]:
        """Append a step's tokens, read every stream whole, then flush (the read saw the pre-flush window)."""
        for name, val in values.items():
            self.streams[name].append(val)
        out = {name: s.read() for name, s in self.streams.items()}
        for s in self.streams.values():
            s.flush()
        return out

    def get_seq_length(self) -> int:
        return len(next(iter(self.streams.values())))

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.streams.values())

    def reset(self) -> None:
        for s in self.streams.values():
            s.clear()
        self.is_initialized = False

    def _select(self, index: Tensor) -> None:
        for s in self.streams.values():
            s.select_rows(index)

    def reorder_cache(self, beam_idx: Tensor) -> None:
        self._select(beam_idx)

    def batch_select_indices(self, indices: Tensor) -> None:
        self._select(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        rows = next(iter(self.streams.values())).window
        if rows is not None:
            self._select(torch.arange(rows.shape[0]).repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError("tokens_to_remove: forkdec's quantized caches cannot drop tokens (quantized pages are final)")

    def offload(self) -> None:  # nothing in the K/V slots to move
        pass

    def prefetch(self) -> None:
        pass


class _KiviLayer(_StreamLayer):
    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        b, h, t, d = key_states.shape
        out = self._append_read_flush({"k": key_states.transpose(1, 2).reshape(b, t, h * d),
                                       "v": value_states.transpose(1, 2).reshape(b, t, h * d)})
        n = out["k"].shape[1]
        return tuple(out[s].view(b, n, h, d).transpose(1, 2).to(key_states.dtype) for s in ("k", "v"))


class _XQuantLayer(_StreamLayer):
    """Caches X (raw) or its latents; K and V come from the cache, not from the model's `update` arguments."""

    def __init__(self, kind: KVKind, widths: list[tuple[str, int, str]], dtype: torch.dtype, owner: "ForkdecCache",
                 layer_idx: int, attn: torch.nn.Module) -> None:
        super().__init__(kind, widths, dtype)
        self.owner, self.layer_idx, self.attn = weakref.proxy(owner), layer_idx, attn
        self.latent = kind.family == "xquant-latent"
        if self.latent:  # the factors of the module's own weights (x @ w convention), fp32
            self.down_k, self.up_k = _factors(attn.k_proj, kind.rank)
            self.down_v, self.up_v = _factors(attn.v_proj, kind.rank_v)

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        b, h, t, d = key_states.shape
        x, position_ids = self.owner._take(self.layer_idx, t)
        if self.latent:
            xf = x.float()
            out = self._append_read_flush({"k": xf @ self.down_k, "v": xf @ self.down_v})
            k, v = out["k"] @ self.up_k, out["v"] @ self.up_v
            k, v = (y if p.bias is None else y + p.bias.float() for y, p in ((k, self.attn.k_proj),
                                                                              (v, self.attn.v_proj)))
        else:
            xh = self._append_read_flush({"x": x})["x"].to(key_states.dtype)
            k, v = self.attn.k_proj(xh), self.attn.v_proj(xh)
        n = k.shape[1]
        cos, sin = self.owner._rope(position_ids, n, key_states)
        k = k.view(b, n, h, d).to(key_states.dtype)
        half = d // 2
        k = k * cos[:, :, None] + torch.cat([-k[..., half:], k[..., :half]], dim=-1) * sin[:, :, None]
        return k.transpose(1, 2), v.view(b, n, h, d).to(value_states.dtype).transpose(1, 2)


class ForkdecCache(Cache):
    """A transformers Cache of a forkdec quantized kind; build it with `forkdec_cache(model, kv)`.

    Works with `model.generate(past_key_values=cache)` and `model(ids, past_key_values=cache,
    use_cache=True)`; K/V returned to attention are [B, Hkv, S_kv, D] in the model's dtype.
    `nbytes()` is what the cache holds (codes, fp16 scales/zeros, 16-bit windows; XQuant also
    its token positions). XQuant caches hook the model's attention modules until `close()`.
    """

    def __init__(self, model: Any, kind: KVKind) -> None:
        cfg = model_config(model)  # ValueError naming the model type if unsupported
        layers = getattr(getattr(model, "model", None), "layers", None)
        require(layers is not None and hasattr(model.model, "rotary_emb"), "model",
                f"{type(model).__name__} lacks the .model.layers / .model.rotary_emb of a *ForCausalLM decoder")
        require(len(layers) == cfg.num_layers and all(
            hasattr(getattr(layer, "self_attn", None), p) for layer in layers for p in ("k_proj", "v_proj")),
            "model", "every decoder layer needs self_attn.k_proj / v_proj")
        require(kind.family in FAMILIES, "kv", f"{kind.name!r}: the transformers cache supports the "
                f"{', '.join(FAMILIES)} families (fp kinds: use transformers' DynamicCache; xquant-cl: forkdec's engine)")
        require(not kind.calibrated, "kv", f"{kind.name!r}: calibrated latents need a forkdec model (forkdec.Engine)")
        widths = stream_widths(kind, cfg)  # ValueError naming kv if the group size does not fit the widths
        self.kind, self.config = kind, cfg
        dtype = window_dtype(kind, model.model.embed_tokens.weight.dtype)
        self._handles: list[Any] = []
        self._captured: dict[int, tuple[Tensor, Tensor | None]] = {}
        self.positions: Tensor | None = None
        self._rope_cache: tuple[int, Tensor, Tensor] | None = None
        self._rotary = model.model.rotary_emb
        if kind.family == "kivi":
            cache_layers = [_KiviLayer(kind, widths, dtype) for _ in layers]
        else:
            cache_layers = [_XQuantLayer(kind, widths, dtype, self, i, layer.self_attn) for i, layer in enumerate(layers)]
            self._install_hooks([layer.self_attn for layer in layers])
        super().__init__(layers=cache_layers)

    # ---- XQuant: capturing X -------------------------------------------------------------------
    def _install_hooks(self, modules: list[torch.nn.Module]) -> None:
        ref = weakref.ref(self)

        def make_hook(idx: int):
            def hook(module, args, kwargs):
                cache = ref()
                # Only the forwards that use this cache are captured; a dead cache's hook is inert.
                if cache is None or kwargs.get("cache", kwargs.get("past_key_values")) is not cache:
                    return None
                x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
                cache._captured[idx] = (x, kwargs.get("position_ids"))
                return None
            return hook

        self._handles = [m.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, m in enumerate(modules)]
        # Hooks go away with the cache even if close() is never called.
        self._finalizer = weakref.finalize(self, _remove, self._handles)

    def close(self) -> None:
        """Remove the attention pre-hooks (XQuant); the cache can no longer take new tokens."""
        _remove(self._handles)
        self._handles = []

    def __enter__(self) -> "ForkdecCache":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _take(self, layer_idx: int, t: int) -> tuple[Tensor, Tensor]:
        """The captured X [B, T, hidden] of this layer's forward and the positions [B, n] of every cached token."""
        got = self._captured.pop(layer_idx, None)
        require(got is not None, "cache", f"layer {layer_idx}: no attention input was captured; the cache's hooks "
                "are removed (close()) or the attention module was not called with this cache")
        x, position_ids = got
        require(x.shape[1] == t, "cache", f"layer {layer_idx}: captured {x.shape[1]} tokens, the update has {t}")
        seen = self.layers[layer_idx].get_seq_length()
        if self.positions is None or self.positions.shape[1] == seen:  # the step's first layer records positions
            if position_ids is None:
                position_ids = torch.arange(seen, seen + t, device=x.device)[None]
            pos = position_ids.to(device=x.device, dtype=torch.long).expand(x.shape[0], t)
            self.positions = pos if self.positions is None else torch.cat([self.positions, pos], dim=1)
        return x, self.positions

    def _rope(self, positions: Tensor, n: int, like: Tensor) -> tuple[Tensor, Tensor]:
        """cos, sin [B, n, D] of the model's rotary module at `positions`, shared by a step's layers."""
        if self._rope_cache is None or self._rope_cache[0] != n:
            cos, sin = self._rotary(like, positions[:, :n])
            self._rope_cache = (n, cos, sin)
        return self._rope_cache[1], self._rope_cache[2]

    # ---- memory and batch ------------------------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes held now: quantized codes, scales, zeros and windows of every layer (+ XQuant's positions)."""
        held = sum(layer.nbytes() for layer in self.layers)
        return held + (0 if self.positions is None else self.positions.numel() * self.positions.element_size())

    def _rows(self, index: Tensor) -> None:
        if self.positions is not None:
            self.positions = self.positions.index_select(0, index.to(self.positions.device))
        self._rope_cache = None

    def reset(self) -> None:
        super().reset()
        self.positions, self._rope_cache = None, None
        self._captured.clear()

    def reorder_cache(self, beam_idx: Tensor) -> None:
        super().reorder_cache(beam_idx)
        self._rows(beam_idx)

    def batch_select_indices(self, indices: Tensor) -> None:
        super().batch_select_indices(indices)
        self._rows(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.positions is not None:
            self._rows(torch.arange(self.positions.shape[0]).repeat_interleave(repeats))


def _remove(handles: list[Any]) -> None:
    for h in handles:
        h.remove()


def forkdec_cache(model: Any, kv: str) -> ForkdecCache:
    """A fresh transformers Cache of forkdec cache kind `kv` (kivi-B, xquant-B, xquant-latent-B with
    optional -gG, -rR, -kR/-vR; see forkdec.xquant.kinds) for a loaded Llama/Mistral/Qwen2 model.
    One cache per generation (like DynamicCache). ValueError naming `kv` or `model` before any work
    if the kind is unknown, unsupported here or does not fit the model's widths."""
    return ForkdecCache(model, parse_kind(kv))
