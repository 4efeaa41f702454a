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

Quantized caches (`tree_levels_split`): each group also says how many of its
leading pages its rows read quantized; rows that disagree (paths of unequal
lengths below a shared segment) get groups of their own (forkdec.engine.tree_windows).
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
    rows, levels, kv_tokens, _ = tree_levels_split(roots, decoding, page_size, fold_pages)
    return rows, levels, kv_tokens


def tree_levels_split(roots: list[Segment], decoding, page_size: int, fold_pages: int = 0, read_quantized=None
                      ) -> tuple[list, list[CascadeLevel], int, list[list[int]]]:
    """tree_levels, plus per level and group the leading pages its rows read quantized.

    read_quantized(owner) -> int: how many leading pages of the owner's whole chain it reads
    quantized (quantized caches; None: none). A group whose rows disagree on its pages (paths
    of unequal lengths below a shared segment) is split into runs of rows that agree, so each
    path reads every page in the state its own decode would.
    """
    rows: list = []
    # per level: (row0, row1, pages, last_len, pages read quantized)
    groups: list[list[tuple[int, int, list[int], int, int]]] = []

    def visit(seg: Segment, level: int, carried: list[int], first_page: int) -> None:
        row0 = len(rows)
        pages = carried + seg.pages
        if not carried:
            first_page = seg.start // page_size  # chain index of the group's first page
        if not seg.children:
            if seg.owner is None or not decoding(seg):
                return
            rows.append(seg.owner)
        else:
            fold = len(seg.pages) < fold_pages
            for c in seg.children:
                visit(c, level if fold else level + 1, pages if fold else [], first_page)
            if fold or len(rows) == row0:
                return
        if not pages:
            return
        last = seg.tokens % page_size if not seg.children else page_size
        last = last or page_size
        while len(groups) <= level:
            groups.append([])
        if read_quantized is None:
            groups[level].append((row0, len(rows), pages, last, 0))
            return
        counts = [min(max(read_quantized(r) - first_page, 0), len(pages)) for r in rows[row0:]]
        start = 0
        for i in range(1, len(counts) + 1):
            if i == len(counts) or counts[i] != counts[start]:
                groups[level].append((row0 + start, row0 + i, pages, last, counts[start]))
                start = i

    for root in roots:
        visit(root, 0, [], 0)
    total = len(rows)
    levels, kv_tokens, quantized = [], 0, []
    for lv in groups:
        qo, kv_counts, indices, lasts, nq = [0], [], [], [], []
        for row0, row1, pages, last, q in lv:
            if row0 > qo[-1]:  # rows without a group here: one empty group
                qo.append(row0)
                kv_counts.append(0)
                lasts.append(0)
                nq.append(0)
            qo.append(row1)
            kv_counts.append(len(pages))
            indices += pages
            lasts.append(last)
            nq.append(q)
            kv_tokens += (len(pages) - 1) * page_size + last
        if qo[-1] < total:
            qo.append(total)
            kv_counts.append(0)
            lasts.append(0)
            nq.append(0)
        levels.append(CascadeLevel(qo_indptr=_i32(qo), kv_indptr=_i32([0, *accumulate(kv_counts)]),
                                   kv_indices=_i32(indices), kv_last_page_len=_i32(lasts)))
        quantized.append(nq)
    return rows, levels, kv_tokens, quantized
