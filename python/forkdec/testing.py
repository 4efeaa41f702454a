"""Random cascade inputs ("forests"), shared by the tests and the benchmarks.

A forest is several prompts, each with several paths. The prompt's KV is stored
once; each path's own tokens live in the path's own pages; each path brings
qo_len queries (1 for decode, a draft tree's nodes for verification), which are
the last qo_len of its own tokens. `Forest.levels` is the two-level cascade;
`Forest.flat` is the same attention with the prompt copied into every path
(how n samples are usually batched), the layout every baseline uses.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from forkdec.ops.attention import CascadeLevel


@dataclass
class Forest:
    q: Tensor
    k_cache: Tensor
    v_cache: Tensor
    levels: list[CascadeLevel]   # [prompt level, path level]
    flat: CascadeLevel | None    # one group per path over prompt copy + own tokens
    prompt_lens: list[int]
    own_lens: list[list[int]]
    qo_lens: list[list[int]]


def tree_mask(parents: list[int]) -> Tensor:
    """[n, n] bool: node i sees itself and its ancestors (parents[i] < i, -1 = root's child)."""
    n = len(parents)
    mask = torch.eye(n, dtype=torch.bool)
    for i, p in enumerate(parents):
        if p >= 0:
            mask[i] |= mask[p]
    return mask


class _Pages:
    """Hands out pages of a growing cache and writes tokens into them."""

    def __init__(self, page_size: int):
        self.page_size = page_size
        self.k: list[Tensor] = []
        self.v: list[Tensor] = []

    def store(self, k: Tensor, v: Tensor) -> tuple[list[int], int]:
        """Write [n, Hkv, D] tokens into fresh pages; return (page ids, last page length)."""
        n = k.shape[0]
        ids = []
        for start in range(0, n, self.page_size):
            page_k = torch.zeros(self.page_size, *k.shape[1:], dtype=k.dtype)
            page_v = torch.zeros_like(page_k)
            page_k[: min(self.page_size, n - start)] = k[start:start + self.page_size]
            page_v[: min(self.page_size, n - start)] = v[start:start + self.page_size]
            ids.append(len(self.k))
            self.k.append(page_k)
            self.v.append(page_v)
        return ids, (n - 1) % self.page_size + 1 if n else 0


def _table(groups: list[tuple[list[int], int]]) -> tuple[Tensor, Tensor, Tensor]:
    indptr = [0]
    indices: list[int] = []
    last = []
    for ids, last_len in groups:
        indices += ids
        indptr.append(len(indices))
        last.append(last_len)
    i32 = dict(dtype=torch.int32)
    return torch.tensor(indptr, **i32), torch.tensor(indices, **i32), torch.tensor(last, **i32)


def random_forest(prompt_lens: list[int], own_lens: list[list[int]], qo_lens: list[list[int]], *,
                  page_size: int = 16, hq: int = 9, hkv: int = 3, d: int = 64,
                  dtype: torch.dtype = torch.float32, tree: bool = False,
                  generator: torch.Generator | None = None, shuffle_pages: bool = True,
                  with_flat: bool = True) -> Forest:
    """Random forest: prompt p has paths j with own_lens[p][j] tokens, the last
    qo_lens[p][j] of which are queries (causal; or a random tree if `tree`).
    `with_flat=False` skips the per-path prompt copies (`Forest.flat` is then None)."""
    g = generator or torch.Generator().manual_seed(0)
    pages = _Pages(page_size)

    def rand(n):
        return torch.randn(n, hkv, d, generator=g).to(dtype)

    prompt_groups, path_groups, flat_groups = [], [], []
    prompt_qo, path_qo = [0], [0]
    path_masks, flat_masks = [], []
    for p, prompt_len in enumerate(prompt_lens):
        pk, pv = rand(prompt_len), rand(prompt_len)
        prompt_groups.append(pages.store(pk, pv))
        for own, qo in zip(own_lens[p], qo_lens[p]):
            assert qo <= own, "a path's queries are its last tokens"
            ok, ov = rand(own), rand(own)
            path_groups.append(pages.store(ok, ov))
            if with_flat:
                flat_groups.append(pages.store(torch.cat([pk, ok]), torch.cat([pv, ov])))
            path_qo.append(path_qo[-1] + qo)
            if tree:
                parents = [int(torch.randint(-1, i, (1,), generator=g)) for i in range(qo)]
                m = torch.ones(qo, own, dtype=torch.bool)
                m[:, own - qo:] = tree_mask(parents)
                path_masks.append(m.reshape(-1))
                flat_masks.append(torch.cat([torch.ones(qo, prompt_len, dtype=torch.bool), m], 1).reshape(-1))
        prompt_qo.append(path_qo[-1])

    # Scatter pages in a random order so that no kernel can lean on adjacency.
    n = len(pages.k)
    perm = torch.randperm(n, generator=g) if shuffle_pages else torch.arange(n)
    k_cache = torch.stack(pages.k)[torch.argsort(perm)] if n else torch.zeros(1, page_size, hkv, d, dtype=dtype)
    v_cache = torch.stack(pages.v)[torch.argsort(perm)] if n else torch.zeros(1, page_size, hkv, d, dtype=dtype)

    def remap(groups):
        return [([int(perm[i]) for i in ids], last) for ids, last in groups]

    q = torch.randn(path_qo[-1], hq, d, generator=g).to(dtype)
    i32 = dict(dtype=torch.int32)
    prompt_level = CascadeLevel(torch.tensor(prompt_qo, **i32), *_table(remap(prompt_groups)), causal=False)
    path_mask = torch.cat(path_masks) if tree and path_masks else (torch.zeros(0, dtype=torch.bool) if tree else None)
    flat_mask = torch.cat(flat_masks) if tree and flat_masks else (torch.zeros(0, dtype=torch.bool) if tree else None)
    path_level = CascadeLevel(torch.tensor(path_qo, **i32), *_table(remap(path_groups)),
                              causal=not tree, custom_mask=path_mask)
    flat = CascadeLevel(torch.tensor(path_qo, **i32), *_table(remap(flat_groups)), causal=not tree,
                        custom_mask=flat_mask) if with_flat else None
    return Forest(q, k_cache, v_cache, [prompt_level, path_level], flat, prompt_lens, own_lens, qo_lens)
