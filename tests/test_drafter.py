"""The n-gram drafter (batch-wide ranking of draft nodes) and the speculation controller."""
from __future__ import annotations

import random

import pytest

from forkdec.engine import SamplingParams
from forkdec.engine.drafter import AcceptanceModel, NgramTable, rank_nodes, split_trees


def test_table_predicts_from_the_longest_context_seen():
    t = NgramTable(order=3)
    t.extend([1, 2, 3, 1, 2, 4, 9, 2, 5])
    # context (1, 2) was followed by 3 and by 4; the order-1 context (2,) also by 5
    assert t.continuations([7, 1, 2]) == (2, [(3, 1 / 3), (4, 1 / 3)])
    assert t.continuations([7, 9, 2]) == (2, [(5, 1 / 2)])          # (9, 2) seen once
    assert t.continuations([8, 8, 2]) == (1, [(3, 1 / 4), (4, 1 / 4), (5, 1 / 4)])  # falls back to (2,)
    assert t.continuations([8]) == (0, [])


def test_extend_counts_only_new_tokens_with_their_contexts():
    whole, parts = NgramTable(order=2), NgramTable(order=2)
    seq = [random.Random(0).randrange(5) for _ in range(60)]
    whole.extend(seq)
    parts.extend(seq[:20])
    parts.extend(seq[18:45], start=2)   # two tokens of context, then the new ones
    parts.extend(seq[43:], start=2)
    assert parts.counts == whole.counts and parts.totals == whole.totals


def _table(seq, order=3):
    t = NgramTable(order)
    t.extend(seq)
    return t


def test_ranking_is_best_first_and_parents_come_first():
    a = _table([5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 9])
    b = _table([1, 2, 3, 1, 2, 3, 1, 2, 4, 1, 2, 3])
    ranked = rank_nodes([a, b], [[8, 5], [3, 1]], [50, 50], [6, 6], budget=12)
    scores = [r.score for r in ranked]
    assert scores == sorted(scores, reverse=True)
    for i, r in enumerate(ranked):
        assert r.parent < i
        if r.parent >= 0:
            assert ranked[r.parent].path == r.path and ranked[r.parent].depth == r.depth - 1
    trees = split_trees(ranked, len(ranked), 2)
    assert sum(len(t) for t in trees) == len(ranked)
    # path 0: after (8, 5) comes 6 (seen twice, 2/3), after (5, 6): 7 twice, 9 once
    assert trees[0].tokens[0] == 6 and trees[0].parents[0] == -1
    assert {trees[0].tokens[i] for i, p in enumerate(trees[0].parents) if p == 0} == {7, 9}


def test_budget_goes_to_the_likeliest_nodes_across_paths():
    sure = _table([1, 2] * 20)          # path 0 repeats itself: long confident chain
    unsure = _table(list(range(40)))    # path 1: every context seen once
    ranked = rank_nodes([sure, unsure], [[1, 2], [38, 39]], [100, 100], [8, 8], budget=8)
    assert [r.path for r in ranked].count(0) > [r.path for r in ranked].count(1)
    assert len(ranked) == 8


def test_room_and_depth_limits_hold_per_path():
    t = _table([3, 4] * 30)
    ranked = rank_nodes([t, t, t], [[3], [4], [3]], [2, 0, 10], [5, 5, 3], budget=100)
    trees = split_trees(ranked, len(ranked), 3)
    assert len(trees[0]) == 2 and len(trees[1]) == 0 and len(trees[2]) == 3
    assert all(r.depth <= 3 for r in ranked if r.path == 2)


def test_a_prefix_of_the_ranking_is_a_set_of_trees():
    rng = random.Random(1)
    tables = [_table([rng.randrange(4) for _ in range(80)], order=2) for _ in range(3)]
    ranked = rank_nodes(tables, [[0], [1], [2]], [30] * 3, [6] * 3, budget=40)
    for k in range(len(ranked) + 1):
        for tree in split_trees(ranked, k, 3):
            assert all(-1 <= p < i for i, p in enumerate(tree.parents))
            # siblings never repeat a token: the verifier's walk relies on it
            kids = {}
            for p, tok in zip(tree.parents, tree.tokens):
                assert tok not in kids.setdefault(p, set())
                kids[p].add(tok)


def test_acceptance_model_learns_per_kind_rates_from_tried_nodes():
    m = AcceptanceModel(prior=2.0)
    assert m.estimate((3, True), 0.5) == 0.5                    # nothing measured: the frequency
    # a chain 0 <- 1 <- 2 and a sibling 3 of node 0: 0 and 1 accepted, so 0, 1, 2 and 3 were tried
    for _ in range(10):
        m.update([(3, True), (3, True), (3, True), (1, False)], [-1, 0, 1, -1], [0, 1])
    assert m.tried[(3, True)] == 30 and m.accepted[(3, True)] == 20
    assert m.tried[(1, False)] == 10 and m.accepted.get((1, False), 0) == 0
    assert m.estimate((3, True), 0.5) == pytest.approx((20 + 1) / 32)
    assert m.estimate((1, False), 0.5) == pytest.approx(1 / 12)
    m.update([(2, True), (2, True)], [-1, 0], [])             # root child rejected: its child never tried
    assert m.tried[(2, True)] == 1


@pytest.mark.parametrize("kw, name", [(dict(speculate="eagle"), "speculate"), (dict(draft_budget=0), "draft_budget"),
                                      (dict(draft_depth=0), "draft_depth"), (dict(draft_budget=2.5), "draft_budget"),
                                      (dict(draft_adaptive=1), "draft_adaptive")])
def test_bad_speculation_options_name_the_option(kw, name):
    with pytest.raises(ValueError, match=f"^{name}:"):
        SamplingParams(**kw)


def test_a_tree_deeper_than_the_context_names_draft_depth():
    p = SamplingParams(speculate="ngram", draft_depth=8, max_new_tokens=4)
    p.check_fits(100, 120)
    with pytest.raises(ValueError, match="^draft_depth:"):
        p.check_fits(115, 120)
    SamplingParams(draft_depth=8, max_new_tokens=5).check_fits(115, 120)  # off: no tree, no limit
