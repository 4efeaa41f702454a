"""Sampling tokens from logits with temperature, top-k, top-p and min-p.

The filters are thresholds, found without sorting the vocabulary (see
docs/sampling.md for the exact semantics and the algorithms of each backend).
The uniforms are drawn here, with torch, one per output row, and handed to the
kernels as a tensor: every backend consumes the same random numbers, so the
backends agree on tokens up to rounding at the boundaries.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from forkdec import _extension, reference
from forkdec.backends import resolve
from forkdec.validation import require, validation_enabled

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BACKENDS = ("reference", "cpu", "triton")

Param = float | int | Tensor


def sample(logits: Tensor, *, temperature: Param = 1.0, top_k: int | Tensor = 0, top_p: Param = 1.0,
           min_p: Param = 0.0, generator: torch.Generator | None = None, seed: int | None = None,
           row_ids: Tensor | None = None, check_nan: bool = True, backend: str = "auto",
           uniforms: Tensor | None = None) -> Tensor:
    """Draw one token per output row.

    logits [B, V] fp32 / fp16 / bf16, any strides.
    row_ids: None (R = B outputs, output r from row r) or int [R]: output r is
        drawn from logits[row_ids[r]], each with its own uniform (n paths drawing
        from one distribution, without copying it).
    temperature (>= 0), top_k (int >= 0), top_p (in (0, 1]), min_p (in [0, 1)):
        each a scalar or a tensor with one value per *output* row [R].
    Per output row, on a = logits.float() / temperature (fp32):
        top-k keeps a_i >= the k-th largest a, so every token tied with the k-th
        is kept (0 or k >= V: off); top-p then keeps, within the top-k set, the
        tokens whose strictly-more-probable mass is below p times the top-k mass
        (the smallest prefix by probability reaching p, tie groups kept whole);
        min-p then keeps prob_i >= min_p * max prob. temperature 0 is greedy:
        argmax, ties to the lowest index.
    A row is sampled by inverse CDF in index order with one fp32 uniform u:
        the first token whose running kept weight exceeds u * total.
    generator / seed: where the R uniforms come from (not both); neither: torch's
        default generator. Same seed, same backend -> same tokens.
    uniforms: fp32 [R] in [0, 1) given by the caller (one generator per path) instead
        of drawn here; then generator and seed must be None.
    check_nan: raise for NaN or +inf logits (one extra reduction over logits).
    Returns int64 [R]. A row that leaves no token (all -inf, or x / temperature
    overflowing) raises ValueError naming logits, never a silent token.
    """
    if validation_enabled():
        _validate(logits, temperature, top_k, top_p, min_p, generator, seed, row_ids, check_nan)
    name = resolve(backend, "sample", logits.device, BACKENDS)
    uniforms = _uniforms(logits, row_ids, generator, seed, uniforms)
    if name == "reference":
        return reference.sample(logits, uniforms, temperature=temperature, top_k=top_k, top_p=top_p,
                                min_p=min_p, row_ids=row_ids)
    args = _kernel_args(logits, uniforms, row_ids, temperature, top_k, top_p, min_p)
    if name == "triton":
        return torch.ops.forkdec.sample_triton(*args)
    return torch.ops.forkdec.sample(*args)


class SampleOutput(NamedTuple):
    """What `sample_with_logprobs` returns, one entry per output row r.

    tokens int64 [R]; logprobs fp32 [R]: log softmax(logits[row])[token] under the
    unfiltered temperature-1 distribution (whatever the sampling filters);
    top_logprobs fp32 [R, k] and top_ids int64 [R, k]: the k largest logprobs of
    the row, descending, ties by lower id; confidence fp32 [R]: DeepConf's token
    confidence -(1/k) * sum(top_logprobs) (>= 0; higher = more peaked), or None
    when top_logprobs was None (then the top tensors are [R, 0]).
    """
    tokens: Tensor
    logprobs: Tensor
    top_logprobs: Tensor
    top_ids: Tensor
    confidence: Tensor | None


def sample_with_logprobs(logits: Tensor, *, top_logprobs: int | None = 20, temperature: Param = 1.0,
                         top_k: int | Tensor = 0, top_p: Param = 1.0, min_p: Param = 0.0,
                         generator: torch.Generator | None = None, seed: int | None = None,
                         row_ids: Tensor | None = None, check_nan: bool = True,
                         backend: str = "auto", uniforms: Tensor | None = None) -> SampleOutput:
    """`sample`, fused with the per-token signals of the drawn tokens.

    Same arguments and the same tokens as `sample` (same uniforms for the same
    generator / seed), plus top_logprobs: k in 1..V (DeepConf uses 20), or None
    for the token logprobs only. The kernels compute the signals in one pass
    over each row beyond what sampling reads (a streaming log-sum-exp and top-k
    selection), once per row for the outputs that share it. uniforms: as for `sample`.
    """
    if validation_enabled():
        _validate(logits, temperature, top_k, top_p, min_p, generator, seed, row_ids, check_nan)
        require(top_logprobs is None or (isinstance(top_logprobs, int) and not isinstance(top_logprobs, bool)),
                "top_logprobs", f"expected an int or None, got {type(top_logprobs).__name__}")
        vocab = logits.shape[1]
        require(top_logprobs is None or 1 <= top_logprobs <= vocab, "top_logprobs",
                f"must be in 1..vocab ({vocab}) or None, got {top_logprobs}")
    num_top = 0 if top_logprobs is None else int(top_logprobs)
    name = resolve(backend, "sample_with_logprobs", logits.device, BACKENDS)
    uniforms = _uniforms(logits, row_ids, generator, seed, uniforms)
    if name == "reference":
        result = reference.sample_with_logprobs(logits, uniforms, num_top=num_top, temperature=temperature,
                                                top_k=top_k, top_p=top_p, min_p=min_p, row_ids=row_ids)
    else:
        args = _kernel_args(logits, uniforms, row_ids, temperature, top_k, top_p, min_p)
        ops = torch.ops.forkdec
        op = ops.sample_with_logprobs_triton if name == "triton" else ops.sample_with_logprobs
        result = op(*args, num_top)
    tokens, logprobs, top_lp, top_ids, confidence = result
    return SampleOutput(tokens, logprobs, top_lp, top_ids, confidence if num_top else None)


def _uniforms(logits: Tensor, row_ids: Tensor | None, generator: torch.Generator | None, seed: int | None,
              uniforms: Tensor | None) -> Tensor:
    """The caller's uniforms (checked), or R fresh ones from generator / seed."""
    out_rows = logits.shape[0] if row_ids is None else row_ids.numel()
    if uniforms is None:
        return draw_uniforms(out_rows, logits.device, generator, seed)
    if validation_enabled():
        require(generator is None and seed is None, "uniforms", "give uniforms or generator/seed, not both")
        require(uniforms.shape == (out_rows,) and uniforms.dtype == torch.float32, "uniforms",
                f"must be fp32 [{out_rows}], got {uniforms.dtype} {tuple(uniforms.shape)}")
    return uniforms


