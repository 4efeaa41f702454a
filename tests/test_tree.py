"""forkdec.tree: masks, positions and paths against per-node loops, the mask
inside the attention op, and KV compaction after verification against a cache
built by plain sequential decoding."""
from __future__ import annotations

import math

import pytest
import torch

import forkdec
from forkdec.reference.attention import unpack_mask
from forkdec.tree import accept_path_kv, build_tree, pack_bits
from specs.speculative import random_parents

ATTN_BACKENDS = [b for b in ("reference", "cpu") if b in forkdec.available_backends("attention")]


def ancestors(parents, start, i):
    """Local indices of node i's ancestors and itself, root side first."""
    path = []
    while i >= 0:
        path.append(i)
        i = int(parents[start + i])
    return path[::-1]


def loop_meta(parents, indptr, prefix=None, include_root=False):
    masks, positions, paths, leaf_counts, depths = [], [], [], [], []
    for b in range(indptr.numel() - 1):
        s, e = int(indptr[b]), int(indptr[b + 1])
        n, pre = e - s, 0 if prefix is None else int(prefix[b])
        r = 1 if include_root else 0
        m = torch.zeros(n + r, pre + n + r, dtype=torch.bool)
        m[:, :pre] = True
        if include_root:
            m[:, pre] = True
        has_child = set()
        depth_b = 0
        for i in range(n):
            path = ancestors(parents, s, i)
            for j in path:
                m[r + i, pre + r + j] = True
            positions.append(len(path))
            depth_b = max(depth_b, len(path))
            if int(parents[s + i]) >= 0:
                has_child.add(int(parents[s + i]))
        leaves = [i for i in range(n) if i not in has_child]
        paths += [ancestors(parents, s, i) for i in leaves]
        leaf_counts.append(len(leaves))
        depths.append(depth_b)
        masks.append(m.reshape(-1))
    return (torch.cat(masks) if masks else torch.zeros(0, dtype=torch.bool)), positions, paths, leaf_counts, depths


@pytest.mark.parametrize("sizes", [[5, 0, 7], [1], [], [0, 0], [30, 12, 1, 20]])
@pytest.mark.parametrize("with_prefix", [False, True])
@pytest.mark.parametrize("include_root", [False, True])
def test_build_tree_matches_per_node_loops(sizes, with_prefix, include_root):
    g = torch.Generator().manual_seed(len(sizes) * 7 + sum(sizes))
    parents, indptr = random_parents(sizes, g, chain_bias=0.4)
    prefix = torch.randint(0, 9, (len(sizes),), generator=g, dtype=torch.int32) if with_prefix else None
    meta = build_tree(parents, indptr, prefix_lens=prefix, include_root=include_root)
    mask, positions, paths, leaf_counts, depths = loop_meta(parents, indptr, prefix, include_root)
    assert meta.custom_mask.dtype == torch.bool and torch.equal(meta.custom_mask, mask)
    assert meta.positions.tolist() == positions and meta.depth.tolist() == depths
    assert meta.max_depth == max(depths, default=0)
    assert meta.leaf_indptr.tolist() == [0] + torch.tensor(leaf_counts, dtype=torch.long).cumsum(0).tolist()
    assert meta.retrieve_indices.shape == (len(paths), meta.max_depth)
    for row, path in zip(meta.retrieve_indices.tolist(), paths):
        assert row == path + [-1] * (meta.max_depth - len(path))
    extra = torch.arange(len(sizes) + 1) if include_root else 0
    assert torch.equal(meta.qo_indptr.long(), indptr.long() + extra)
    packed = build_tree(parents, indptr, prefix_lens=prefix, include_root=include_root, packed=True).custom_mask
    assert packed.dtype == torch.uint8 and packed.numel() == (mask.numel() + 7) // 8
    assert torch.equal(unpack_mask(packed, mask.numel()), mask)


def test_pack_bits_little_bit_order():
    bits = torch.tensor([1, 0, 0, 0, 0, 0, 0, 1, 1, 1], dtype=torch.bool)
    assert pack_bits(bits).tolist() == [0b10000001, 0b11]


