"""The pieces of tree verification over a quantized cache (forkdec.xquant.tree_step) and the
cache's bad input for tree steps."""
from __future__ import annotations

import pytest
import torch

from forkdec.cache import StepBatch
from forkdec.ops import CascadeLevel
from forkdec.reference.xquant import rotate_half_rope
from forkdec.tree import build_tree, pack_bits
from forkdec.cache.quantized import QuantizedKVCache
from forkdec.xquant.kinds import parse_kind
from forkdec.xquant.tree_step import mask_columns, rope_keys, slot_positions, unpack_bits
from test_kv_cache import tiny_model


@pytest.mark.parametrize("numel", [0, 1, 7, 8, 9, 61])
def test_unpack_bits_inverts_pack_bits(numel):
    mask = torch.rand(numel, generator=torch.Generator().manual_seed(numel)) < 0.5
    assert torch.equal(unpack_bits(pack_bits(mask), numel), mask)
    assert torch.equal(unpack_bits(mask, numel), mask)


def test_mask_columns_keeps_each_requests_columns_from_first():
    # two trees after 3 and 0 cached tokens; the root is a query and a key (the engine's layout)
    parents, indptr = torch.tensor([-1, 0, -1, -1], dtype=torch.int32), torch.tensor([0, 2, 4], dtype=torch.int32)
    meta = build_tree(parents, indptr, prefix_lens=torch.tensor([3, 0], dtype=torch.int32), include_root=True,
                      packed=True)
    dense = build_tree(parents, indptr, prefix_lens=torch.tensor([3, 0], dtype=torch.int32), include_root=True)
    qo, kv = [3, 3], [6, 3]
    got = mask_columns(meta.custom_mask, qo, kv, [3, 0])
    full = dense.custom_mask.reshape(-1)
    want = torch.cat([full[:18].view(3, 6)[:, 3:].reshape(-1), full[18:].view(3, 3).reshape(-1)])
    assert torch.equal(got, want)
    assert torch.equal(got[:9].view(3, 3), torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool))


def test_mask_columns_refuses_a_mask_that_hides_older_tokens():
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[1, 0] = False  # the second query may not see the first cached token
    with pytest.raises(ValueError, match="^levels: "):
        mask_columns(mask.reshape(-1), [2], [4], [2])


def test_slot_positions_number_each_requests_rows_from_its_first():
    positions = torch.tensor([10, 11, 12, 11, 5, 6, 6])  # a tree: root 10, nodes at depths 1, 2, 1
    indptr = torch.tensor([0, 4, 7], dtype=torch.int32)
    assert slot_positions(positions, indptr).tolist() == [10, 11, 12, 13, 5, 6, 7]


def test_rope_keys_rotate_at_the_given_positions():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 8, generator=g), torch.randn(8, 2 * 4, generator=g)
    ang = torch.tensor([5.0, 0.0, 9.0])[:, None] * torch.tensor([1.0, 0.1])[None]
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    want = rotate_half_rope((x @ w).view(3, 2, 4), cos, sin)
    torch.testing.assert_close(rope_keys(x, w, None, cos, sin, 4), want)
    torch.testing.assert_close(rope_keys(x, w, None, cos[1:2].expand(3, 4), sin[1:2].expand(3, 4), 4),
                               (x @ w).view(3, 2, 4))  # position 0: no rotation


def _cache(kind: str = "xquant-4-r0") -> QuantizedKVCache:
    return QuantizedKVCache(parse_kind(kind), tiny_model(vocab_size=272), num_pages=4)


def test_keep_accepted_without_a_tree_step_names_keep_accepted():
    cache = _cache()
    with pytest.raises(ValueError, match="^keep_accepted: "):
        cache.keep_accepted(torch.zeros(0, dtype=torch.int64), torch.zeros(1, dtype=torch.int32),
                            torch.zeros(0, 1, dtype=torch.int32), torch.zeros(0, dtype=torch.int32))


def _level(mask: torch.Tensor | None) -> CascadeLevel:
    i32 = torch.int32
    return CascadeLevel(torch.tensor([0, 2], dtype=i32), torch.tensor([0, 1], dtype=i32), torch.tensor([0], dtype=i32),
                        torch.tensor([2], dtype=i32), custom_mask=mask)


def test_a_tree_step_with_two_masked_levels_or_stray_rows_names_levels():
    cache = _cache()
    mask = torch.ones(4, dtype=torch.bool)
    batch = StepBatch(torch.tensor([1, 2]), torch.tensor([0, 1]), torch.tensor([0, 1]), [_level(mask), _level(mask)])
    with pytest.raises(ValueError, match="^levels: "):
        cache.make_attend(batch)
    # the masked level's queries must be all of the step's rows
    batch = StepBatch(torch.tensor([1, 2, 3]), torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2]), [_level(mask)])
    with pytest.raises(ValueError, match="^levels: "):
        cache.make_attend(batch)