def draw_uniforms(rows: int, device: torch.device, generator: torch.Generator | None = None,
                  seed: int | None = None) -> Tensor:
    """The fp32 uniforms in [0, 1) that `sample` hands to every backend: [rows]."""
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(int(seed))
    return torch.rand(rows, generator=generator, device=device, dtype=torch.float32)


def _split(value: Param, dtype: torch.dtype) -> tuple[float | int, Tensor | None]:
    """(scalar, None) or (placeholder, contiguous per-row tensor) for the kernels."""
    if isinstance(value, Tensor):
        return (0 if dtype == torch.int64 else 1.0), value.reshape(-1).to(dtype).contiguous()
    return (int(value) if dtype == torch.int64 else float(value)), None


def _kernel_args(logits: Tensor, uniforms: Tensor, row_ids: Tensor | None, temperature: Param,
                 top_k: int | Tensor, top_p: Param, min_p: Param) -> tuple:
    ids = None if row_ids is None else row_ids.reshape(-1).long().contiguous()
    return (logits, uniforms, ids, *_split(temperature, torch.float32), *_split(top_k, torch.int64),
            *_split(top_p, torch.float32), *_split(min_p, torch.float32))


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_param(name: str, value: Param, out_rows: int, device: torch.device, integer: bool,
                 ok: Callable[[Tensor], Tensor], bound: str) -> None:
    if isinstance(value, Tensor):
        if integer:
            require(not value.is_floating_point() and not value.is_complex() and value.dtype != torch.bool, name,
                    f"tensor dtype {value.dtype} is not an integer type")
        else:
            require(value.is_floating_point(), name, f"tensor dtype {value.dtype} is not floating point")
        require(value.device == device, name, f"is on {value.device}, logits on {device}")
        require(value.numel() == out_rows, name,
                f"needs one value per output row ({out_rows}), got shape {tuple(value.shape)}")
        if not integer:
            require(not bool(torch.isnan(value).any()), name, "contains NaN")
        require(bool(ok(value).all()) if value.numel() else True, name, f"must be {bound}")
        return
    if integer:
        require(isinstance(value, int) and not isinstance(value, bool), name,
                f"expected an int or a tensor, got {type(value).__name__}")
    else:
        require(_is_number(value), name, f"expected a number or a tensor, got {type(value).__name__}")
        require(not math.isnan(value), name, "is NaN")
    require(bool(ok(torch.tensor(value))), name, f"must be {bound}, got {value}")


