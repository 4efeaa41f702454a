"""llama.cpp as a peer for tree-shaped decoding: a tree laid out by sequence copy.

The prompt is decoded once as sequence 0. At each level every live sequence forks
into `branching` children with `llama_memory_seq_cp` (the parent's id is reused by
its first child, so the leaves use ids 0..branching**depth-1): a child shares the
parent's cells (prompt and every ancestor's tokens), nothing is copied, and it draws
its first token from the parent's last logits row. Then all sequences of the level
decode `node_tokens` steps together, one `llama_batch` of one token per sequence
per step, sampled by llama.cpp's own chain (as bench/llama_cpp_peer.py).

llama.cpp attends the shared cells once per sequence (each query scans the unified
cache under its sequence mask): the cost forkdec's tree cascade removes. A step
costs it about sequences x cells, so the last level dominates the run;
`last_level_steps` stops that level early to bound the time.
"""
from __future__ import annotations

import time

from forkdec.bench.llama_cpp_peer import LLAMA_MAX_SEQ, check_arguments, decode, llama_context, put
from forkdec.validation import require


def llama_cpp_tree_decode(gguf_path: str, prompt_ids: list[int], depth: int, branching: int, node_tokens: int,
                          temperature: float, seed: int = 0, threads: int = 2, *, top_p: float = 1.0,
                          top_k: int = 0, last_level_steps: int | None = None) -> dict:
    """Decode a tree of `depth` levels, `branching` children per node, `node_tokens` tokens per node.

    Every token is sampled (EOS does not end a node). last_level_steps: stop the last level after this many
    steps (None: node_tokens), to bound the run (the steps grow with the cells; see the module). Returns {"levels": per level {"nodes",
    "copy_seconds", "step_seconds": one per decode step}, "prompt_seconds", "decode_seconds" (copies
    and steps of all levels), "generated_tokens", "unique_tokens" (prompt + all nodes' tokens),
    "leaf_tokens": each leaf's generated chain (root to leaf), "version", "settings"}.
    ValueError names a bad argument (a tree of more than LLAMA_MAX_SEQ leaves included).
    """
    for name, value in (("depth", depth), ("branching", branching), ("node_tokens", node_tokens)):
        require(isinstance(value, int) and not isinstance(value, bool) and value >= 1, name,
                f"must be an int >= 1, got {value!r}")
    check_arguments(gguf_path, prompt_ids, branching, node_tokens, temperature, seed, threads, top_p, top_k)
    leaves = branching ** depth
    require(leaves <= LLAMA_MAX_SEQ, "depth", f"branching**depth = {leaves} leaves exceed llama.cpp's "
            f"{LLAMA_MAX_SEQ} sequences (LLAMA_MAX_SEQ)")
    require(last_level_steps is None or (isinstance(last_level_steps, int) and 1 <= last_level_steps <= node_tokens),
            "last_level_steps", f"must be None or an int in [1, node_tokens], got {last_level_steps!r}")
    p = len(prompt_ids)
    nodes = sum(branching ** level for level in range(1, depth + 1))
    n_batch = max(p, leaves)
    with llama_context(gguf_path, p + nodes * node_tokens + 16, n_batch, leaves, threads) as lc:
        llama, ctx, batch = lc.llama, lc.ctx, lc.batch
        lc.check_vocab(prompt_ids, "prompt_ids")
        chain = lc.sampler(temperature, top_p, top_k, seed)
        t0 = time.perf_counter()
        lc.prefill(prompt_ids)
        prompt_seconds = time.perf_counter() - t0

        live, row, chains, next_seq = [0], {0: p - 1}, {0: []}, 1
        levels = []
        for level in range(depth):
            t0 = time.perf_counter()
            children = []
            for parent in live:
                children.append(parent)
                for _ in range(branching - 1):
                    llama.llama_memory_seq_cp(lc.memory, parent, next_seq, -1, -1)
                    row[next_seq], chains[next_seq] = row[parent], list(chains[parent])
                    children.append(next_seq)
                    next_seq += 1
            live = children
            copy_seconds = time.perf_counter() - t0
            steps = []
            pos = p + level * node_tokens
            for t in range(node_tokens if level < depth - 1 or last_level_steps is None else last_level_steps):
                t0 = time.perf_counter()
                for i, s in enumerate(live):
                    tok = llama.llama_sampler_sample(chain, ctx, row[s])
                    chains[s].append(tok)
                    put(batch, i, tok, pos + t, s, logits=True)
                    row[s] = i
                batch.n_tokens = len(live)
                decode(llama, ctx, batch)
                steps.append(time.perf_counter() - t0)
            levels.append({"nodes": len(live), "copy_seconds": copy_seconds, "step_seconds": steps})
    return {"levels": levels, "prompt_seconds": prompt_seconds,
            "decode_seconds": sum(v["copy_seconds"] + sum(v["step_seconds"]) for v in levels),
            "generated_tokens": sum(v["nodes"] * len(v["step_seconds"]) for v in levels),
            "unique_tokens": p + sum(v["nodes"] * len(v["step_seconds"]) for v in levels),
            "leaf_tokens": [chains[s] for s in live], "version": lc.version,
            "settings": f"{threads} threads, unified KV, n_ctx {p + nodes * node_tokens + 16}, n_seq_max {leaves}, "
                        f"n_batch = n_ubatch = {n_batch}, sampler chain top-k {top_k}, top-p {top_p}, "
                        f"temperature {temperature}, dist(seed {seed})"}
