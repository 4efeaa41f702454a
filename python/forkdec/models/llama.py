"""LlamaModel: a Llama-architecture decoder (Llama, SmolLM, Qwen2) whose attention the caller supplies.

The model owns the weights and everything per token (norms, projections, RoPE,
SwiGLU, LM head); the caller owns the KV cache and attention through `attend`,
so one model serves a paged/cascade engine and a plain single-sequence loop.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from forkdec import ops
from forkdec.backends import resolve
from forkdec.models.config import ModelConfig, rope_inv_freq
from forkdec.ops.layer_ops import BACKENDS as LAYER_OP_BACKENDS
from forkdec.ops.qlinear import BACKENDS as QLINEAR_BACKENDS
from forkdec.qweight import QuantizedWeight, concat_rows, dequantize
from forkdec.validation import require, validation, validation_enabled

Attend = Callable[[int, Tensor, Tensor, Tensor], Tensor]
# A matrix is a dense tensor (the model's dtype) or GGUF blocks as stored (forkdec.qweight).
Weight = Tensor | QuantizedWeight
MATRICES = ("qkv", "o", "gate_up", "down")
# Products of at most this many rows use the stored blocks when both forms are held
# (LlamaModel.qlinear_max_rows): the int8 kernels read 3x fewer bytes and win while a step
# is bound by reading its weights (1.14x at 64 rows); oneDNN's bf16 GEMM wins above
# (docs/models.md).
QLINEAR_MAX_ROWS = 64


def _frozen(t: Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


class LlamaLayer(nn.Module):
    """One decoder block; q/k/v and gate/up are each one fused matrix (one GEMM, not three).
    qkv, o, gate_up and down are dense parameters or, for a model loaded with
    weights="gguf", QuantizedWeights (plain attributes)."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        h, d = config.hidden_size, config.head_dim
        qkv = (config.num_heads + 2 * config.num_kv_heads) * d
        self.attn_norm = _frozen(torch.ones(h, dtype=dtype))
        self.qkv = _frozen(torch.zeros(qkv, h, dtype=dtype))
        self.qkv_bias = _frozen(torch.zeros(qkv, dtype=dtype)) if config.attention_bias else None
        self.o = _frozen(torch.zeros(h, config.num_heads * d, dtype=dtype))
        self.ffn_norm = _frozen(torch.ones(h, dtype=dtype))
        self.gate_up = _frozen(torch.zeros(2 * config.intermediate_size, h, dtype=dtype))
        self.down = _frozen(torch.zeros(h, config.intermediate_size, dtype=dtype))
        # With weights="gguf+bf16": the stored blocks of the four matrices (which then
        # are dense copies), used for products of few rows (LlamaModel.qlinear_max_rows).
        self.blocks: LayerBlocks | None = None


@dataclass
class LayerBlocks:
    qkv: QuantizedWeight
    o: QuantizedWeight
    gate_up: QuantizedWeight
    down: QuantizedWeight


