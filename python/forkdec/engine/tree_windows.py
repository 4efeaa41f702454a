"""Full-precision windows of a tree of paths over a quantized cache (XQuant, KIVI).

Decoding one path alone, a quantized cache keeps the newest tokens of the
path in window pages and quantizes its oldest full page once R + page_size
tokens are in the window (forkdec.cache.quantized). After the path has L
tokens in the cache, its first

    q(L) = max(floor, (L - R) // page_size, 0)

pages are quantized and the others are window pages (`floor`: leading pages a
prefix-cache hit found already quantized, 0 otherwise). Over a tree, one page
may be read by paths of different lengths. The rule that keeps a fork
transparent: every path reads page i of its chain quantized iff i < q(L) for
its own L, so a page has two states while its readers disagree:

- its quantized copy is written as soon as one reader passes it (i < q(L));
- its window slot is freed once every live reader has passed it (and a page
  only the prefix cache holds is quantized and leaves the window at once).

A shared segment's cascade group is split into runs of rows that agree on its
pages (forkdec.engine.tree_plan.tree_levels_split); siblings decoding in
lockstep (beam and tree search, DeepConf) always agree, so their groups stay
whole and each shared page is quantized and leaves the window in the same step.
A forked child therefore reads every page exactly as the unforked path does
(the same tokens up to float noise: attention states merge in another order,
and the 16-bit window rounds the next layer's rows on either side of it). A
prefix-cache hit reads the cached pages in the state it finds them: a page
quantized earlier is read quantized where a cold prefill would have read it in
full precision (tests/test_session_quantized.py bounds the difference).
"""
from __future__ import annotations

from forkdec.engine.tree_memory import Segment


def quantized_pages(tokens: int, residual: int, page_size: int, floor: int = 0) -> int:
    """q(L): leading pages of a chain of `tokens` tokens its own decode holds quantized."""
    return max(floor, (tokens - residual) // page_size, 0)


def chain_tail(leaf: Segment, first: int, page_size: int) -> list[tuple[int, int]]:
    """(chain index, page) of the leaf's chain from chain index `first` on, in order."""
    out: list[tuple[int, int]] = []
    seg: Segment | None = leaf
    while seg is not None:
        base = seg.start // page_size
        if base + len(seg.pages) <= first:
            break
        out[:0] = [(base + i, g) for i, g in enumerate(seg.pages) if base + i >= first]
        seg = seg.parent
    return out


class TreeWindows:
    """Keeps a quantized cache's pages in the states the rule above gives, for a Session.

    Each live path carries `quant_floor` (leading pages found quantized at its start) and
    `quant_done` (its q(L) at the last settle)."""

    def __init__(self, cache, page_size: int) -> None:
        self.cache, self.page_size = cache, page_size
        self.residual = cache.kind.residual

    def read_count(self, path) -> int:
        """Leading pages of the path's chain it reads quantized in this step (its q at the last
        flush: the token just written is not counted)."""
        return quantized_pages(path.leaf.end - 1, self.residual, self.page_size, path.quant_floor)

    def settle(self, live) -> None:
        """After a step (or a stop): write the quantized copies that some path's q(L) has reached,
        and free every window slot no live path still reads in full precision."""
        ps, need = self.page_size, set()
        for p in live:
            q = quantized_pages(p.leaf.end, self.residual, ps, p.quant_floor)
            tail = chain_tail(p.leaf, min(p.quant_done, q), ps)
            self.cache.quantize([g for i, g in tail if i < q])
            need.update(g for i, g in tail if i >= q)
            p.quant_done = q
        self.cache.drop_windows([g for g in self.cache.windowed_pages() if g not in need])