def test_build_tree_bad_input():
    indptr = torch.tensor([0, 3], dtype=torch.int32)
    with pytest.raises(ValueError, match="^parents:"):
        build_tree(torch.tensor([-1, 2, 0], dtype=torch.int32), indptr)
    with pytest.raises(ValueError, match="^parents:"):
        build_tree(torch.tensor([-1, 0, -3], dtype=torch.int32), indptr)
    with pytest.raises(ValueError, match="^tree_indptr:"):
        build_tree(torch.tensor([-1, 0], dtype=torch.int32), indptr)
    with pytest.raises(ValueError, match="^tree_indptr:"):
        build_tree(torch.tensor([-1, 0, 1], dtype=torch.int32), indptr.float())
    with pytest.raises(ValueError, match="^prefix_lens:"):
        build_tree(torch.tensor([-1, 0, 1], dtype=torch.int32), indptr, prefix_lens=torch.tensor([-1]))


def _paged(positions_per_request, page_size, g):
    """Random (shuffled) pages for each request; slot_of(b, pos)."""
    pages_needed = [math.ceil(n / page_size) for n in positions_per_request]
    perm = torch.randperm(sum(pages_needed) + 3, generator=g)
    tables, k = [], 0
    for n in pages_needed:
        tables.append(perm[k:k + n].tolist())
        k += n
    return tables, lambda b, pos: tables[b][pos // page_size] * page_size + pos % page_size


@pytest.mark.parametrize("backend", ATTN_BACKENDS)
def test_tree_mask_gives_each_node_its_path_attention(backend):
    """Attention of every node with build_tree's mask equals causal attention
    over [prefix, its root-to-node path] computed directly."""
    g = torch.Generator().manual_seed(5)
    sizes, prefix = [6, 9, 3], [5, 0, 11]
    parents, indptr = random_parents(sizes, g)
    page_size, hq, hkv, d = 4, 4, 2, 32
    totals = [p + n for p, n in zip(prefix, sizes)]
    tables, slot_of = _paged(totals, page_size, g)
    num_pages = max(max(t) for t in tables if t) + 1
    k_cache = torch.randn(num_pages, page_size, hkv, d, generator=g)
    v_cache = torch.randn(num_pages, page_size, hkv, d, generator=g)
    q = torch.randn(sum(sizes), hq, d, generator=g)
    meta = build_tree(parents, indptr, prefix_lens=torch.tensor(prefix), packed=True)
    kv_indptr = torch.tensor([0] + [len(t) for t in tables]).cumsum(0).to(torch.int32)
    kv_indices = torch.tensor([p for t in tables for p in t], dtype=torch.int32)
    last = torch.tensor([(n - 1) % page_size + 1 for n in totals], dtype=torch.int32)
    out = forkdec.ops.attention(q, meta.qo_indptr, k_cache, v_cache, kv_indptr, kv_indices, last,
                                custom_mask=meta.custom_mask, backend=backend)
    for b in range(len(sizes)):
        s = int(indptr[b])
        for i in range(sizes[b]):
            keys = list(range(prefix[b])) + [prefix[b] + j for j in ancestors(parents, s, i)]
            slots = torch.tensor([slot_of(b, pos) for pos in keys])
            kk = k_cache.reshape(-1, hkv, d)[slots].repeat_interleave(hq // hkv, 1)
            vv = v_cache.reshape(-1, hkv, d)[slots].repeat_interleave(hq // hkv, 1)
            w = torch.softmax(torch.einsum("hd,khd->hk", q[s + i], kk) / math.sqrt(d), -1)
            torch.testing.assert_close(out[s + i], torch.einsum("hk,khd->hd", w, vv), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("use_dst_slots", [False, True])
def test_accept_path_kv_equals_plain_decoding(dtype, use_dst_slots):
    """Write the tree where the verification forward puts it (node i at the
    position after the root + i), verify, compact: the cache must equal the one
    plain decoding of the accepted tokens builds, position by position."""
    g = torch.Generator().manual_seed(9)
    sizes, prefix = [7, 0, 10, 4], [3, 6, 0, 9]  # prefix includes the root (the last cached token)
    parents, indptr = random_parents(sizes, g)
    page_size, hkv, d = 3, 2, 8
    vocab = 5
    logits = torch.randn(sum(sizes) + len(sizes), vocab, generator=g)
    best = logits.argmax(-1)
    counts = (indptr[1:] - indptr[:-1]).long()
    req = torch.repeat_interleave(torch.arange(len(sizes)), counts)
    tokens = best[indptr.long()[req] + req + 1 + parents.long()].to(torch.int32)  # every node matches: long paths
    tokens[::4] = (tokens[::4] + 1) % vocab
    res = forkdec.ops.verify_tree_greedy(tokens, parents, indptr, logits)
    assert int(res.num_accepted.max()) >= 2
    node_kv = torch.randn(sum(sizes), 2, hkv, d, generator=g).to(dtype)  # K/V each node gets (its path's context)
    prefix_kv = [torch.randn(p, 2, hkv, d, generator=g).to(dtype) for p in prefix]
    totals = [p + n for p, n in zip(prefix, sizes)]
    tables, slot_of = _paged(totals, page_size, g)
    num_pages = max((max(t) for t in tables if t), default=0) + 1

    def empty():
        return torch.zeros(num_pages, page_size, hkv, d, dtype=dtype), torch.zeros(num_pages, page_size, hkv, d,
                                                                                    dtype=dtype)

    plain_k, plain_v = empty()
    tree_k, tree_v = empty()
    node_slots = torch.zeros(sum(sizes), dtype=torch.int64)
    for b in range(len(sizes)):
        s = int(indptr[b])
        for pos in range(prefix[b]):
            for kc, vc in ((plain_k, plain_v), (tree_k, tree_v)):
                forkdec.ops.append_kv(kc, vc, prefix_kv[b][pos, :1], prefix_kv[b][pos, 1:],
                                      torch.tensor([slot_of(b, pos)]))
        for j in range(int(res.num_accepted[b])):  # plain decoding: one token after another
            node = int(res.accepted_nodes[b, j])
            forkdec.ops.append_kv(plain_k, plain_v, node_kv[s + node, :1], node_kv[s + node, 1:],
                                  torch.tensor([slot_of(b, prefix[b] + j)]))
        for i in range(sizes[b]):
            node_slots[s + i] = slot_of(b, prefix[b] + i)
    forkdec.ops.append_kv(tree_k, tree_v, node_kv[:, 0], node_kv[:, 1], node_slots)  # the verification forward
    dst = None
    if use_dst_slots:
        dst = torch.full_like(res.accepted_nodes, -1, dtype=torch.int64)
        for b in range(len(sizes)):
            for j in range(int(res.num_accepted[b])):
                dst[b, j] = slot_of(b, prefix[b] + j)
    accept_path_kv(tree_k, tree_v, node_slots, indptr, res.accepted_nodes, res.num_accepted, dst_slots=dst)
    for b in range(len(sizes)):
        kept = [slot_of(b, pos) for pos in range(prefix[b] + int(res.num_accepted[b]))]
        for plain, tree in ((plain_k, tree_k), (plain_v, tree_v)):
            flat_p, flat_t = plain.reshape(-1, hkv, d), tree.reshape(-1, hkv, d)
            assert torch.equal(flat_p[kept], flat_t[kept])


def test_accept_path_kv_bad_input():
    k = torch.zeros(2, 4, 1, 8)
    slots = torch.arange(5)
    indptr = torch.tensor([0, 5])
    nodes = torch.tensor([[0, 2, -1]], dtype=torch.int32)
    with pytest.raises(ValueError, match="^num_accepted:"):
        accept_path_kv(k, k.clone(), slots, indptr, nodes, torch.tensor([4]))
    with pytest.raises(ValueError, match="^accepted_nodes:"):
        accept_path_kv(k, k.clone(), slots, indptr, torch.tensor([[0, 7, -1]]), torch.tensor([2]))
    with pytest.raises(ValueError, match="^node_slots:"):
        accept_path_kv(k, k.clone(), slots + 5, indptr, nodes, torch.tensor([2]))
    with pytest.raises(ValueError, match="^tree_indptr:"):
        accept_path_kv(k, k.clone(), slots, torch.tensor([0, 4]), nodes, torch.tensor([2]))
    with pytest.raises(ValueError, match="^dst_slots:"):
        accept_path_kv(k, k.clone(), slots, indptr, nodes, torch.tensor([2]), dst_slots=torch.tensor([[1, 1, 0]]))
