"""PrefixIndex: what the cache holds, by token ids, across calls.

A radix tree whose edges are whole pages of token ids: a node is one full page
(its page_size token ids and the page holding their K/V), its children the pages
that followed it in some prompt. Matching walks a prompt page by page, so a
prompt reuses every full page of the longest cached prefix it extends; the
tokens after the last whole page are prefilled again (a partial page is never
shared: a path writes after it). Page granularity keeps the index small (one
node per page) and the reuse exact: a reused page holds K/V computed from the
same tokens at the same positions.

The index holds one reference to each page it lists (forkdec.cache.allocator);
a page is *in use* while anyone else holds it too. `evict(count)` frees the
least recently used leaves nobody else holds, never a page in use.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from forkdec.cache.allocator import PageAllocator


@dataclass(eq=False)
class _Node:
    tokens: tuple[int, ...]
    page: int
    parent: "_Node | None"
    children: dict[tuple[int, ...], "_Node"] = field(default_factory=dict)
    last_used: int = 0


class PrefixIndex:
    """Full pages of earlier prompts, matched by their token ids."""

    def __init__(self, allocator: PageAllocator, page_size: int) -> None:
        self.alloc, self.page_size = allocator, page_size
        self.root = _Node((), -1, None)
        self.clock = 0
        self.num_pages = 0

    def _chunks(self, ids: list[int]):
        ps = self.page_size
        for i in range(0, len(ids) - ps + 1, ps):
            yield tuple(ids[i:i + ps])

    def match(self, ids: list[int]) -> list[int]:
        """Pages of the longest cached run of whole pages that `ids` starts with (not yet shared:
        the caller calls `alloc.share` on those it keeps)."""
        self.clock += 1
        node, pages = self.root, []
        for chunk in self._chunks(ids):
            node = node.children.get(chunk)
            if node is None:
                break
            node.last_used = self.clock
            pages.append(node.page)
        return pages

    def insert(self, ids: list[int], pages: list[int]) -> None:
        """List the whole pages of a sequence `ids` held in `pages` (pages[i] holds tokens
        i*page_size...); pages already listed are kept, new ones get one reference from the index."""
        self.clock += 1
        node = self.root
        for chunk, page in zip(self._chunks(ids), pages):
            child = node.children.get(chunk)
            if child is None:
                child = node.children[chunk] = _Node(chunk, page, node)
                self.alloc.share([page])
                self.num_pages += 1
            child.last_used = self.clock
            node = child

    def evictable(self) -> int:
        """Pages eviction could free now (listed pages nobody else holds, with nothing in use below)."""
        def walk(n: _Node) -> tuple[int, bool]:
            free, busy = 0, False
            for c in n.children.values():
                f, b = walk(c)
                free, busy = free + f, busy or b
            if n is self.root:
                return free, busy
            mine = self.alloc.refcount(n.page) > 1
            return (free + (0 if (mine or busy) else 1)), busy or mine
        return walk(self.root)[0]

    def evict(self, count: int) -> int:
        """Free up to `count` pages, least recently used leaves first, skipping pages in use;
        returns how many were freed."""
        freed = 0
        while freed < count:
            leaves = [n for n in self._nodes() if not n.children and self.alloc.refcount(n.page) == 1]
            if not leaves:
                break
            leaves.sort(key=lambda n: n.last_used)
            for n in leaves:
                if freed >= count:
                    break
                del n.parent.children[n.tokens]
                self.alloc.free([n.page])
                self.num_pages -= 1
                freed += 1
        return freed

    def clear(self) -> None:
        """Drop every listed page (their other holders keep them)."""
        pages = [n.page for n in self._nodes()]
        self.alloc.free(pages)
        self.root.children.clear()
        self.num_pages = 0

    def _nodes(self) -> list[_Node]:
        out, stack = [], list(self.root.children.values())
        while stack:
            n = stack.pop()
            out.append(n)
            stack += n.children.values()
        return out
