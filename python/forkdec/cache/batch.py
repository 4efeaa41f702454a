"""StepBatch: what one model forward feeds a cache — tokens, positions, the slots
their K/V go to, and the cascade levels their queries read."""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from forkdec.ops import CascadeLevel


@dataclass
class TreeInputs:
    """The draft trees a verification step feeds, in forkdec.ops.verify_tree_* layout."""
    draft_tokens: Tensor    # [N] int32
    parents: Tensor         # [N] int32, local (-1 = the root)
    tree_indptr: Tensor     # [B+1] int32
    max_depth: int
    node_slots: Tensor      # [N] int64, where each node's K/V was written (accept_path_kv)


@dataclass
class StepBatch:
    """Inputs of one model forward: tokens, positions, where their K/V go, and
    the page tables their queries read."""
    tokens: Tensor          # [T] int64
    positions: Tensor       # [T] int64
    slots: Tensor           # [T] int64, page * page_size + offset
    levels: list[CascadeLevel]
    logits_rows: Tensor | None = None
    tree: TreeInputs | None = None   # a verification step's draft trees
