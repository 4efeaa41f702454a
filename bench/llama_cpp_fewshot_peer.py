"""llama.cpp as a peer for few-shot self-consistency: many questions behind one shared prefix.

The prefix is decoded once as sequence 0. Questions go in groups of as many as
llama.cpp's sequence ids allow (LLAMA_MAX_SEQ = 256 ids, one kept for the prefix:
255 // n questions of n paths each). For each group: `llama_memory_seq_cp` shares
the prefix with each question's first sequence, one batch prefills all the group's
question tokens, each question's sequence is copied to its other n-1 paths (which
draw their first token from the question's last logits row), and all paths decode
together, one token per path per step; then the group's sequences are removed
(`llama_memory_seq_rm`), the prefix stays.
"""
from __future__ import annotations

import time

from forkdec.bench.llama_cpp_peer import LLAMA_MAX_SEQ, check_arguments, decode, llama_context, put
from forkdec.validation import require


def llama_cpp_fewshot(gguf_path: str, prefix_ids: list[int], question_ids: list[list[int]], n: int,
                      max_new_tokens: int, temperature: float, seed: int = 0, threads: int = 2, *,
                      top_p: float = 1.0, top_k: int = 0, ignore_eos: bool = True) -> dict:
    """n sampled paths for each question (prompt = prefix_ids + question_ids[q]), prefix prefilled once.

    Returns {"prompt_tokens_prefilled", "prefill_seconds" (prefix, question batches and copies),
    "decode_seconds", "seconds" (all of it), "generated_tokens", "groups": questions per group,
    "tokens": per question n lists of ids, "version", "settings"}. ValueError names a bad argument.
    """
    require(isinstance(prefix_ids, (list, tuple)) and len(prefix_ids) > 0
            and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prefix_ids), "prefix_ids",
            "must be a non-empty list of non-negative ints")
    check_arguments(gguf_path, prefix_ids, n, max_new_tokens, temperature, seed, threads, top_p, top_k)
    require(isinstance(question_ids, (list, tuple)) and len(question_ids) > 0
            and all(isinstance(q, (list, tuple)) and len(q) > 0 for q in question_ids), "question_ids",
            "must be a non-empty list of non-empty token id lists")
    require(n <= LLAMA_MAX_SEQ - 1, "n", f"must be <= {LLAMA_MAX_SEQ - 1} (llama.cpp's sequence ids, one for the prefix)")
    per_group = (LLAMA_MAX_SEQ - 1) // n
    groups = [list(range(i, min(i + per_group, len(question_ids)))) for i in range(0, len(question_ids), per_group)]
    p = len(prefix_ids)
    group_tokens = max(sum(len(question_ids[q]) for q in g) for g in groups)
    n_seq = 1 + min(per_group, len(question_ids)) * n
    n_batch = max(p, group_tokens, n_seq)  # llama.cpp asserts n_seq_max <= n_batch (its output buffer)
    n_ctx = p + group_tokens + min(per_group, len(question_ids)) * n * max_new_tokens + 16
    tokens: list[list[list[int]]] = [[[] for _ in range(n)] for _ in question_ids]
    with llama_context(gguf_path, n_ctx, n_batch, n_seq, threads) as lc:
        llama, ctx, batch = lc.llama, lc.ctx, lc.batch
        lc.check_vocab(prefix_ids, "prefix_ids")
        for q in question_ids:
            lc.check_vocab(list(q), "question_ids")
        chain = lc.sampler(temperature, top_p, top_k, seed)
        start = time.perf_counter()
        lc.prefill(prefix_ids, last_logits=False)
        prefill_seconds = time.perf_counter() - start
        decode_seconds = 0.0
        for group in groups:
            t0 = time.perf_counter()
            batch.n_tokens = 0
            row, pos, out = {}, {}, {}
            for j, q in enumerate(group):
                seq = 1 + j * n
                llama.llama_memory_seq_cp(lc.memory, 0, seq, -1, -1)
                for i, tok in enumerate(question_ids[q]):
                    last = i == len(question_ids[q]) - 1
                    put(batch, batch.n_tokens, tok, p + i, seq, logits=last)
                    batch.n_tokens += 1
                for k in range(n):
                    row[seq + k], pos[seq + k], out[seq + k] = batch.n_tokens - 1, p + len(question_ids[q]), tokens[q][k]
            decode(llama, ctx, batch)
            for j in range(len(group)):
                for k in range(1, n):
                    llama.llama_memory_seq_cp(lc.memory, 1 + j * n, 1 + j * n + k, -1, -1)
            t1 = time.perf_counter()
            prefill_seconds += t1 - t0
            live = list(row)
            while live:
                batch.n_tokens = 0
                still = []
                for s in live:
                    tok = llama.llama_sampler_sample(chain, ctx, row[s])
                    out[s].append(tok)
                    if (not ignore_eos and llama.llama_vocab_is_eog(lc.vocab, tok)) or len(out[s]) == max_new_tokens:
                        continue
                    row[s] = batch.n_tokens
                    put(batch, batch.n_tokens, tok, pos[s], s, logits=True)
                    pos[s] += 1
                    batch.n_tokens += 1
                    still.append(s)
                live = still
                if live:
                    decode(llama, ctx, batch)
            for s in row:
                llama.llama_memory_seq_rm(lc.memory, s, -1, -1)
            decode_seconds += time.perf_counter() - t1
        seconds = time.perf_counter() - start
    return {"prompt_tokens_prefilled": p + sum(len(q) for q in question_ids), "prefill_seconds": prefill_seconds,
            "decode_seconds": decode_seconds, "seconds": seconds,
            "generated_tokens": sum(len(t) for q in tokens for t in q), "groups": [len(g) for g in groups],
            "tokens": tokens, "version": lc.version,
            "settings": f"{threads} threads, unified KV, n_ctx {n_ctx}, n_seq_max {n_seq}, n_batch = n_ubatch = "
                        f"{n_batch}, questions in groups of {per_group} ({n} paths each), sampler chain top-k "
                        f"{top_k}, top-p {top_p}, temperature {temperature}, dist(seed {seed}), "
                        f"ignore_eos {ignore_eos}"}
