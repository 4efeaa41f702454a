"""Per-step attention metadata, built once per step and shared by every layer.

Decode: level 0 has one group per prompt (all its running paths' queries over
the prompt's pages, the partial last page included with its true length);
level 1 has one group per path over its own pages, which already hold the
token being fed (it is appended before attention in every layer).
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import torch
from torch import Tensor

from forkdec.engine.kv_cache import PageAllocator
from forkdec.engine.state import PathState, PromptState
from forkdec.ops import CascadeLevel


def _i32(values: list[int]) -> Tensor:
    return torch.tensor(values, dtype=torch.int32)


def _indptr(counts: list[int]) -> Tensor:
    return _i32([0, *accumulate(counts)])


def _last_len(tokens: int, pages: int, page_size: int) -> int:
    return tokens - (pages - 1) * page_size if pages else 0


@dataclass
class StepBatch:
    """Inputs of one model forward: tokens, positions, where their K/V go, and
    the page tables their queries read."""
    tokens: Tensor          # [T] int64
    positions: Tensor       # [T] int64
    slots: Tensor           # [T] int64, page * page_size + offset
    levels: list[CascadeLevel]
    logits_rows: Tensor | None = None


def prefill_batch(prompts: list[PromptState], page_size: int) -> StepBatch:
    """All tokens of `prompts` (their pages already allocated), causal, one group each."""
    tokens, positions, slots = [], [], []
    for p in prompts:
        n = len(p.token_ids)
        tokens += p.token_ids
        positions += range(n)
        slots += [p.pages[i // page_size] * page_size + i % page_size for i in range(n)]
    lens = [len(p.token_ids) for p in prompts]
    level = CascadeLevel(
        qo_indptr=_indptr(lens), kv_indptr=_indptr([len(p.pages) for p in prompts]),
        kv_indices=_i32([g for p in prompts for g in p.pages]),
        kv_last_page_len=_i32([_last_len(n, len(p.pages), page_size) for n, p in zip(lens, prompts)]),
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
    groups: list[tuple[PromptState, int]] = []
    for path in paths:
        if groups and groups[-1][0] is path.prompt:
            groups[-1] = (path.prompt, groups[-1][1] + 1)
        else:
            groups.append((path.prompt, 1))
    prompts = [g for g, _ in groups]
    level0 = CascadeLevel(
        qo_indptr=_indptr([c for _, c in groups]), kv_indptr=_indptr([len(p.pages) for p in prompts]),
        kv_indices=_i32([g for p in prompts for g in p.pages]),
        kv_last_page_len=_i32([_last_len(len(p.token_ids), len(p.pages), page_size) for p in prompts]))
    level1 = CascadeLevel(
        qo_indptr=_i32(list(range(len(paths) + 1))), kv_indptr=_indptr([len(p.pages) for p in paths]),
        kv_indices=_i32([g for p in paths for g in p.pages]),
        kv_last_page_len=_i32([_last_len(p.kv_len, len(p.pages), page_size) for p in paths]))
    tokens = torch.tensor([p.token_ids[-1] for p in paths], dtype=torch.int64)
    # position() already counts the token just given a slot, so step back one.
    positions = torch.tensor([p.position - 1 for p in paths], dtype=torch.int64)
    return StepBatch(tokens, positions, torch.tensor(slots, dtype=torch.int64), [level0, level1])
