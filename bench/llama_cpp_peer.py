"""llama.cpp as a peer: n sampled paths of one prompt decoded in one batch.

The method of llama.cpp's `batched` example, through llama-cpp-python's
low-level binding of the C API (`llama_cpp.llama_*`):
1. the prompt is decoded once, as sequence 0, logits for its last token only;
2. `llama_memory_seq_cp` shares its cells with sequences 1..n-1 (a unified KV
   cache: one set of cells, several sequence ids, nothing copied);
3. every step samples one token per live sequence with llama.cpp's own sampler
   chain (top-k, top-p, temperature, then a seeded draw) from its row of the
   last batch, and decodes one `llama_batch` holding one token per live
   sequence; a sequence ends at an end-of-generation token (unless
   `ignore_eos`) or after `max_new_tokens` tokens.

`llama_context`, `put` and `decode` are shared with the tree and few-shot peers
(bench/llama_cpp_tree_peer.py, bench/llama_cpp_fewshot_peer.py); a peer runs in
its own process (bench/llama_cpp_process.py, or bench/engine.py's runner).

llama-cpp-python is optional and not part of forkdec's dependencies:
`CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python` (a ~7 minute
build from source here). Without it, `llama_cpp_generate` raises ImportError
with `SKIP_REASON` after checking its arguments.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import time
from collections.abc import Iterator
from types import ModuleType
from typing import Any

from forkdec.validation import require

SKIP_REASON = ("llama-cpp-python is not installed (optional peer, kept out of forkdec's dependencies; "
               "build it with CMAKE_ARGS=\"-DGGML_NATIVE=ON\" pip install llama-cpp-python, ~7 minutes here)")

_quiet_logger: Any = None  # llama.cpp keeps the raw pointer: the ctypes callback must outlive every call


def llama_cpp_generate(gguf_path: str, prompt_ids: list[int], n: int, max_new_tokens: int, temperature: float,
                       seed: int = 0, threads: int = 2, *, top_p: float = 1.0, top_k: int = 0,
                       ignore_eos: bool = False) -> dict:
    """Decode n sampled continuations of `prompt_ids` in one batch with llama.cpp.

    gguf_path: the model file; prompt_ids: token ids in the file's vocabulary (no
    BOS is added); temperature 0 means greedy, otherwise the chain is top-k
    (top_k 0: off), top-p (1.0: off), temperature, seeded draw.
    Returns {"tokens": n lists of ids (an ending EOS included), "generated_tokens",
    "decode_seconds" (first draw to last token), "prompt_seconds" (prompt decode and
    sequence copies), "version", "settings"}. Loading the model is not timed.
    Bad arguments raise ValueError naming the argument; a missing llama-cpp-python
    raises ImportError(SKIP_REASON).
    """
    check_arguments(gguf_path, prompt_ids, n, max_new_tokens, temperature, seed, threads, top_p, top_k)
    p = len(prompt_ids)
    # One unified cache holds the shared prompt once plus every path's own tokens;
    # a batch must fit the whole prompt (llama.cpp aborts otherwise) and n tokens.
    with llama_context(gguf_path, p + n * max_new_tokens + 16, max(p, n), n, threads) as lc:
        llama, ctx, batch = lc.llama, lc.ctx, lc.batch
        lc.check_vocab(prompt_ids, "prompt_ids")
        chain = lc.sampler(temperature, top_p, top_k, seed)

        t0 = time.perf_counter()
        lc.prefill(prompt_ids)
        for s in range(1, n):
            llama.llama_memory_seq_cp(lc.memory, 0, s, -1, -1)
        t1 = time.perf_counter()

        tokens: list[list[int]] = [[] for _ in range(n)]
        row = [p - 1] * n  # each sequence's logits row in the last batch; -1 once it has ended
        pos = p
        while True:
            batch.n_tokens = 0
            for s in range(n):
                if row[s] < 0:
                    continue
                tok = llama.llama_sampler_sample(chain, ctx, row[s])
                tokens[s].append(tok)
                if (not ignore_eos and llama.llama_vocab_is_eog(lc.vocab, tok)) or len(tokens[s]) == max_new_tokens:
                    row[s] = -1
                    continue
                row[s] = batch.n_tokens
                put(batch, batch.n_tokens, tok, pos, s, logits=True)
                batch.n_tokens += 1
            if batch.n_tokens == 0:
                break
            decode(llama, ctx, batch)
            pos += 1
        t2 = time.perf_counter()
    return {"tokens": tokens, "generated_tokens": sum(len(t) for t in tokens), "decode_seconds": t2 - t1,
            "prompt_seconds": t1 - t0, "version": lc.version,
            "settings": f"{threads} threads, unified KV, n_batch = n_ubatch = {max(p, n)}, sampler chain "
                        f"top-k {top_k}, top-p {top_p}, temperature {temperature}, dist(seed {seed})"}


def check_arguments(gguf_path: str, prompt_ids: list[int], n: int, max_new_tokens: int, temperature: float,
                    seed: int, threads: int, top_p: float = 1.0, top_k: int = 0) -> None:
    """ValueError naming the first bad argument of `llama_cpp_generate`; needs no llama_cpp."""
    def whole(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    def real(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v  # NaN != NaN

    require(isinstance(gguf_path, (str, os.PathLike)) and os.path.isfile(gguf_path), "gguf_path",
             f"no such file: {gguf_path!r}")
    require(isinstance(prompt_ids, (list, tuple)) and len(prompt_ids) > 0, "prompt_ids",
             "must be a non-empty list of token ids")
    require(all(whole(t) and t >= 0 for t in prompt_ids), "prompt_ids", "must hold non-negative ints")
    require(whole(n) and n >= 1, "n", f"must be an int >= 1, got {n!r}")
    require(whole(max_new_tokens) and max_new_tokens >= 1, "max_new_tokens",
             f"must be an int >= 1, got {max_new_tokens!r}")
    require(real(temperature) and temperature >= 0, "temperature", f"must be >= 0, got {temperature!r}")
    require(whole(seed) and 0 <= seed < 2**32, "seed", f"must be an int in [0, 2**32), got {seed!r}")
    require(whole(threads) and threads >= 1, "threads", f"must be an int >= 1, got {threads!r}")
    require(real(top_p) and 0 < top_p <= 1, "top_p", f"must be in (0, 1], got {top_p!r}")
    require(whole(top_k) and top_k >= 0, "top_k", f"must be an int >= 0, got {top_k!r}")


LLAMA_MAX_SEQ = 256  # llama.cpp's compile-time limit on sequence ids (src/llama-cparams.h in 0.3.36's vendor tree)


class LlamaContext:
    """A loaded model, a context with a unified KV cache, one `llama_batch`, and the sampler chains made on it."""

    def __init__(self, llama: ModuleType, model: Any, ctx: Any, batch: Any, n_batch: int) -> None:
        self.llama, self.model, self.ctx, self.batch, self.n_batch = llama, model, ctx, batch, n_batch
        self.vocab = llama.llama_model_get_vocab(model)
        self.memory = llama.llama_get_memory(ctx)
        self.version = f"llama-cpp-python {getattr(llama, '__version__', '?')}"
        self.chains: list[Any] = []

    def check_vocab(self, ids: list[int], arg: str) -> None:
        n_vocab = self.llama.llama_vocab_n_tokens(self.vocab)
        bad = [t for t in ids if t >= n_vocab]
        if bad:
            raise ValueError(f"{arg}: {bad[0]} is outside the model's vocabulary of {n_vocab}")

    def prefill(self, ids: list[int], last_logits: bool = True) -> None:
        """Decode `ids` at positions 0.. into sequence 0 in one batch (logits of the last row if asked)."""
        for i, tok in enumerate(ids):
            put(self.batch, i, tok, i, 0, logits=last_logits and i == len(ids) - 1)
        self.batch.n_tokens = len(ids)
        decode(self.llama, self.ctx, self.batch)

    def sampler(self, temperature: float, top_p: float, top_k: int, seed: int) -> Any:
        chain = _sampler_chain(self.llama, temperature, top_p, top_k, seed)
        self.chains.append(chain)
        return chain


@contextlib.contextmanager
def llama_context(gguf_path: str, n_ctx: int, n_batch: int, n_seq_max: int, threads: int) -> Iterator[LlamaContext]:
    """llama.cpp set up for shared prefixes: unified KV cache of n_ctx cells (one set of cells, several
    sequence ids per cell), n_batch = n_ubatch (a prompt longer than n_ubatch aborts llama.cpp), n_seq_max
    sequences, `threads` for both decode and batch. Everything is freed on exit.
    Raises ImportError(SKIP_REASON) without llama-cpp-python, ValueError for a file it cannot load."""
    llama = _import_llama_cpp()
    _silence_logs(llama)
    llama.llama_backend_init()
    model = ctx = batch = None
    lc = None
    try:
        model = llama.llama_model_load_from_file(os.fsencode(gguf_path), llama.llama_model_default_params())
        if not model:
            raise ValueError(f"gguf_path: llama.cpp could not load {gguf_path!r}")
        params = llama.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = params.n_ubatch = n_batch
        params.n_seq_max = n_seq_max
        params.kv_unified = True
        params.n_threads = params.n_threads_batch = threads
        ctx = llama.llama_init_from_model(model, params)
        if not ctx:
            raise RuntimeError(f"llama.cpp could not create a context (n_ctx {n_ctx}, n_seq_max {n_seq_max})")
        batch = llama.llama_batch_init(n_batch, 0, n_seq_max)
        lc = LlamaContext(llama, model, ctx, batch, n_batch)
        yield lc
    finally:
        if lc is not None:
            for chain in lc.chains:
                llama.llama_sampler_free(chain)
        if batch is not None:
            llama.llama_batch_free(batch)
        if ctx is not None:
            llama.llama_free(ctx)
        if model is not None:
            llama.llama_model_free(model)


def _import_llama_cpp() -> ModuleType:
    try:
        import llama_cpp
    except ImportError as e:
        raise ImportError(SKIP_REASON) from e
    return llama_cpp


def _silence_logs(llama: ModuleType) -> None:
    global _quiet_logger
    if _quiet_logger is None:
        _quiet_logger = llama.llama_log_callback(lambda level, text, user_data: None)
    llama.llama_log_set(_quiet_logger, ctypes.c_void_p())


def _sampler_chain(llama: ModuleType, temperature: float, top_p: float, top_k: int, seed: int) -> Any:
    """The order llama.cpp's common sampler uses: filters, then temperature, then the draw."""
    chain = llama.llama_sampler_chain_init(llama.llama_sampler_chain_default_params())
    if temperature == 0:
        llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_greedy())
        return chain
    if top_k > 0:
        llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_top_k(top_k))
    if top_p < 1:
        llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_top_p(top_p, 1))
    llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_temp(temperature))
    llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_dist(seed))
    return chain


def put(batch: Any, i: int, token: int, pos: int, seq: int, logits: bool) -> None:
    batch.token[i] = token
    batch.pos[i] = pos
    batch.n_seq_id[i] = 1
    batch.seq_id[i][0] = seq
    batch.logits[i] = logits


def decode(llama: ModuleType, ctx: Any, batch: Any) -> None:
    status = llama.llama_decode(ctx, batch)
    if status != 0:  # 1: no room in the KV cache; < 0: error
        raise RuntimeError(f"llama_decode returned {status} for a batch of {batch.n_tokens} tokens")
