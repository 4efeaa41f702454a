"""Model-free drafting: an n-gram table per prompt, shared by all its paths.

Reasoning paths of one prompt repeat the prompt, each other and themselves
(numbers, phrases, whole steps). `NgramTable` counts, for every context of 1 to
`order` tokens seen in the prompt or in any path of it, which token followed;
each path adds its tokens as they are accepted, so siblings feed each other.

`rank_nodes` proposes one token tree per path and ranks the nodes of all paths
together: a node's score estimates the probability that verification accepts it
(the product along its branch of each node's acceptance probability given its
parent's, learned by `AcceptanceModel` from the n-gram frequencies), nodes are
taken best first from one heap across the batch, as TETRIS does, so a batch-wide
budget goes to the likeliest nodes wherever they are rather than to a fixed tree
shape per path. Children score no higher than their parent, so any prefix of the
ranking is a set of valid trees (a parent always precedes its children): the
caller may cut it wherever the verification cost stops paying.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Sequence

DRAFTERS = ("off", "ngram")


class NgramTable:
    """Next-token counts after every context of 1..order tokens.

    `extend(tokens, start)` counts the tokens tokens[start:] (each with the
    contexts that end just before it); `continuations(history)` returns the
    continuations of the longest suffix of `history` seen before.
    """

    def __init__(self, order: int = 4) -> None:
        self.order = order
        self.counts: dict[tuple[int, ...], dict[int, int]] = {}
        self.totals: dict[tuple[int, ...], int] = {}

    def extend(self, tokens: Sequence[int], start: int = 0) -> None:
        for i in range(max(start, 1), len(tokens)):
            nxt = tokens[i]
            for k in range(1, min(self.order, i) + 1):
                ctx = tuple(tokens[i - k:i])
                row = self.counts.setdefault(ctx, {})
                row[nxt] = row.get(nxt, 0) + 1
                self.totals[ctx] = self.totals.get(ctx, 0) + 1

    def continuations(self, history: Sequence[int], limit: int = 4) -> tuple[int, list[tuple[int, float]]]:
        """(k, pairs): up to `limit` (token, frequency) pairs after the longest known suffix of
        `history`, likeliest first, and that suffix's length k (0: nothing known). The frequency
        is count / (total + 1): a context seen once predicts its continuation with 1/2, not
        certainty (the +1 is the mass of "something else")."""
        for k in range(min(self.order, len(history)), 0, -1):
            ctx = tuple(history[-k:])
            row = self.counts.get(ctx)
            if row:
                total = self.totals[ctx] + 1
                best = heapq.nlargest(limit, row.items(), key=lambda kv: (kv[1], -kv[0]))
                return k, [(tok, c / total) for tok, c in best]
        return 0, []


class AcceptanceModel:
    """Learns how often verification accepts a draft node that it tries (its parent accepted).

    Nodes fall into kinds: the length of the context that proposed them (1..order) and
    whether they are that context's most frequent continuation. A node's acceptance
    probability given its parent's is its kind's measured rate, with the n-gram frequency
    as a prior worth `prior` tries: repeated phrases are accepted far more often than
    their raw frequencies say (a context seen once says 1/2), and greedy and sampled
    decoding accept at very different rates; both are learned within the run.
    """

    def __init__(self, prior: float = 2.0) -> None:
        self.prior = prior
        self.tried: dict[tuple[int, bool], int] = {}
        self.accepted: dict[tuple[int, bool], int] = {}

    def estimate(self, kind: tuple[int, bool], frequency: float) -> float:
        return (self.accepted.get(kind, 0) + self.prior * frequency) / (self.tried.get(kind, 0) + self.prior)

    def update(self, kinds: Sequence[tuple[int, bool]], parents: Sequence[int], accepted: Sequence[int]) -> None:
        """One verified tree: its nodes' kinds and parents, and the accepted node indices."""
        on_path = set(accepted)
        for i, (kind, parent) in enumerate(zip(kinds, parents)):
            if parent == -1 or parent in on_path:  # verification tried this node
                self.tried[kind] = self.tried.get(kind, 0) + 1
                if i in on_path:
                    self.accepted[kind] = self.accepted.get(kind, 0) + 1


@dataclass
class DraftTree:
    """One path's draft: node tokens and local parents (-1 = the root, the path's last token),
    parents before children; scores are the estimated acceptance probabilities."""
    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    kinds: list[tuple[int, bool]] = field(default_factory=list)  # AcceptanceModel kinds

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass
class RankedNode:
    """A candidate node in the batch-wide ranking: which path, its parent's rank (-1 = root)."""
    score: float
    path: int
    parent: int
    token: int
    depth: int
    kind: tuple[int, bool] = (0, False)


def rank_nodes(tables: Sequence[NgramTable], histories: Sequence[Sequence[int]], max_nodes: Sequence[int],
               max_depth: Sequence[int], budget: int, branch: int = 4,
               acceptance: AcceptanceModel | None = None) -> list[RankedNode]:
    """The `budget` likeliest draft nodes over all paths, best first (parents before children).

    tables[i] / histories[i]: path i's prompt table and its tokens so far (prompt included).
    max_nodes[i], max_depth[i]: what path i's tree may hold (cache room, tokens left).
    branch: children considered per node (the most frequent continuations).
    acceptance: turns n-gram frequencies into acceptance probabilities (default:
        the frequencies themselves).
    """
    ranked: list[RankedNode] = []
    taken = [0] * len(histories)
    heap: list[tuple] = []  # (-score, tiebreak, path, parent rank, token, depth, kind)
    tick = 0

    def push_children(path: int, parent: int, context: Sequence[int], score: float, depth: int) -> None:
        nonlocal tick
        if depth >= max_depth[path]:
            return
        order, nexts = tables[path].continuations(context, branch)
        for rank, (tok, f) in enumerate(nexts):
            kind = (order, rank == 0)
            p = acceptance.estimate(kind, f) if acceptance is not None else f
            heapq.heappush(heap, (-score * p, tick, path, parent, tok, depth + 1, kind))
            tick += 1

    tails: list[list[int]] = []  # the table's order worth of context per ranked node
    for i, h in enumerate(histories):
        if max_nodes[i] > 0:
            push_children(i, -1, h, 1.0, 0)
    while heap and len(ranked) < budget:
        neg, _, path, parent, tok, depth, kind = heapq.heappop(heap)
        if taken[path] >= max_nodes[path]:
            continue
        taken[path] += 1
        ranked.append(RankedNode(-neg, path, parent, tok, depth, kind))
        order = tables[path].order
        base = tails[parent] if parent >= 0 else list(histories[path][-order:])
        tail = (base + [tok])[-order:]
        tails.append(tail)
        push_children(path, len(ranked) - 1, tail, -neg, depth)
    return ranked


def split_trees(ranked: Sequence[RankedNode], count: int, num_paths: int) -> list[DraftTree]:
    """The first `count` ranked nodes as one DraftTree per path (local indices in rank order)."""
    trees = [DraftTree() for _ in range(num_paths)]
    local: list[int] = []
    for node in ranked[:count]:
        tree = trees[node.path]
        local.append(len(tree))
        tree.tokens.append(node.token)
        tree.parents.append(local[node.parent] if node.parent >= 0 else -1)
        tree.scores.append(node.score)
        tree.kinds.append(node.kind)
    return trees
