"""Per-step attention metadata, built once per step and shared by every layer.

Decode: level 0 has one group per prompt (all its running paths' queries over
the prompt's pages, the partial last page included with its true length);
level 1 has one group per path over its own pages, which already hold the
token being fed (it is appended before attention in every layer).
Verification (tree_batch): the same two levels, each path feeding its root and
its draft tree, level 1 masked by the tree.
"""
from __future__ import annotations

from itertools import accumulate

import torch
from torch import Tensor

from forkdec.cache import PageAllocator, StepBatch, TreeInputs
from forkdec.engine.drafter import DraftTree
from forkdec.engine.state import PathState, PromptState
from forkdec.ops import CascadeLevel
from forkdec.tree import build_tree


def _i32(values: list[int]) -> Tensor:
    return torch.tensor(values, dtype=torch.int32)


def _indptr(counts: list[int]) -> Tensor:
    return _i32([0, *accumulate(counts)])


def _last_len(tokens: int, pages: int, page_size: int) -> int:
    return tokens - (pages - 1) * page_size if pages else 0


def prefill_batch(prompts: list[PromptState], page_size: int) -> StepBatch:
    """The tokens of `prompts` not yet in the cache (their pages already allocated; the first
    `p.cached` tokens of each are held by pages reused from the prefix cache), causal, one group
    each over all of the prompt's pages."""
    tokens, positions, slots, lens = [], [], [], []
    for p in prompts:
        n = len(p.token_ids)
        tokens += p.token_ids[p.cached:]
        positions += range(p.cached, n)
        slots += [p.pages[i // page_size] * page_size + i % page_size for i in range(p.cached, n)]
        lens.append(n - p.cached)
    level = CascadeLevel(
        qo_indptr=_indptr(lens), kv_indptr=_indptr([len(p.pages) for p in prompts]),
        kv_indices=_i32([g for p in prompts for g in p.pages]),
        kv_last_page_len=_i32([_last_len(len(p.token_ids), len(p.pages), page_size) for p in prompts]),
        causal=True)
    last_rows = [r - 1 for r in accumulate(lens)]
    return StepBatch(torch.tensor(tokens, dtype=torch.int64), torch.tensor(positions, dtype=torch.int64),
                     torch.tensor(slots, dtype=torch.int64), [level], torch.tensor(last_rows, dtype=torch.int64))


def decode_batch(paths: list[PathState], allocator: PageAllocator, page_size: int) -> StepBatch:
    """One token per path; `paths` must be grouped by prompt. Takes a new page
    (from the path's reservation) for each path whose last page is full."""
    slots = []
    for path in paths:
        if path.kv_len % page_size == 0:
            path.pages.append(allocator.alloc())
            path.reserved -= 1
        slots.append(path.pages[-1] * page_size + path.kv_len % page_size)
        path.kv_len += 1
    level0, level1 = _levels(paths, page_size, [1] * len(paths), [p.kv_len for p in paths])
    tokens = torch.tensor([p.token_ids[-1] for p in paths], dtype=torch.int64)
    # position() already counts the token just given a slot, so step back one.
    positions = torch.tensor([p.position - 1 for p in paths], dtype=torch.int64)
    return StepBatch(tokens, positions, torch.tensor(slots, dtype=torch.int64), [level0, level1])


def _levels(paths: list[PathState], page_size: int, queries: list[int], kv_lens: list[int]) -> list[CascadeLevel]:
    """Level 0: one group per prompt (its paths' queries over its pages); level 1: one group
    per path (its `queries[i]` rows over its own pages holding `kv_lens[i]` tokens)."""
    groups: list[tuple[PromptState, int]] = []
    for path, q in zip(paths, queries):
        if groups and groups[-1][0] is path.prompt:
            groups[-1] = (path.prompt, groups[-1][1] + q)
        else:
            groups.append((path.prompt, q))
    prompts = [g for g, _ in groups]
    level0 = CascadeLevel(
        qo_indptr=_indptr([c for _, c in groups]), kv_indptr=_indptr([len(p.pages) for p in prompts]),
        kv_indices=_i32([g for p in prompts for g in p.pages]),
        kv_last_page_len=_i32([_last_len(len(p.token_ids), len(p.pages), page_size) for p in prompts]))
    level1 = CascadeLevel(
        qo_indptr=_indptr(queries), kv_indptr=_indptr([len(p.pages) for p in paths]),
        kv_indices=_i32([g for p in paths for g in p.pages]),
        kv_last_page_len=_i32([_last_len(n, len(p.pages), page_size) for n, p in zip(kv_lens, paths)]))
    return [level0, level1]


def tree_batch(paths: list[PathState], trees: list[DraftTree], allocator: PageAllocator, page_size: int) -> StepBatch:
    """A verification step: each path feeds its last token (the root) and its draft tree's nodes.

    The root goes to the slot plain decoding would use and node i to the slot of
    position root + 1 + i, taking pages from the path's reservation (the
    drafter keeps each tree within it). Level 0 is the prompt as in decode_batch; level 1
    is the path's own pages with the tree mask (build_tree, include_root): the
    root and each node see the path's earlier tokens, the root, their ancestors
    and themselves. The path's kv_len is advanced past the root only; the
    nodes' K/V stay beyond it until accept_path_kv keeps the accepted ones.
    """
    slots, prefix, counts, tokens, parents = [], [], [], [], []
    for path, tree in zip(paths, trees):
        start = path.kv_len
        end = start + 1 + len(tree)
        while len(path.pages) * page_size < end:
            path.pages.append(allocator.alloc())
            path.reserved -= 1
        slots += [path.pages[i // page_size] * page_size + i % page_size for i in range(start, end)]
        prefix.append(start)
        counts.append(len(tree))
        tokens.append(path.token_ids[-1])
        tokens += tree.tokens
        parents += tree.parents
        path.kv_len += 1
    tree_indptr = _indptr(counts)
    meta = build_tree(_i32(parents), tree_indptr, prefix_lens=_i32(prefix), include_root=True, packed=True)
    # positions: the root at its plain-decoding position, each node `depth` after it
    root_pos = torch.tensor([p.position - 1 for p in paths], dtype=torch.int64)
    offsets = torch.zeros(len(tokens), dtype=torch.int64)
    rows = meta.qo_indptr.long()
    is_node = torch.ones(len(tokens), dtype=torch.bool)
    is_node[rows[:-1]] = False
    offsets[is_node] = meta.positions.long()
    positions_t = torch.repeat_interleave(root_pos, torch.tensor([c + 1 for c in counts])) + offsets
    level0, level1 = _levels(paths, page_size, [c + 1 for c in counts], [s + 1 + c for s, c in zip(prefix, counts)])
    level1.custom_mask = meta.custom_mask
    tree = TreeInputs(torch.tensor([t for tr in trees for t in tr.tokens], dtype=torch.int32), _i32(parents),
                      tree_indptr, meta.max_depth, torch.tensor(slots, dtype=torch.int64)[is_node])
    return StepBatch(torch.tensor(tokens, dtype=torch.int64), positions_t, torch.tensor(slots, dtype=torch.int64),
                     [level0, level1], tree=tree)
