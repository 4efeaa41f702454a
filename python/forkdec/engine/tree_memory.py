"""The tree of paths in pages: segments that branch, stored once.

A `Segment` is a run of consecutive tokens of one or more paths, held in its own
pages; a path's K/V is the chain of segments from its root (a prompt) to its
leaf. Every segment but a leaf is page-aligned (its tokens fill its pages), so a
chain's page table is the concatenation of its segments' pages and only a
leaf's last page can be partial.

Forking a leaf into k children copies at most its partial last page: child 0
takes the page itself, children 1..k-1 get a copy of its rows (copy on write,
before anyone writes), and the parent keeps only its full pages. Sharing the
partial page by length instead would give every child a fresh page for its
next token, so a fork at every token (beam search) would cost a page per child
per token; copying costs at most page_size - 1 rows per child and keeps every
leaf at one partial page (docs/engine.md has the measurement). A segment left
with no pages is dropped and its children hang from its parent; a segment left
with one child absorbs it, so the tree's depth stays what its branching needs.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from forkdec.cache import PageAllocator


@dataclass(eq=False)
class Segment:
    """Tokens start..start+tokens-1 of every path below it, in `pages` (whole pages unless a leaf)."""
    parent: Segment | None
    start: int
    pages: list[int] = field(default_factory=list)
    tokens: int = 0
    children: list[Segment] = field(default_factory=list)
    owner: object | None = None      # the live path writing this segment (leaves only)
    pinned: int = 0                  # holds from outside the tree (the prefix cache)

    @property
    def end(self) -> int:
        return self.start + self.tokens

    def depth(self) -> int:
        d, s = 0, self.parent
        while s is not None:
            d, s = d + 1, s.parent
        return d


class TreeMemory:
    """Segments over an allocator's pages; `copy_rows(src, dst, n)` copies a partial page (every layer)."""

    def __init__(self, allocator: PageAllocator, page_size: int, copy_rows) -> None:
        self.alloc, self.page_size, self.copy_rows = allocator, page_size, copy_rows
        self.roots: list[Segment] = []
        self.pages_copied = 0   # partial pages copied on forks
        self.rows_copied = 0

    def new_root(self, pages: list[int], tokens: int) -> Segment:
        root = Segment(None, 0, pages, tokens)
        self.roots.append(root)
        return root

    def slot_for_next(self, leaf: Segment, take_page) -> int:
        """The slot of the leaf's next token (a page from `take_page()` when its last page is full)."""
        ps = self.page_size
        if leaf.tokens % ps == 0:
            leaf.pages.append(take_page())
        slot = leaf.pages[-1] * ps + leaf.tokens % ps
        leaf.tokens += 1
        return slot

    def fork(self, leaf: Segment, k: int, take_page) -> list[Segment]:
        """Split `leaf` into k child leaves after its last token; children 1..k-1 get their
        partial-page copies from `take_page()`. Returns the children (child 0 first)."""
        if k == 1:  # one child goes on writing the same segment: nothing to split
            leaf.owner = None
            return [leaf]
        ps = self.page_size
        rem = leaf.tokens % ps
        children = [Segment(leaf, leaf.tokens - rem + leaf.start) for _ in range(k)]
        if rem:
            partial = leaf.pages.pop()
            leaf.tokens -= rem
            children[0].pages, children[0].tokens = [partial], rem
            for c in children[1:]:
                page = take_page()
                self.copy_rows(partial, page, rem)
                self.pages_copied += 1
                self.rows_copied += rem
                c.pages, c.tokens = [page], rem
        leaf.owner = None
        if leaf.tokens == 0 and leaf.pinned == 0:  # nothing of its own left: its children take its place
            self._replace(leaf, children)
        else:
            leaf.children = children
        return children

    def release(self, leaf: Segment) -> None:
        """A path ends: free what nobody else holds, walking up while segments are unused."""
        leaf.owner = None
        seg: Segment | None = leaf
        while seg is not None and not seg.children and seg.owner is None and seg.pinned == 0:
            parent = seg.parent
            self.alloc.free(seg.pages)
            seg.pages, seg.tokens = [], 0
            self._replace(seg, [])
            seg = parent
        if seg is not None:
            self._absorb(seg)

    def _replace(self, seg: Segment, children: list[Segment]) -> None:
        siblings = self.roots if seg.parent is None else seg.parent.children
        i = next(j for j, s in enumerate(siblings) if s is seg)
        for c in children:
            c.parent = seg.parent
        siblings[i:i + 1] = children

    def _absorb(self, seg: Segment) -> None:
        """A segment with one child left and no owner or pin takes the child's tokens in."""
        if len(seg.children) != 1 or seg.owner is not None or seg.pinned:
            return
        child = seg.children[0]
        if child.pinned:
            return
        seg.pages += child.pages
        seg.tokens += child.tokens
        seg.children = child.children
        for c in seg.children:
            c.parent = seg
        seg.owner = child.owner
        if seg.owner is not None:
            seg.owner.leaf = seg

    def segments(self) -> list[Segment]:
        out, stack = [], list(reversed(self.roots))
        while stack:
            s = stack.pop()
            out.append(s)
            stack += reversed(s.children)
        return out

    def pages_held(self) -> int:
        return sum(len(s.pages) for s in self.segments())
