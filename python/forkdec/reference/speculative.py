"""Reference speculative verification over ragged draft trees (docs/speculative.md).

Plain PyTorch, one request and one node at a time: obviously correct, slow.
Every backend must give the same tokens from the same uniforms.

Layouts (per request b with n_b = tree_indptr[b+1] - tree_indptr[b] nodes):
- draft_tokens, parents [N]: node i's token and its parent (local index, -1 =
  the root, which is the last accepted token and not a node; parents[i] < i).
- target rows [N + B, V]: request b's block starts at tree_indptr[b] + b;
  row 0 of the block is the distribution after the root, row 1 + i the one
  after node i.
- uniforms [N + B] float64, the same block layout: entry 0 draws the bonus
  token, entry 1 + i decides whether node i is accepted.

Arithmetic that every backend repeats exactly: node x drawn from q is accepted
when `u * q(x) < p(x)` in float64; the residual is `max(p - q, 0)` in fp32,
divided by its float64 sum S and rounded to fp32 (kept unchanged if S == 0);
the bonus token is the first k with cumsum(p)[k] > u * sum(p) (float64).
Sums in float64 make the summation order (which differs between backends)
irrelevant except with probability ~1e-16 per draw.
"""
from __future__ import annotations

import torch
from torch import Tensor


def speculative_uniforms(count: int, device: torch.device | str, generator: torch.Generator | None = None,
                         seed: int | None = None) -> Tensor:
    """`count` float64 uniforms in [0, 1) from `generator`, a fresh generator
    seeded with `seed`, or torch's default generator."""
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(int(seed))
    return torch.rand(count, dtype=torch.float64, device=device, generator=generator)


def sample_inverse_cdf(p: Tensor, u: float) -> int:
    """The first k with cumsum(p)[k] > u * sum(p) (float64); p may be unnormalized.

    A token with zero mass is never chosen. If rounding leaves no such k (u
    within 1e-16 of 1), the last token with positive mass; an all-zero p gives 0.
    """
    cdf = torch.cumsum(p.double(), 0)
    if cdf.numel() == 0:
        return 0
    k = int(torch.searchsorted(cdf, cdf[-1:] * u, right=True))
    if k >= p.numel():
        positive = torch.nonzero(p > 0)
        k = int(positive[-1]) if positive.numel() else 0
    return k