class LlamaModel(nn.Module):
    """Llama decoder with caller-supplied attention.

    forward(tokens [T] int64, positions [T] int64, attend, logits_rows [R] int64 | None)
    -> fp32 logits [R or T, vocab_size].

    attend(layer, q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D]) -> out [T, Hq, D]
    receives q and k after RoPE, in the model's dtype; it stores k/v wherever
    it keeps its cache and returns attention over the right keys for each row.
    An attend with `needs_layer_input = True` also gets x= (the layer's
    post-norm input [T, hidden]) and residual= (the pre-norm residual stream).
    Only the rows `logits_rows` (indices into T) go through the final norm and
    the LM head: prefill usually needs just the last row.
    Weights are created zero-filled; loaders fill them with `load_weights`.
    """

    def __init__(self, config: ModelConfig, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        super().__init__()
        require(dtype in (torch.float32, torch.float16, torch.bfloat16), "dtype",
                f"must be float32, float16 or bfloat16, got {dtype}")
        self.config = config
        with torch.device(device):
            self.embed = _frozen(torch.zeros(config.vocab_size, config.hidden_size, dtype=dtype))
            self.layers = nn.ModuleList(LlamaLayer(config, dtype) for _ in range(config.num_layers))
            self.norm = _frozen(torch.ones(config.hidden_size, dtype=dtype))
            # Tied embeddings share one tensor: no copy of the largest matrix.
            self.lm_head = self.embed if config.tie_word_embeddings else _frozen(
                torch.zeros(config.vocab_size, config.hidden_size, dtype=dtype))
            self.register_buffer("inv_freq", rope_inv_freq(config).float(), persistent=False)
        self.head_blocks: QuantizedWeight | None = None  # the LM head's blocks, with keep_dense_copy()
        self.qlinear_max_rows = QLINEAR_MAX_ROWS
        # Decode steps on a paged cpu cache loop over the layers in C++ (forkdec.ops.llama_layers,
        # bitwise the Python loop); False keeps the Python loop everywhere.
        self.cxx_layers = True
        self._stack_tensors: dict[bool, tuple[list[Tensor], list[int]]] = {}  # see _layer_tensors

    @property
    def dtype(self) -> torch.dtype:
        """The activations' (and dense weights') dtype."""
        return self.norm.dtype

    @property
    def device(self) -> torch.device:
        return self.norm.device

    @torch.no_grad()
    def forward(self, tokens: Tensor, positions: Tensor, attend: Attend,
                logits_rows: Tensor | None = None) -> Tensor:
        """tokens [T] and positions [T] (integer; positions are RoPE positions, any order),
        attend (see the class), logits_rows [R] integer row indices into T or None for all
        rows -> fp32 logits [R or T, vocab_size]. Bad input raises ValueError naming it
        (skipped under forkdec.validation(False))."""
        cfg = self.config
        checked = validation_enabled()
        if checked:
            self._validate(tokens, positions, logits_rows)
        t = tokens.shape[0]
        hq, hkv, d, eps = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps
        backend, qbackend = self._backend(), self._qlinear_backend()
        cos, sin = self._rope_angles(positions)
        x = self._embed(tokens)
        # The residual stream runs one layer behind: each add_rms_norm adds the previous
        # sublayer's output and normalizes in one pass (fused ops: forkdec.ops.layer_ops).
        # Their inputs come from this model's own tensors, so they skip validation; the
        # caller's attend keeps the caller's setting.
        residual = None
        # XQuant caches store the layer input instead of K/V: hand it over only to an attend that asks.
        needs_x = getattr(attend, "needs_layer_input", False)
        small = t <= self.qlinear_max_rows
        f = _LayerOps(backend, qbackend)
        step = getattr(attend, "paged_step", None)
        with validation(False):
            fast = (self.cxx_layers and step is not None and not needs_x and backend == "cpu" and qbackend == "cpu"
                    and bool(step.k_caches) and step.k_caches[0].dtype == x.dtype)
            if fast:
                # The same layer loop in C++ (torch.ops.forkdec.llama_layers): bitwise the loop below.
                plan = step.plan
                x, residual = torch.ops.forkdec.llama_layers(
                    x, cos, sin, *self._layer_tensors(small), hq, hkv, eps, step.k_caches, step.v_caches,
                    step.slots, *plan.lists, plan.scale(d))
            else:
                for i, layer in enumerate(self.layers):
                    w = layer.blocks if small and layer.blocks is not None else layer
                    if residual is None:
                        h, residual = f.rms_norm(x, layer.attn_norm, eps), x
                    else:
                        h, residual = f.add_rms_norm(x, residual, layer.attn_norm, eps)
                    q, k, v = f.rope_qkv(f.linear(h, w.qkv, layer.qkv_bias), cos, sin, hq, hkv)
                    if checked:
                        with validation(True):
                            out = attend(i, q, k, v, x=h, residual=residual) if needs_x else attend(i, q, k, v)
                    else:
                        out = attend(i, q, k, v, x=h, residual=residual) if needs_x else attend(i, q, k, v)
                    x = f.linear(out.reshape(t, hq * d), w.o, None)
                    h, residual = f.add_rms_norm(x, residual, layer.ffn_norm, eps)
                    x = f.linear(f.silu_and_mul(f.linear(h, w.gate_up, None)), w.down, None)
            if logits_rows is not None:  # only these rows reach the final norm and the LM head
                rows = logits_rows.to(device=x.device, dtype=torch.long)
                x = x.index_select(0, rows)
                residual = None if residual is None else residual.index_select(0, rows)
            if residual is None:
                x = f.rms_norm(x, self.norm, eps)
            else:
                x = f.add_rms_norm(x, residual, self.norm, eps)[0]
            head = self.head_blocks if small and self.head_blocks is not None else self.lm_head
            if isinstance(head, QuantizedWeight):
                return ops.qlinear(x, head, out_dtype=torch.float32, backend=qbackend)
        return _lm_head(x, self.lm_head)

    def _layer_tensors(self, small: bool) -> tuple[list[Tensor], list[int]]:
        """The weights of every layer as torch.ops.forkdec.llama_layers takes them (per layer
        attn_norm, ffn_norm, qkv bias or an empty tensor, then (codes, scale, offset) or
        (dense, empty, empty) for qkv, o, gate_up, down) and their bits (0: dense). Built
        once per form; load_weights, keep_dense_copy and .to() drop them."""
        cached = self._stack_tensors.get(small)
        if cached is None:
            tensors, bits = [], []
            empty = torch.empty(0, dtype=self.dtype, device=self.device)
            for layer in self.layers:
                w = layer.blocks if small and layer.blocks is not None else layer
                tensors += [layer.attn_norm, layer.ffn_norm, empty if layer.qkv_bias is None else layer.qkv_bias]
                for name in MATRICES:
                    m = getattr(w, name)
                    quantized = isinstance(m, QuantizedWeight)
                    tensors += [m.codes, m.scale, m.offset] if quantized else [m, empty, empty]
                    bits.append(m.bits if quantized else 0)
            cached = self._stack_tensors[small] = (tensors, bits)
        return cached

    def _apply(self, fn, *args, **kwargs):
        self._stack_tensors.clear()
        return super()._apply(fn, *args, **kwargs)

    @property
    def quantized(self) -> bool:
        """True when the matrices are GGUF blocks as stored (load_model(weights="gguf"))."""
        return isinstance(self.embed, QuantizedWeight)

    def keep_dense_copy(self) -> None:
        """For a model holding stored blocks: add dense copies (the blocks dequantized to
        the model dtype) used for products of more than `qlinear_max_rows` rows, and keep
        the blocks for the smaller ones ("gguf+bf16" in load_model)."""
        self._stack_tensors.clear()
        for layer in self.layers:
            if all(isinstance(getattr(layer, n), QuantizedWeight) for n in MATRICES):
                layer.blocks = LayerBlocks(*(getattr(layer, n) for n in MATRICES))
                for n in MATRICES:
                    _set(layer, n, _frozen(dequantize(getattr(layer.blocks, n)).to(self.dtype)))
        if isinstance(self.lm_head, QuantizedWeight):
            self.head_blocks = self.lm_head
        if isinstance(self.embed, QuantizedWeight):
            tied = self.lm_head is self.embed
            _set(self, "embed", _frozen(dequantize(self.embed).to(self.dtype)))
            if tied:
                _set(self, "lm_head", self.embed)
        if isinstance(self.lm_head, QuantizedWeight):
            _set(self, "lm_head", _frozen(dequantize(self.lm_head).to(self.dtype)))

    def _backend(self) -> str:
        # Resolved once per forward (a cached lookup), then passed to every fused op.
        return resolve("auto", "add_rms_norm", self.device, LAYER_OP_BACKENDS)

    def _qlinear_backend(self) -> str:
        return resolve("auto", "qlinear", self.device, QLINEAR_BACKENDS)

    def _embed(self, tokens: Tensor) -> Tensor:
        if isinstance(self.embed, QuantizedWeight):  # only the looked-up rows are dequantized
            return dequantize(self.embed, tokens.to(self.device)).to(self.norm.dtype)
        return F.embedding(tokens, self.embed)

    def _rope_angles(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """fp32 cos, sin [T, D/2] of each position, computed once per forward for every layer."""
        inv_freq = self.inv_freq.float()  # stays fp32 even after a model.to(bfloat16)
        angles = positions.to(device=self.device, dtype=torch.float32)[:, None] * inv_freq[None, :]
        return angles.cos(), angles.sin()

    def _validate(self, tokens: Tensor, positions: Tensor, logits_rows: Tensor | None) -> None:
        require(isinstance(tokens, Tensor) and tokens.dim() == 1 and not tokens.is_floating_point(), "tokens",
                "must be a 1-D integer tensor [T]")
        require(tokens.numel() == 0 or (int(tokens.min()) >= 0 and int(tokens.max()) < self.config.vocab_size),
                "tokens", f"ids must be in [0, {self.config.vocab_size})")
        require(isinstance(positions, Tensor) and positions.shape == tokens.shape
                and not positions.is_floating_point(), "positions",
                f"must be an integer tensor of tokens' shape {tuple(tokens.shape)}")
        require(positions.numel() == 0 or int(positions.min()) >= 0, "positions", "must be non-negative")
        if logits_rows is not None:
            require(isinstance(logits_rows, Tensor) and logits_rows.dim() == 1
                    and not logits_rows.is_floating_point(), "logits_rows", "must be a 1-D integer tensor")
            require(logits_rows.numel() == 0 or (int(logits_rows.min()) >= 0
                                                 and int(logits_rows.max()) < tokens.shape[0]),
                    "logits_rows", f"row indices must be in [0, {tokens.shape[0]})")

    def load_weights(self, weights: dict[str, Weight]) -> None:
        """Copy weights named as in `weight_names` (Hugging Face layout, rotate-half RoPE
        rows) into the model, fusing q/k/v and gate/up. A matrix given as a
        QuantizedWeight is kept as stored (fused groups of one format stay quantized;
        a group mixing formats is dequantized to the model dtype). Raises ValueError
        naming a missing or misshapen tensor."""
        cfg = self.config
        self._stack_tensors.clear()

        def take(name: str, shape: tuple[int, ...]) -> Weight:
            require(name in weights, "weights", f"missing tensor {name!r}")
            w = weights[name]
            require(tuple(w.shape) == shape, "weights",
                    f"{name!r} has shape {tuple(w.shape)}, expected {shape}")
            return w

        h, d, inter = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
        hq, hkv = cfg.num_heads * d, cfg.num_kv_heads * d
        _assign(self, "embed", [take("model.embed_tokens.weight", (cfg.vocab_size, h))])
        self.norm.copy_(take("model.norm.weight", (h,)))
        if cfg.tie_word_embeddings:
            _set(self, "lm_head", self.embed)
        else:
            _assign(self, "lm_head", [take("lm_head.weight", (cfg.vocab_size, h))])
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            layer.attn_norm.copy_(take(p + "input_layernorm.weight", (h,)))
            layer.ffn_norm.copy_(take(p + "post_attention_layernorm.weight", (h,)))
            _assign(layer, "qkv", [take(p + "self_attn.q_proj.weight", (hq, h)),
                                   take(p + "self_attn.k_proj.weight", (hkv, h)),
                                   take(p + "self_attn.v_proj.weight", (hkv, h))])
            if layer.qkv_bias is not None:
                layer.qkv_bias.copy_(torch.cat([take(p + "self_attn.q_proj.bias", (hq,)),
                                                take(p + "self_attn.k_proj.bias", (hkv,)),
                                                take(p + "self_attn.v_proj.bias", (hkv,))]))
            _assign(layer, "o", [take(p + "self_attn.o_proj.weight", (h, hq))])
            _assign(layer, "gate_up", [take(p + "mlp.gate_proj.weight", (inter, h)),
                                       take(p + "mlp.up_proj.weight", (inter, h))])
            _assign(layer, "down", [take(p + "mlp.down_proj.weight", (h, inter))])


def _assign(module: nn.Module, name: str, parts: list[Weight]) -> None:
    """Set module.name to the row concatenation of parts: copied into the dense
    parameter, or kept quantized when every part is a QuantizedWeight of one format."""
    current = getattr(module, name)
    if all(isinstance(w, QuantizedWeight) for w in parts) and len({(w.qtype, w.k) for w in parts}) == 1:
        _set(module, name, (concat_rows(parts) if len(parts) > 1 else parts[0]).to(current.device))
        return
    dense = torch.cat([dequantize(w) if isinstance(w, QuantizedWeight) else w.float() for w in parts])
    if isinstance(current, nn.Parameter):
        current.copy_(dense)
    else:  # it held a QuantizedWeight: a dense matrix in the activations' dtype
        dtype = next(t for t in module.parameters()).dtype
        _set(module, name, _frozen(dense.to(device=current.device, dtype=dtype)))


def _set(module: nn.Module, name: str, value: Weight) -> None:
    # A registered parameter only accepts another parameter: drop it for a QuantizedWeight.
    if not isinstance(value, nn.Parameter) and name in module._parameters:
        del module._parameters[name]
    setattr(module, name, value)


class _LayerOps:
    """The per-layer ops of one forward, bound to their backends. On the cpu backend they
    are the C++ ops themselves: the model built every input, so the Python faces'
    checks and backend resolution (~3 us per call, ~300 calls per step) are skipped."""

    def __init__(self, backend: str, qbackend: str) -> None:
        self.qbackend = qbackend
        if backend == "cpu":
            c = torch.ops.forkdec
            self.rms_norm, self.add_rms_norm, self.rope_qkv, self.silu_and_mul = (
                c.rms_norm, c.add_rms_norm, c.rope_qkv, c.silu_and_mul)
        else:
            self.rms_norm = functools.partial(ops.rms_norm, backend=backend)
            self.add_rms_norm = functools.partial(ops.add_rms_norm, backend=backend)
            self.rope_qkv = functools.partial(ops.rope_qkv, backend=backend)
            self.silu_and_mul = functools.partial(ops.silu_and_mul, backend=backend)

    def linear(self, x: Tensor, weight: Weight, bias: Tensor | None) -> Tensor:
        if isinstance(weight, QuantizedWeight):
            if self.qbackend == "cpu":
                return torch.ops.forkdec.qlinear(x, weight.codes, weight.scale, weight.offset, weight.bits,
                                                 weight.k, weight.n, bias, None)
            return ops.qlinear(x, weight, bias, backend=self.qbackend)
        return F.linear(x, weight, bias)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE in the rotate-half layout: pairs (i, i + D/2) rotate together.
    x [T, H, D]; cos, sin [T, 1, D/2]."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def _lm_head(x: Tensor, weight: Tensor) -> Tensor:
    if x.dtype == torch.float32:
        return F.linear(x, weight)
    # Half-precision GEMM with fp32 output: logits keep fp32 resolution for sampling.
    return torch.mm(x, weight.t(), out_dtype=torch.float32) if _MM_OUT_DTYPE else F.linear(x, weight).float()


def _probe_mm_out_dtype() -> bool:
    try:
        a = torch.ones(1, 2, dtype=torch.bfloat16)
        return torch.mm(a, a.t(), out_dtype=torch.float32).dtype == torch.float32
    except Exception:  # older torch, or no CPU kernel for it
        return False


_MM_OUT_DTYPE = _probe_mm_out_dtype()
