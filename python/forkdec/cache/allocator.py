"""PageAllocator: page ids with reference counts and reservations.

A page is handed out with one reference (`alloc`); a sequence that shares it
(a forked child reading its parent's pages, a prompt matched in the prefix
cache) takes another (`share`); `free` drops one reference per page and returns
a page to the free list only when nobody holds it any more. Reservations let
an engine promise, at admission, every page a sequence could ever need, so a
running batch never runs out of pages mid-decode.
"""
from __future__ import annotations

from typing import Callable

from forkdec.validation import require


class PageAllocator:
    """Free list of page ids, a reference count per page, and a count of pages
    promised to admitted owners."""

    def __init__(self, num_pages: int, on_free: Callable[[list[int]], None] | None = None) -> None:
        require(num_pages >= 0, "num_pages", f"must be >= 0, got {num_pages}")
        self.num_pages = num_pages
        self.on_free = on_free  # a cache that keeps per-page state (quantized kinds) forgets it here
        self._free = list(range(num_pages - 1, -1, -1))  # pop() hands out low ids first
        self._refs = [0] * num_pages
        self._reserved = 0

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        """Pages held by at least one owner (a shared page counts once)."""
        return self.num_pages - len(self._free)

    @property
    def num_reserved(self) -> int:
        """Pages promised to owners but not yet handed out."""
        return self._reserved

    @property
    def num_available(self) -> int:
        """Pages a new reservation can still take."""
        return len(self._free) - self._reserved

    def refcount(self, page: int) -> int:
        return self._refs[page]

    def reserve(self, count: int) -> bool:
        """Promise `count` pages to a new owner if they are available."""
        if count > self.num_available:
            return False
        self._reserved += count
        return True

    def release(self, count: int) -> None:
        """Return `count` promised but unused pages."""
        assert 0 <= count <= self._reserved, (count, self._reserved)
        self._reserved -= count

    def alloc(self) -> int:
        """Hand out one page, with one reference, out of an earlier reservation."""
        assert self._reserved > 0 and self._free, "alloc without a reservation"
        self._reserved -= 1
        page = self._free.pop()
        self._refs[page] = 1
        return page

    def share(self, pages: list[int]) -> None:
        """One more reference to each of `pages` (all in use)."""
        for page in pages:
            assert self._refs[page] > 0, f"page {page} is not in use"
            self._refs[page] += 1

    def free(self, pages: list[int]) -> None:
        """Drop one reference to each of `pages`; those nobody holds any more go back to the free list."""
        gone = []
        for page in pages:
            assert self._refs[page] > 0, f"page {page} was freed twice"
            self._refs[page] -= 1
            if self._refs[page] == 0:
                gone.append(page)
        if not gone:
            return
        if self.on_free is not None:
            self.on_free(gone)
        self._free.extend(reversed(gone))
