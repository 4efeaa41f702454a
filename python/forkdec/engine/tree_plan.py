"""One cascade over the whole tree of paths, built once per decode step.

Every segment with decoding paths below it is one group of one level, queried
by all those paths (they are laid out in depth-first order, so a segment's
paths are consecutive rows), and each of its K/V pages is read once per step
whatever the number of paths below it. A group's level is the number of groups
above it on its chain; rows with no group at a level (a shallower path) are
covered by an empty group (no pages: it adds nothing to the merged state).

Folding: a segment with fewer than `fold_pages` pages is not a group of its
own; its pages are prepended to each child's group instead (read once per
child, one level fewer to merge). docs/engine.md gives the measured rule.
"""
from __future__ import annotations

from itertools import accumulate

import torch
from torch import Tensor

from forkdec.engine.tree_memory import Segment
from forkdec.ops import CascadeLevel


def _i32(values: list[int]) -> Tensor:
    return torch.tensor(values, dtype=torch.int32)


def tree_levels(roots: list[Segment], decoding, page_size: int, fold_pages: int = 0
                ) -> tuple[list, list[CascadeLevel], int]:
    """(leaf owners in row order, cascade levels, K/V tokens the levels read).

    decoding(seg) -> bool: whether the leaf `seg` feeds a query this step.
    """
    rows: list = []
    groups: list[list[tuple[int, int, list[int], int]]] = []  # per level: (row0, row1, pages, last_len)

    def visit(seg: Segment, level: int, carried: list[int]) -> None:
        row0 = len(rows)
        pages = carried + seg.pages
        if not seg.children:
            if seg.owner is None or not decoding(seg):
                return
            rows.append(seg.owner)
        else:
            fold = len(seg.pages) < fold_pages
            for c in seg.children:
                visit(c, level if fold else level + 1, pages if fold else [])
            if fold or len(rows) == row0:
                return
        if not pages:
            return
        last = seg.tokens % page_size if not seg.children else page_size
        last = last or page_size
        while len(groups) <= level:
            groups.append([])
        groups[level].append((row0, len(rows), pages, last))

    for root in roots:
        visit(root, 0, [])
    total = len(rows)
    levels, kv_tokens = [], 0
    for lv in groups:
        qo, kv_counts, indices, lasts = [0], [], [], []
        for row0, row1, pages, last in lv:
            if row0 > qo[-1]:  # rows without a group here: one empty group
                qo.append(row0)
                kv_counts.append(0)
                lasts.append(0)
            qo.append(row1)
            kv_counts.append(len(pages))
            indices += pages
            lasts.append(last)
            kv_tokens += (len(pages) - 1) * page_size + last
        if qo[-1] < total:
            qo.append(total)
            kv_counts.append(0)
            lasts.append(0)
        levels.append(CascadeLevel(qo_indptr=_i32(qo), kv_indptr=_i32([0, *accumulate(kv_counts)]),
                                   kv_indices=_i32(indices), kv_last_page_len=_i32(lasts)))
    return rows, levels, kv_tokens
