"""ModelConfig: the hyperparameters of a Llama-family decoder, whatever file it came from."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

ROPE_SCALINGS = ("llama3", "linear")


@dataclass
class ModelConfig:
    """Hyperparameters of a Llama-architecture decoder (Llama, SmolLM, Qwen2).

    rope_scaling: None, {"rope_type": "linear", "factor": f} or
    {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    "original_max_position_embeddings"} (Hugging Face's keys; "type" is accepted
    for "rope_type"). attention_bias: q/k/v projections carry biases (Qwen2).
    """
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    attention_bias: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}: must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_kv_heads: {self.num_kv_heads} does not divide num_heads {self.num_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim: RoPE needs an even head dim, got {self.head_dim}")
        if self.rope_scaling is not None:
            kind = rope_scaling_type(self.rope_scaling)
            if kind not in ROPE_SCALINGS:
                raise ValueError(f"rope_scaling: type {kind!r} is not supported (supported: {', '.join(ROPE_SCALINGS)})")
            if not float(self.rope_scaling.get("factor", 0)) > 0:
                raise ValueError(f"rope_scaling: needs a positive 'factor', got {self.rope_scaling!r}")


def rope_scaling_type(scaling: dict) -> str:
    return str(scaling.get("rope_type", scaling.get("type")))


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2] fp64 with the config's base and scaling."""
    d = config.head_dim
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    scaling = config.rope_scaling
    if scaling is None:
        return inv
    factor = float(scaling["factor"])
    if rope_scaling_type(scaling) == "linear":
        return inv / factor  # positions divided by factor
    # llama3: long wavelengths slowed by `factor`, short ones kept, a smooth ramp between.
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    original = float(scaling.get("original_max_position_embeddings", 8192))
    wavelen = 2 * math.pi / inv
    low_wavelen, high_wavelen = original / low, original / high
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (original / wavelen - low) / (high - low)
    ramp = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, ramp, scaled)
