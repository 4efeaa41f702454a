"""Token trees for speculative decoding: attention masks, positions, paths, KV compaction.

A draft tree per request is a parent array: node i's parent is parents[i] < i
(a local index), or -1 for children of the root. The root is the last accepted
token and is not a node. A batch concatenates the requests' arrays, ragged by
tree_indptr [B+1] int32 (request b owns nodes tree_indptr[b]:tree_indptr[b+1]).
Parents before children means a node's index is larger than all its ancestors',
which every op here relies on (one pass in index order sees parents first).

Everything is vectorized over the batch: the only loops run once per tree
level (log2 of the depth rounds for the depths, one round per level for the
masks), never per node.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from forkdec.validation import require, validation_enabled

INDEX_DTYPES = (torch.int32, torch.int64)


@dataclass
class TreeMeta:
    """What the verification forward of a batch of draft trees needs.

    custom_mask: the attention ops' custom_mask (docs/attention.md), per
        request a row-major [q_b, k_b] bool matrix, concatenated (bit-packed
        uint8, little bit order, if packed). Rows are the request's queries:
        its n_b nodes (with include_root, the root first, then the nodes);
        columns are prefix_lens[b] cached tokens (if given), then the same
        queries. A node sees the prefix, the root (with include_root), its
        ancestors and itself.
    positions [N] int32: depth of each node (root's children are 1), i.e. the
        offset to add to the root's position; node i sits at position
        root_position + positions[i].
    depth [B] int32: the depth of each request's tree (0 for an empty tree).
    max_depth: max of depth (0 for no nodes); the width of retrieve_indices.
    retrieve_indices [num_leaves, max_depth] int32: per leaf (a node without
        children), the local node indices of its root-to-leaf path, padded -1;
        leaves in node order, request after request.
    leaf_indptr [B+1] int32: request b's leaves are rows leaf_indptr[b]:leaf_indptr[b+1].
    qo_indptr [B+1] int32: query rows of each request in the verification
        forward (tree_indptr, or tree_indptr + arange(B+1) with include_root).
    """
    custom_mask: Tensor
    positions: Tensor
    depth: Tensor
    max_depth: int
    retrieve_indices: Tensor
    leaf_indptr: Tensor
    qo_indptr: Tensor


def validate_tree(parents: Tensor, tree_indptr: Tensor, *, parents_name: str = "parents",
                  indptr_name: str = "tree_indptr") -> None:
    """ValueError naming the argument unless the arrays describe a ragged batch of trees."""
    require(isinstance(tree_indptr, Tensor) and tree_indptr.dim() == 1 and tree_indptr.dtype in INDEX_DTYPES,
            indptr_name, "must be a 1-D int32 tensor")
    require(tree_indptr.numel() >= 1, indptr_name, "needs B + 1 >= 1 entries")
    require(isinstance(parents, Tensor) and parents.dim() == 1 and parents.dtype in INDEX_DTYPES, parents_name,
            "must be a 1-D int32 tensor")
    require(parents.device == tree_indptr.device, parents_name,
            f"is on {parents.device}, {indptr_name} on {tree_indptr.device}")
    require(int(tree_indptr[0]) == 0, indptr_name, "must start at 0")
    require(bool((tree_indptr[1:] >= tree_indptr[:-1]).all()), indptr_name, "must be non-decreasing")
    require(int(tree_indptr[-1]) == parents.numel(), indptr_name,
            f"ends at {int(tree_indptr[-1])}, but there are {parents.numel()} nodes")
    local = local_index(tree_indptr, parents.numel())
    bad = (parents < -1) | (parents.long() >= local)
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0])
        raise ValueError(f"{parents_name}: node {int(local[i])} (entry {i}) has parent {int(parents[i])}; "
                         "a parent must be -1 (the root) or a smaller local index")


def request_of(tree_indptr: Tensor, n: int) -> Tensor:
    """[n] int64: the request each node belongs to."""
    counts = (tree_indptr[1:] - tree_indptr[:-1]).long()
    return torch.repeat_interleave(torch.arange(counts.numel(), device=tree_indptr.device), counts, output_size=n)


def local_index(tree_indptr: Tensor, n: int) -> Tensor:
    """[n] int64: each node's index inside its request."""
    return torch.arange(n, device=tree_indptr.device) - tree_indptr.long()[request_of(tree_indptr, n)]


def global_parents(parents: Tensor, tree_indptr: Tensor) -> Tensor:
    """[N] int64: the parent's index in the concatenated arrays, -1 for the root."""
    start = tree_indptr.long()[request_of(tree_indptr, parents.numel())]
    return torch.where(parents >= 0, parents.long() + start, -1)


def node_depths(parents: Tensor, tree_indptr: Tensor) -> Tensor:
    """[N] int64 depth of every node (root's children are 1), by pointer jumping:
    each round adds the depth gathered so far at the ancestor and jumps twice as far."""
    n = parents.numel()
    up = global_parents(parents, tree_indptr)
    depth = torch.ones(n, dtype=torch.int64, device=parents.device)
    for _ in range(n.bit_length() + 1):  # 2^rounds > n: every chain of a forest has ended by then
        if not bool((up >= 0).any()):
            return depth
        has = up >= 0
        safe = up.clamp_min(0)
        depth = torch.where(has, depth + depth[safe], depth)
        up = torch.where(has, up[safe], up)
    raise ValueError("parents: a chain of parents never reaches the root (a cycle)")


def build_tree(parents: Tensor, tree_indptr: Tensor, *, prefix_lens: Tensor | None = None, packed: bool = False,
               include_root: bool = False) -> TreeMeta:
    """Masks, positions and root-to-leaf paths of a ragged batch of draft trees.

    parents [N] int32 local parent indices (-1 = root, parents[i] < i);
    tree_indptr [B+1] int32. prefix_lens [B] (optional): cached tokens before
    each tree, all visible to every query; without it the mask is the tree
    part only ([n_b, n_b]), to use as a tree-masked cascade level over the
    tree's own pages. include_root: the root is also a query (first row) and a
    key (after the prefix), the layout of a verification forward that feeds
    [root, nodes...] and yields the target rows of forkdec.ops.verify_tree_*.
    packed: bit-pack the mask (uint8, little bit order). See TreeMeta.
    """
    if validation_enabled():
        validate_tree(parents, tree_indptr)
        if prefix_lens is not None:
            batch = tree_indptr.numel() - 1
            require(isinstance(prefix_lens, Tensor) and prefix_lens.dim() == 1 and prefix_lens.numel() == batch
                    and not prefix_lens.is_floating_point(), "prefix_lens", f"must be an integer [B={batch}] tensor")
            require(prefix_lens.numel() == 0 or int(prefix_lens.min()) >= 0, "prefix_lens", "must be >= 0")
    device = parents.device
    n, batch = parents.numel(), tree_indptr.numel() - 1
    depth = node_depths(parents, tree_indptr)
    tree_depth = torch.zeros(batch, dtype=torch.int64, device=device)
    tree_depth.scatter_reduce_(0, request_of(tree_indptr, n), depth, "amax")
    max_depth = int(depth.max()) if n else 0
    retrieve, leaf_indptr = _paths(parents, tree_indptr, depth, max_depth)

    if include_root:  # the root becomes node 0 of each request, everything else shifts by one
        mask_parents, mask_indptr = _with_root(parents, tree_indptr)
    else:
        mask_parents, mask_indptr = parents, tree_indptr
    mask = _mask(mask_parents, mask_indptr, prefix_lens)
    if packed:
        mask = pack_bits(mask)
    return TreeMeta(custom_mask=mask, positions=depth.to(torch.int32), depth=tree_depth.to(torch.int32),
                    max_depth=max_depth, retrieve_indices=retrieve, leaf_indptr=leaf_indptr,
                    qo_indptr=mask_indptr.to(torch.int32))


def _with_root(parents: Tensor, tree_indptr: Tensor) -> tuple[Tensor, Tensor]:
    batch = tree_indptr.numel() - 1
    indptr = tree_indptr.long() + torch.arange(batch + 1, device=tree_indptr.device)
    out = torch.full((parents.numel() + batch,), -1, dtype=torch.int64, device=parents.device)
    is_node = torch.ones(out.numel(), dtype=torch.bool, device=parents.device)
    is_node[indptr[:-1]] = False
    out[is_node] = parents.long() + 1
    return out, indptr


def _ancestor_matrix(parents: Tensor, tree_indptr: Tensor) -> Tensor:
    """[N, width] bool: row i marks node i's ancestors and itself by local column;
    built level by level (a row is its parent's row plus itself)."""
    n = parents.numel()
    counts = (tree_indptr[1:] - tree_indptr[:-1]).long()
    width = int(counts.max()) if counts.numel() else 0
    rows = torch.zeros(n, max(width, 1), dtype=torch.bool, device=parents.device)
    if n == 0:
        return rows[:, :width]
    local = local_index(tree_indptr, n)
    up = global_parents(parents, tree_indptr)
    depth = node_depths(parents, tree_indptr)
    rows[torch.arange(n, device=parents.device), local] = True
    for level in range(2, int(depth.max()) + 1):
        nodes = torch.nonzero(depth == level).squeeze(1)
        rows[nodes] |= rows[up[nodes]]
    return rows[:, :width]


def _mask(parents: Tensor, tree_indptr: Tensor, prefix_lens: Tensor | None) -> Tensor:
    """The flat bool mask: per request [n_b, prefix_b + n_b] rows, concatenated."""
    n = parents.numel()
    ancestors = _ancestor_matrix(parents, tree_indptr)
    req = request_of(tree_indptr, n)
    counts = (tree_indptr[1:] - tree_indptr[:-1]).long()
    prefix = (torch.zeros_like(counts) if prefix_lens is None else prefix_lens.long().to(counts.device))[req]
    row_len = prefix + counts[req]
    width = int(row_len.max()) if n else 0
    col = torch.arange(width, device=parents.device)
    tree_col = (col[None, :] - prefix[:, None])
    in_tree = tree_col >= 0
    seen = torch.gather(ancestors, 1, tree_col.clamp(0, max(ancestors.shape[1] - 1, 0))) if ancestors.numel() \
        else torch.zeros(n, width, dtype=torch.bool, device=parents.device)
    full = torch.where(in_tree, seen, True)
    return full[col[None, :] < row_len[:, None]]  # row-major, ragged rows


def _paths(parents: Tensor, tree_indptr: Tensor, depth: Tensor, max_depth: int) -> tuple[Tensor, Tensor]:
    n, batch = parents.numel(), tree_indptr.numel() - 1
    device = parents.device
    up = global_parents(parents, tree_indptr)
    has_child = torch.zeros(n, dtype=torch.bool, device=device)
    has_child[up[up >= 0]] = True
    leaves = torch.nonzero(~has_child).squeeze(1)
    leaf_counts = torch.zeros(batch, dtype=torch.int64, device=device)
    leaf_counts.index_add_(0, request_of(tree_indptr, n)[leaves], torch.ones_like(leaves))
    leaf_indptr = torch.zeros(batch + 1, dtype=torch.int32, device=device)
    leaf_indptr[1:] = torch.cumsum(leaf_counts, 0).to(torch.int32)
    retrieve = torch.full((leaves.numel(), max_depth), -1, dtype=torch.int32, device=device)
    # walk every leaf up to the root at once; depth d lands in column d - 1
    node = leaves.clone()
    start = tree_indptr.long()[request_of(tree_indptr, n)]
    rows = torch.arange(leaves.numel(), device=device)
    while node.numel():
        retrieve[rows, depth[node] - 1] = (node - start[node]).to(torch.int32)
        keep = up[node] >= 0
        node, rows = up[node][keep], rows[keep]
    return retrieve, leaf_indptr


def pack_bits(mask: Tensor) -> Tensor:
    """A flat bool mask bit-packed into uint8, little bit order (bit i is bit i % 8 of byte i // 8)."""
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = (1 << torch.arange(8, device=mask.device)).to(torch.uint8)
    return (flat.view(-1, 8).to(torch.uint8) * weights).sum(1, dtype=torch.uint8)


def accept_path_kv(k_cache: Tensor, v_cache: Tensor, node_slots: Tensor, tree_indptr: Tensor,
                   accepted_nodes: Tensor, num_accepted: Tensor, *, dst_slots: Tensor | None = None) -> None:
    """Compact the K/V of each request's accepted path, in place.

    The verification forward wrote node i of request b (local index) at slot
    node_slots[tree_indptr[b] + i] (slot = page * page_size + offset, e.g. via
    forkdec.ops.append_kv). The engine allocates those as the slots of the
    positions that follow the root, in node order, so the slots of nodes
    0 .. k-1 are the slots where a plain decode would have put the next k
    tokens. This copies the j-th accepted node (accepted_nodes[b, j], local,
    for j < num_accepted[b]) to node_slots[tree_indptr[b] + j], or to
    dst_slots[b, j] if given. Afterwards the request's cache up to root
    position + num_accepted[b] equals the one plain decoding builds; the
    engine drops the remaining tree slots (shortens the request's pages).

    k_cache, v_cache [num_pages, page_size, Hkv, D]; node_slots [N] int;
    accepted_nodes [B, D'] int (as returned by forkdec.ops.verify_tree_*);
    num_accepted [B] int; dst_slots [B, D'] int, optional. All sources are read
    before any destination is written, so overlaps are safe.
    """
    batch = tree_indptr.numel() - 1
    if validation_enabled():
        require(k_cache.dim() == 4 and v_cache.shape == k_cache.shape, "v_cache",
                f"caches must both be [num_pages, page_size, Hkv, D], got {tuple(k_cache.shape)} and "
                f"{tuple(v_cache.shape)}")
        require(node_slots.dim() == 1 and not node_slots.is_floating_point(), "node_slots", "must be 1-D int")
        require(tree_indptr.dim() == 1 and int(tree_indptr[0]) == 0 and int(tree_indptr[-1]) == node_slots.numel()
                and bool((tree_indptr[1:] >= tree_indptr[:-1]).all()), "tree_indptr",
                f"must start at 0, be non-decreasing and end at {node_slots.numel()} (the nodes)")
        require(accepted_nodes.dim() == 2 and accepted_nodes.shape[0] == batch and
                not accepted_nodes.is_floating_point(), "accepted_nodes", f"must be an int [B={batch}, D] tensor")
        require(num_accepted.dim() == 1 and num_accepted.numel() == batch, "num_accepted", f"must be [B={batch}]")
        counts = (tree_indptr[1:] - tree_indptr[:-1]).long()
        require(bool(((num_accepted >= 0) & (num_accepted.long() <= counts) &
                      (num_accepted.long() <= accepted_nodes.shape[1])).all()), "num_accepted",
                "must be in [0, min(nodes of the tree, accepted_nodes.shape[1])]")
        valid = torch.arange(accepted_nodes.shape[1], device=accepted_nodes.device)[None] < num_accepted[:, None]
        require(bool((((accepted_nodes >= 0) & (accepted_nodes.long() < counts[:, None])) | ~valid).all()),
                "accepted_nodes", "accepted entries must be node indices of their request's tree")
        capacity = k_cache.shape[0] * k_cache.shape[1]
        require(node_slots.numel() == 0 or (int(node_slots.min()) >= 0 and int(node_slots.max()) < capacity),
                "node_slots", f"slot ids must be in [0, {capacity})")
        if dst_slots is not None:
            require(dst_slots.shape == accepted_nodes.shape and not dst_slots.is_floating_point(), "dst_slots",
                    f"must be an int tensor shaped like accepted_nodes {tuple(accepted_nodes.shape)}")
            used = dst_slots[valid]
            require(used.numel() == 0 or (int(used.min()) >= 0 and int(used.max()) < capacity), "dst_slots",
                    f"slot ids must be in [0, {capacity})")
            require(torch.unique(used).numel() == used.numel(), "dst_slots", "accepted entries must be distinct")
    src, dst = accepted_kv_slots(node_slots, tree_indptr, accepted_nodes, num_accepted, dst_slots=dst_slots)
    page_size = k_cache.shape[1]
    for cache in (k_cache, v_cache):
        moved = cache[src // page_size, src % page_size]  # a gathered copy: sources read before writes
        cache[dst // page_size, dst % page_size] = moved


def accepted_kv_slots(node_slots: Tensor, tree_indptr: Tensor, accepted_nodes: Tensor, num_accepted: Tensor, *,
                      dst_slots: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(src, dst) int64 slot pairs that accept_path_kv copies, pairs already in place left out."""
    width = accepted_nodes.shape[1]
    j = torch.arange(width, device=accepted_nodes.device)
    valid = j[None] < num_accepted.long()[:, None]
    start = tree_indptr.long()[:-1, None]
    src = node_slots.long()[(start + accepted_nodes.long().clamp_min(0))[valid]] if valid.any() else \
        node_slots.new_zeros(0, dtype=torch.int64)
    if dst_slots is None:
        dst = node_slots.long()[(start + j[None]).expand_as(valid)[valid]] if valid.any() else src.clone()
    else:
        dst = dst_slots.long()[valid]
    moving = src != dst
    return src[moving], dst[moving]
