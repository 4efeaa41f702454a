"""Harness specs for the speculative verification ops: random ragged tree
batches whose drafts are partly right, so that paths of every length occur.
Backends must return exactly the reference's tokens (same uniforms)."""
from __future__ import annotations

import torch

import forkdec
from forkdec import reference
from forkdec.ops.speculative import BACKENDS
from harness import SPECS, Case, OpSpec


def random_parents(sizes: list[int], g: torch.Generator, chain_bias: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Parent arrays of random trees with `sizes` nodes, and tree_indptr.
    Each node hangs off the previous node with probability chain_bias (deep
    trees), else off a uniformly chosen earlier node or the root."""
    parents = []
    for n in sizes:
        for i in range(n):
            if i and float(torch.rand(1, generator=g)) < chain_bias:
                parents.append(i - 1)
            else:
                parents.append(int(torch.randint(-1, i, (1,), generator=g)))
    indptr = torch.tensor([0] + sizes, dtype=torch.int64).cumsum(0).to(torch.int32)
    return torch.tensor(parents, dtype=torch.int32), indptr


def parent_rows(parents: torch.Tensor, indptr: torch.Tensor) -> torch.Tensor:
    """[N] int64: the target/draft row (block layout) of each node's parent."""
    counts = (indptr[1:] - indptr[:-1]).long()
    req = torch.repeat_interleave(torch.arange(counts.numel()), counts)
    return indptr.long()[req] + req + 1 + parents.long()


def with_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as a non-contiguous view: rows of a wider tensor, or a
    transposed copy (no unit stride inside a row)."""
    if layout == "wide":
        return torch.cat([t, torch.zeros_like(t[:, :3])], 1)[:, : t.shape[1]]
    if layout == "transposed":
        return t.t().contiguous().t()
    return t


def greedy_inputs(sizes, vocab, dtype, g, match=0.75, duplicate=0.0, layout="contiguous"):
    parents, indptr = random_parents(sizes, g)
    n, batch = parents.numel(), len(sizes)
    logits = (torch.randn(n + batch, vocab, generator=g) * 3).to(dtype)
    if vocab > 4 and n + batch:  # exact ties in the argmax
        logits[:, 3] = logits[:, 1]
    best = logits.float().argmax(-1)
    rows = parent_rows(parents, indptr)
    tokens = torch.randint(0, vocab, (n,), generator=g, dtype=torch.int32)
    hit = torch.rand(n, generator=g) < match
    tokens[hit] = best[rows[hit]].to(torch.int32)
    if duplicate and n > 1:  # some node copies its previous sibling's token
        for i in range(1, n):
            if parents[i] == parents[i - 1] and float(torch.rand(1, generator=g)) < duplicate:
                tokens[i] = tokens[i - 1]
    return (tokens, parents, indptr, with_layout(logits, layout)), {}


def toy_distributions(rows: int, vocab: int, g: torch.Generator, sharpness: float = 2.0):
    """Target p and a correlated draft q (rows sum to 1, fp32); q is missing
    some of p's mass (zeroed entries) so residuals matter."""
    base = torch.randn(rows, vocab, generator=g) * sharpness
    p = torch.softmax(base, -1)
    q_logits = base + torch.randn(rows, vocab, generator=g)
    if vocab > 2:
        q_logits[torch.rand(rows, vocab, generator=g) < 0.1] = -float("inf")
        q_logits[:, 0] = torch.where(torch.isinf(q_logits).all(-1), 0.0, q_logits[:, 0])
    q = torch.softmax(q_logits, -1)
    return p, q


def draw(q_rows: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return torch.multinomial(q_rows.float(), 1, generator=g).reshape(-1).to(torch.int32) if q_rows.numel() else \
        torch.zeros(0, dtype=torch.int32)


def sampling_inputs(sizes, vocab, dtype, g, layout="contiguous", seed=1234):
    parents, indptr = random_parents(sizes, g)
    n, batch = parents.numel(), len(sizes)
    p, q = toy_distributions(n + batch, vocab, g)
    p, q = p.to(dtype), q.to(dtype)
    tokens = draw(q[parent_rows(parents, indptr)], g)  # each child drawn from its parent's draft row
    return (tokens, parents, indptr, with_layout(q, layout), with_layout(p, layout)), {"seed": seed}


def chain_inputs(batch, length, vocab, dtype, g, layout="contiguous", seed=99):
    p, q = toy_distributions(batch * (length + 1), vocab, g)
    p = p.to(dtype).reshape(batch, length + 1, vocab)
    q = q.to(dtype).reshape(batch, length + 1, vocab)[:, :length]  # a non-contiguous [B, L, V] view
    if layout == "contiguous":
        q = q.contiguous()
    tokens = draw(q.reshape(-1, vocab), g).reshape(batch, length)
    return (tokens, q, p), {"seed": seed}


def _case(id, make, *params, triton=True, **kw):
    return Case(id, lambda dtype, g: make(*params, dtype, g, **kw), triton)


GREEDY_CASES = [
    _case("three_trees", greedy_inputs, [5, 0, 7], 17),
    _case("odd_vocab_4097", greedy_inputs, [9, 3], 4097),
    _case("empty_batch", greedy_inputs, [], 11),
    _case("empty_trees", greedy_inputs, [0, 0, 0], 11),
    _case("vocab1", greedy_inputs, [4, 2], 1),
    _case("duplicate_siblings", greedy_inputs, [12, 10], 5, duplicate=0.8),
    _case("wide_rows", greedy_inputs, [6, 4], 33, layout="wide"),
    _case("transposed_rows", greedy_inputs, [6, 4], 33, layout="transposed"),
    _case("big_forest", greedy_inputs, [64] * 12, 3001, triton=False),
]

SAMPLING_CASES = [
    _case("three_trees", sampling_inputs, [5, 0, 7], 7),
    _case("odd_vocab_4097", sampling_inputs, [9, 3], 4097),
    _case("empty_batch", sampling_inputs, [], 11),
    _case("empty_trees", sampling_inputs, [0, 0], 11),
    _case("vocab1", sampling_inputs, [3, 2], 1),
    _case("vocab2_many", sampling_inputs, [8, 8, 8], 2),
    _case("wide_rows", sampling_inputs, [6, 4], 33, layout="wide"),
    _case("transposed_rows", sampling_inputs, [6, 4], 33, layout="transposed"),
    _case("big_forest", sampling_inputs, [64] * 12, 3001, triton=False),
]

CHAIN_CASES = [  # ids prefixed: this spec shares the op name (and kernels) of verify_tree_sampling
    _case("chain_b3_l4", chain_inputs, 3, 4, 9),
    _case("chain_b2_l1_odd_vocab", chain_inputs, 2, 1, 1001),
    _case("chain_l0", chain_inputs, 3, 0, 5),
    _case("chain_b0", chain_inputs, 0, 3, 5),
    _case("chain_strided_draft", chain_inputs, 4, 5, 13, layout="strided"),
    _case("chain_big", chain_inputs, 32, 8, 2049, triton=False),
]


def compare_exact(out, ref, dtype):
    assert len(out) == len(ref)
    for a, b in zip(out, ref):
        assert a.dtype == torch.int32 and a.shape == b.shape, (a.dtype, a.shape, b.shape)
        assert torch.equal(a, b), (a, b)


SPECS.append(OpSpec("verify_tree_greedy", forkdec.ops.verify_tree_greedy, reference.verify_tree_greedy, BACKENDS,
                    GREEDY_CASES, compare_exact))
SPECS.append(OpSpec("verify_tree_sampling", forkdec.ops.verify_tree_sampling, reference.verify_tree_sampling,
                    BACKENDS, SAMPLING_CASES, compare_exact))
# the chain face runs the verify_tree_sampling kernels
SPECS.append(OpSpec("verify_tree_sampling", forkdec.ops.chain_speculative_sampling,
                    reference.chain_speculative_sampling, BACKENDS, CHAIN_CASES, compare_exact))