def _validate(logits: Tensor, temperature: Param, top_k: int | Tensor, top_p: Param, min_p: Param,
              generator: torch.Generator | None, seed: int | None, row_ids: Tensor | None, check_nan: bool) -> None:
    require(isinstance(logits, Tensor), "logits", f"expected a tensor, got {type(logits).__name__}")
    require(logits.dtype in DTYPES, "logits", f"dtype {logits.dtype} is not supported; expected fp32, fp16 or bf16")
    require(logits.dim() == 2, "logits", f"expected [batch, vocab], got shape {tuple(logits.shape)}")
    rows, vocab = logits.shape
    out_rows = rows
    if row_ids is not None:
        require(isinstance(row_ids, Tensor), "row_ids", f"expected a tensor, got {type(row_ids).__name__}")
        require(row_ids.dtype in (torch.int32, torch.int64), "row_ids", f"dtype {row_ids.dtype} is not int32/int64")
        require(row_ids.dim() == 1, "row_ids", f"expected 1-D [R], got shape {tuple(row_ids.shape)}")
        require(row_ids.device == logits.device, "row_ids", f"is on {row_ids.device}, logits on {logits.device}")
        if row_ids.numel():
            low, high = int(row_ids.min()), int(row_ids.max())
            require(low >= 0 and high < rows, "row_ids", f"values must be in [0, {rows}), got [{low}, {high}]")
        out_rows = row_ids.numel()
    require(vocab > 0 or out_rows == 0, "logits", "has an empty vocabulary (V = 0)")
    device = logits.device
    _check_param("temperature", temperature, out_rows, device, False, lambda t: t >= 0, "non-negative")
    _check_param("top_k", top_k, out_rows, device, True, lambda k: k >= 0, "non-negative (0 = off)")
    _check_param("top_p", top_p, out_rows, device, False, lambda p: (p > 0) & (p <= 1), "in (0, 1]")
    _check_param("min_p", min_p, out_rows, device, False, lambda m: (m >= 0) & (m < 1), "in [0, 1)")
    require(seed is None or generator is None, "seed", "give seed or generator, not both")
    require(seed is None or (isinstance(seed, int) and not isinstance(seed, bool)), "seed",
            f"expected an int, got {type(seed).__name__}")
    if generator is not None:
        require(isinstance(generator, torch.Generator), "generator",
                f"expected a torch.Generator, got {type(generator).__name__}")
        require(generator.device.type == device.type, "generator",
                f"is on {generator.device}, logits on {device}")
    if check_nan and logits.numel():
        # NaN propagates through amax, and +inf is the max when present: one reduction.
        top = logits.amax()
        require(not bool(torch.isnan(top)), "logits", "contains NaN")
        require(not bool(torch.isposinf(top)), "logits", "contains +inf")


# torch.compile support: the fake (meta) implementation of the ops.
def _sample_fake(logits: Tensor, uniforms: Tensor, row_ids: Tensor | None, temperature: float,
                 row_temperature: Tensor | None, top_k: int, row_top_k: Tensor | None, top_p: float,
                 row_top_p: Tensor | None, min_p: float, row_min_p: Tensor | None) -> Tensor:
    return torch.empty(uniforms.shape, dtype=torch.int64, device=logits.device)