def _outputs(batch: int, max_depth: int, device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    tokens = torch.full((batch, max_depth + 1), -1, dtype=torch.int32, device=device)
    nodes = torch.full((batch, max_depth), -1, dtype=torch.int32, device=device)
    num = torch.zeros(batch, dtype=torch.int32, device=device)
    bonus = torch.zeros(batch, dtype=torch.int32, device=device)
    return tokens, nodes, num, bonus


def tree_max_depth(parents: Tensor, tree_indptr: Tensor) -> int:
    """The depth of the deepest node over all trees (0 for no nodes)."""
    depth = [0] * parents.numel()
    indptr = tree_indptr.tolist()
    par = parents.tolist()
    for b in range(len(indptr) - 1):
        for i in range(indptr[b], indptr[b + 1]):
            depth[i] = 1 if par[i] < 0 else depth[indptr[b] + par[i]] + 1
    return max(depth, default=0)


def verify_tree_greedy_rows(draft_tokens: Tensor, parents: Tensor, tree_indptr: Tensor, target_logits: Tensor,
                            max_depth: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Greedy verification; returns (accepted_tokens, accepted_nodes, num_accepted, bonus_token)."""
    batch = tree_indptr.numel() - 1
    tokens_out, nodes_out, num, bonus = _outputs(batch, max_depth, target_logits.device)
    indptr = tree_indptr.tolist()
    for b in range(batch):
        start, n = indptr[b], indptr[b + 1] - indptr[b]
        par = parents[start:start + n].tolist()
        tok = draft_tokens[start:start + n].tolist()
        argmax = target_logits[start + b:start + b + n + 1].float().argmax(-1).tolist()  # first max wins
        matched = [False] * n
        for i in range(n):  # node i is on a fully matching path from the root
            matched[i] = (par[i] < 0 or matched[par[i]]) and tok[i] == argmax[par[i] + 1]
        length = [0] * n  # nodes of the longest matching path starting at node i
        best = [-1] * (n + 1)  # per parent (slot 0 = root): the child starting the longest path
        for i in reversed(range(n)):
            if matched[i]:
                length[i] = 1 + (length[best[i + 1]] if best[i + 1] >= 0 else 0)
                slot = par[i] + 1
                if best[slot] < 0 or length[i] >= length[best[slot]]:  # >= : lower index wins ties
                    best[slot] = i
        node, depth = -1, 0
        while best[node + 1] >= 0:
            node = best[node + 1]
            tokens_out[b, depth] = tok[node]
            nodes_out[b, depth] = node
            depth += 1
        tokens_out[b, depth] = argmax[node + 1]
        num[b], bonus[b] = depth, argmax[node + 1]
    return tokens_out, nodes_out, num, bonus


def verify_tree_sampling_rows(draft_tokens: Tensor, parents: Tensor, tree_indptr: Tensor, draft_probs: Tensor,
                              target_probs: Tensor, uniforms: Tensor, max_depth: int,
                              draft_rows_match_target: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """SpecInfer's multi-step speculative sampling (arXiv 2305.09781) over each tree.

    draft_probs rows: with draft_rows_match_target the target's layout (block
    at tree_indptr[b] + b, row 1 + j = the distribution node j's children were
    drawn from); otherwise the block starts at tree_indptr[b] (n_b rows: the
    last node of a tree never has children), the layout of a chain.
    Returns (accepted_tokens, accepted_nodes, num_accepted, bonus_token).
    """
    batch = tree_indptr.numel() - 1
    tokens_out, nodes_out, num, bonus = _outputs(batch, max_depth, target_probs.device)
    indptr = tree_indptr.tolist()
    for b in range(batch):
        start, n = indptr[b], indptr[b + 1] - indptr[b]
        base = start + b
        draft_base = base if draft_rows_match_target else start
        par = parents[start:start + n].tolist()
        tok = draft_tokens[start:start + n].tolist()
        u = uniforms[base:base + n + 1].double().tolist()
        node, depth = -1, 0
        p = target_probs[base].float()
        while True:
            accepted = -1
            for c in range(n):  # the children of `node`, in index order
                if par[c] != node:
                    continue
                q = draft_probs[draft_base + 1 + node].float()
                x = tok[c]
                if u[1 + c] * float(q[x]) < float(p[x]):  # accept with probability min(1, p(x) / q(x))
                    accepted = c
                    break
                residual = (p - q).clamp_min(0)
                total = residual.double().sum()
                if total > 0:
                    p = (residual.double() / total).float()
            if accepted < 0:
                break
            tokens_out[b, depth] = tok[accepted]
            nodes_out[b, depth] = accepted
            depth += 1
            node = accepted
            p = target_probs[base + 1 + node].float()
        k = sample_inverse_cdf(p, u[0])
        tokens_out[b, depth] = k
        num[b], bonus[b] = depth, k
    return tokens_out, nodes_out, num, bonus


def verify_tree_greedy(draft_tokens: Tensor, parents: Tensor, tree_indptr: Tensor, target_logits: Tensor):
    """See forkdec.ops.verify_tree_greedy."""
    from forkdec.ops.speculative import VerifyResult

    depth = tree_max_depth(parents, tree_indptr)
    tokens, nodes, num, bonus = verify_tree_greedy_rows(draft_tokens, parents, tree_indptr, target_logits, depth)
    return VerifyResult(tokens, num, bonus, nodes)


def verify_tree_sampling(draft_tokens: Tensor, parents: Tensor, tree_indptr: Tensor, draft_probs: Tensor,
                         target_probs: Tensor, *, generator: torch.Generator | None = None,
                         seed: int | None = None, uniforms: Tensor | None = None):
    """See forkdec.ops.verify_tree_sampling."""
    from forkdec.ops.speculative import VerifyResult

    batch = tree_indptr.numel() - 1
    if uniforms is None:
        uniforms = speculative_uniforms(draft_tokens.numel() + batch, target_probs.device, generator, seed)
    depth = tree_max_depth(parents, tree_indptr)
    tokens, nodes, num, bonus = verify_tree_sampling_rows(draft_tokens, parents, tree_indptr, draft_probs,
                                                          target_probs, uniforms, depth)
    return VerifyResult(tokens, num, bonus, nodes)


def chain_speculative_sampling(draft_tokens: Tensor, draft_probs: Tensor, target_probs: Tensor, *,
                               generator: torch.Generator | None = None, seed: int | None = None,
                               uniforms: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """See forkdec.ops.chain_speculative_sampling."""
    batch, length = draft_tokens.shape
    if uniforms is None:
        uniforms = speculative_uniforms(batch * (length + 1), target_probs.device, generator, seed)
    parents = torch.arange(-1, length - 1, dtype=torch.int32, device=draft_tokens.device).repeat(batch)
    indptr = torch.arange(0, batch + 1, dtype=torch.int32, device=draft_tokens.device) * length
    vocab = target_probs.shape[-1]
    tokens, _, num, _ = verify_tree_sampling_rows(
        draft_tokens.reshape(-1), parents, indptr, draft_probs.reshape(-1, vocab),
        target_probs.reshape(-1, vocab), uniforms.reshape(-1), length, draft_rows_match_target=False)
    return tokens, num
