"""KV cache kinds by name: what a cache stores per token and how it is quantized.

Names: `fp32`, `bf16`, `fp16` (K and V in that dtype); `xquant-B` (the layer
input X, raw), `xquant-latent-B` (SVD latents X·Uk, X·Uv), `xquant-cl-B`
(cross-layer deltas of the residual stream), `kivi-B` (K per channel after
RoPE, V per token), with B in {8, 4, 3, 2} (cl and kivi: {4, 3, 2}) and
optional suffixes `-gG` (group size 32/64/128) and `-rR` (residual window of R
full-precision tokens, a multiple of the page size; 0 turns it off), e.g.
`xquant-latent-4-g32-r64`. Latent kinds also take `-kR` (rank R > 0): keep
only the top-R singular directions of Wk and of Wv, so each latent is R wide
instead of the KV width (K and V become rank-R approximations; R at most the
KV width, checked against a model config by accounting.stream_widths), e.g.
`xquant-latent-3-k96-r0`; `-vR` then gives V its own rank (`-k128-v64`).
A trailing `-cal` picks the R directions from the model's activations instead
(forkdec.xquant.calibration; the model must be calibrated first), e.g.
`xquant-latent-2-k96-g32-r0-cal`. What each family quantizes along which axis
is in STREAMS; docs/xquant.md explains the choices.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from forkdec.validation import require
from forkdec.xquant.quantize import GROUP_SIZES

FP_KINDS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FAMILY_BITS = {"xquant": (8, 4, 3, 2), "xquant-latent": (8, 4, 3, 2), "xquant-cl": (4, 3, 2), "kivi": (4, 3, 2)}
# Defaults from the perplexity sweep in bench/results/xquant.md.
DEFAULT_GROUP = {"xquant": 64, "xquant-latent": 64, "xquant-cl": 64, "kivi": 64}
DEFAULT_RESIDUAL = 128
# Per family: the cached streams as (name, quantization axis). "channel" groups
# `group_size` consecutive tokens of one channel (robust to outlier channels),
# "token" groups along one token's width.
STREAMS = {
    "xquant": (("x", "channel"),),
    "xquant-latent": (("k", "channel"), ("v", "token")),
    "xquant-cl": (("x", "channel"),),
    "kivi": (("k", "channel"), ("v", "token")),
}
_NAME = re.compile(r"^(xquant-latent|xquant-cl|xquant|kivi)-(\d+)((?:-[gkrv]\d+)*)(-cal)?$")


@dataclass(frozen=True)
class KVKind:
    """A parsed cache kind. fp kinds have bits 0 and `dtype` set; quantized kinds
    have bits, group_size and residual (tokens kept in full precision); latent
    kinds may have rank and rank_v (K and V latent widths kept; 0: the full KV
    width), chosen from activation statistics if calibrated."""
    name: str
    family: str                      # "fp", "xquant", "xquant-latent", "xquant-cl", "kivi"
    bits: int = 0
    group_size: int = 0
    residual: int = 0
    dtype: torch.dtype | None = None
    rank: int = 0
    rank_v: int = 0
    calibrated: bool = False

    @property
    def quantized(self) -> bool:
        return self.family != "fp"

    @property
    def streams(self) -> tuple[tuple[str, str], ...]:
        return STREAMS.get(self.family, ())

    def page_size(self, requested: int = 16) -> int:
        """Page size a cache of this kind uses: fp kinds take the requested one;
        quantized kinds quantize whole pages, so a page holds whole channel groups
        (at least 64 tokens, to keep per-page work and metadata small)."""
        return requested if not self.quantized else max(64, self.group_size)


def parse_kind(name: str) -> KVKind:
    """KVKind of a kind name (see the module); ValueError naming `kv` otherwise."""
    require(isinstance(name, str), "kv", f"must be a cache kind name, got {type(name).__name__}")
    if name in FP_KINDS:
        return KVKind(name, "fp", dtype=FP_KINDS[name])
    m = _NAME.match(name)
    require(m is not None, "kv", f"unknown cache kind {name!r}; expected one of {', '.join(FP_KINDS)}, "
            "xquant-B, xquant-latent-B, xquant-cl-B, kivi-B (B = bits), optionally -gG (group), -rR (window) "
            "and, for latents, -kR, -vR (ranks) and -cal")
    family, bits = m.group(1), int(m.group(2))
    require(bits in FAMILY_BITS[family], "kv", f"{name!r}: {family} supports bits {FAMILY_BITS[family]}, got {bits}")
    opts: dict[str, int] = {}
    for key, value in re.findall(r"-([gkrv])(\d+)", m.group(3)):
        require(key not in opts, "kv", f"{name!r}: -{key} given twice")
        opts[key] = int(value)
    group = opts.get("g", DEFAULT_GROUP[family])
    require(group in GROUP_SIZES, "kv", f"{name!r}: group size must be one of {GROUP_SIZES}, got {group}")
    rank = opts.get("k", 0)
    require("k" not in opts or family == "xquant-latent", "kv", f"{name!r}: -k (latent rank) is for xquant-latent only")
    require("k" not in opts or rank > 0, "kv", f"{name!r}: latent rank must be > 0, got {rank}")
    rank_v = opts.get("v", rank)
    require("v" not in opts or rank > 0, "kv", f"{name!r}: -v (V latent rank) needs -k (K latent rank)")
    require("v" not in opts or rank_v > 0, "kv", f"{name!r}: V latent rank must be > 0, got {rank_v}")
    # the V latent is grouped along each token's channels (STREAMS)
    require(rank_v % group == 0, "kv", f"{name!r}: V latent rank {rank_v} must be a multiple of the group size {group}")
    cal = m.group(4) is not None
    require(not cal or rank > 0, "kv", f"{name!r}: -cal calibrates a truncated rank: give -kR too")
    kind = KVKind(name, family, bits, group, opts.get("r", DEFAULT_RESIDUAL), rank=rank, rank_v=rank_v, calibrated=cal)
    page = kind.page_size()
    require(kind.residual % page == 0, "kv",
            f"{name!r}: residual window {kind.residual} must be a multiple of the page size {page}")
    return kind


def kind_names() -> list[str]:
    """Every kind name with default group size and window (the sweep's rows)."""
    names = list(FP_KINDS)
    for family, bits in FAMILY_BITS.items():
        names += [f"{family}-{b}" for b in bits]
    return names