def _sample_with_logprobs_fake(logits: Tensor, uniforms: Tensor, row_ids: Tensor | None, temperature: float,
                               row_temperature: Tensor | None, top_k: int, row_top_k: Tensor | None, top_p: float,
                               row_top_p: Tensor | None, min_p: float, row_min_p: Tensor | None,
                               num_top: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    rows, device = uniforms.numel(), logits.device
    return (torch.empty(rows, dtype=torch.int64, device=device), torch.empty(rows, device=device),
            torch.empty(rows, num_top, device=device), torch.empty(rows, num_top, dtype=torch.int64, device=device),
            torch.empty(rows, device=device))


if _extension.load() is not None:
    torch.library.register_fake("forkdec::sample")(_sample_fake)
    torch.library.register_fake("forkdec::sample_with_logprobs")(_sample_with_logprobs_fake)


@torch.library.custom_op("forkdec::sample_triton", mutates_args=())
def _sample_triton(logits: Tensor, uniforms: Tensor, row_ids: Tensor | None, temperature: float,
                   row_temperature: Tensor | None, top_k: int, row_top_k: Tensor | None, top_p: float,
                   row_top_p: Tensor | None, min_p: float, row_min_p: Tensor | None) -> Tensor:
    from forkdec.triton_kernels.sampling import sample_rows

    out_rows = uniforms.numel()
    device = logits.device

    def per_row(scalar, rows_tensor, dtype):
        if rows_tensor is not None:
            return rows_tensor.to(device=device, dtype=dtype).contiguous()
        return torch.full((out_rows,), scalar, dtype=dtype, device=device)

    tokens = torch.empty(out_rows, dtype=torch.int64, device=device)
    if out_rows == 0:
        return tokens
    x = logits if logits.stride(-1) == 1 else logits.contiguous()
    ids = row_ids if row_ids is not None else torch.arange(out_rows, device=device)
    sample_rows(x, ids.long().contiguous(), uniforms.float().contiguous(),
                per_row(temperature, row_temperature, torch.float32), per_row(top_k, row_top_k, torch.int64),
                per_row(top_p, row_top_p, torch.float32), per_row(min_p, row_min_p, torch.float32), tokens)
    failed = tokens < 0
    if bool(failed.any()):
        r = int(failed.nonzero()[0, 0])
        raise ValueError(f"logits: row {int(ids[r])} leaves no token to sample after temperature and filters "
                         "(all -inf, or x / temperature overflows)")
    return tokens


_sample_triton.register_fake(_sample_fake)


@torch.library.custom_op("forkdec::sample_with_logprobs_triton", mutates_args=())
def _sample_with_logprobs_triton(logits: Tensor, uniforms: Tensor, row_ids: Tensor | None, temperature: float,
                                 row_temperature: Tensor | None, top_k: int, row_top_k: Tensor | None, top_p: float,
                                 row_top_p: Tensor | None, min_p: float, row_min_p: Tensor | None,
                                 num_top: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    from forkdec.triton_kernels.sampling import token_signals

    tokens = _sample_triton(logits, uniforms, row_ids, temperature, row_temperature, top_k, row_top_k, top_p,
                            row_top_p, min_p, row_min_p)
    out_rows, device = tokens.numel(), logits.device
    logprobs = torch.empty(out_rows, device=device)
    top_logprobs = torch.empty(out_rows, num_top, device=device)
    top_ids = torch.empty(out_rows, num_top, dtype=torch.int64, device=device)
    confidence = torch.full((out_rows,), float("nan") if num_top == 0 else 0.0, device=device)
    x = logits if logits.stride(-1) == 1 else logits.contiguous()
    ids = row_ids.long().contiguous() if row_ids is not None else torch.arange(out_rows, device=device)
    token_signals(x, ids, tokens, num_top, logprobs, top_logprobs, top_ids, confidence)
    return tokens, logprobs, top_logprobs, top_ids, confidence


_sample_with_logprobs_triton.register_fake(_sample_with_logprobs_fake)
