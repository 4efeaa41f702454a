"""Session: the step-level API over a tree of live paths.

Start paths of prompts, run steps (every running path decodes one token, all of
them in one forward over one cascade of the tree), read each path's new tokens
and scores, and between steps fork a path into k children (each with its own
sampling parameters and seed), stop, pause or resume paths. A path whose text
reaches one of its `boundary` strings (a step delimiter, e.g. a blank line)
pauses there and decodes again once resumed or forked. Search strategies
(forkdec.search), `Engine.stream` and per-step hooks are written on it.

A path's last sampled token is *pending*: drawn, not yet in the cache; the next
step feeds it. Forking copies the pending token into every child (or puts the
caller's `tokens` in its place, as beam search does), so children diverge from
the token after it. Pages: see forkdec.engine.tree_memory. Every page a path
could still need is reserved when it starts or is forked, so a step never runs
out of pages; a start or fork the budget cannot back is refused (ValueError).

Quantized cache kinds (XQuant, KIVI): every live path also holds the budget of
one full-precision window (CacheKind.window_pages, reserved with its pages);
which pages each path reads quantized and when shared pages are quantized and
leave the window is forkdec.engine.tree_windows (a fork is transparent).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor

from forkdec.cache import StepBatch, make_attend, pick_backend
from forkdec.cache.prefix_index import PrefixIndex
from forkdec.engine.params import SamplingParams
from forkdec.engine.stops import StopChecker
from forkdec.engine.token_sampler import draw
from forkdec.engine.tree_memory import Segment, TreeMemory
from forkdec.engine.tree_plan import tree_levels_split
from forkdec.engine.tree_windows import TreeWindows
from forkdec.ops import CascadeLevel
from forkdec.validation import require

# Segments shorter than this many pages are folded into their children's groups: bench/tree.py
# measured a 1-page segment folded 2% faster than its own level, 2-4 pages even, 8 pages with
# 16 children 8% slower folded (docs/engine.md).
FOLD_PAGES = 2


@dataclass
class StepEvent:
    """What one step (or a start/fork) gave a path: its new token and that token's log p."""
    path: int
    token: int
    logprob: float
    finish_reason: str | None = None   # "stop", "length" once the path ended
    paused: bool = False               # reached one of its boundary strings


@dataclass(eq=False)
class TreePath:
    """A live or finished path. token_ids: generated so far (the last one pending until fed)."""
    id: int
    prompt_ids: list[int]
    leaf: Segment | None
    params: SamplingParams
    generator: torch.Generator
    stop: StopChecker
    boundary: tuple[str, ...] = ()
    token_ids: list[int] = field(default_factory=list)
    token_logprobs: list[float] = field(default_factory=list)
    token_confidences: list[float] = field(default_factory=list)              # params.confidence_k
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)  # params.top_logprobs
    logits: Tensor | None = None       # [V] fp32, the row the pending token was drawn from
    reserved: int = 0
    state: str = "running"             # "running", "paused", "finished"
    finish_reason: str | None = None
    segment_start: int = 0             # index in token_ids where the current step (boundary) began
    parent: int | None = None
    window: int = 0                    # budget pages held for its full-precision window (quantized kinds)
    quant_floor: int = 0               # leading chain pages found quantized at its start (prefix cache)
    quant_done: int = 0                # its q(L) at the last settle (forkdec.engine.tree_windows)

    @property
    def cumulative_logprob(self) -> float:
        return sum(self.token_logprobs)

    @property
    def live(self) -> bool:
        return self.state != "finished"


class Session:
    """Paths over one engine's model, in a cache of their own (any cache kind).

    engine: a forkdec.Engine (its model, tokenizer, cache kind and KV budget).
    fold_pages: segments with fewer pages are folded into their children's cascade groups.
    prefix_cache: keep the whole pages of started prompts (forkdec.cache.prefix_index), so a
        later `start` of a prompt extending one prefills only its new tokens; unused ones are
        evicted least recently used when a start or fork needs pages.
    """

    def __init__(self, engine, *, fold_pages: int = FOLD_PAGES, prefix_cache: bool = True) -> None:
        require(isinstance(fold_pages, int) and fold_pages >= 0, "fold_pages", f"must be an int >= 0, got {fold_pages!r}")
        self.engine = engine
        self.page_size = engine.page_size
        self.cache = engine.kind.make(engine.model, engine.max_pages, max_window_slots=engine.max_window_slots)
        # quantized kinds: budget pages per live path's window, and the rule for its pages' states
        self.window_pages = engine.window_pages
        self.windows = TreeWindows(self.cache, self.page_size) if engine.kind.quantized else None
        self.alloc = self.cache.allocator
        self.memory = TreeMemory(self.alloc, self.page_size, self.cache.copy_prefix)
        self.prefix = PrefixIndex(self.alloc, self.page_size) if prefix_cache else None
        self.fold_pages = fold_pages
        self.paths: dict[int, TreePath] = {}
        self._next_id = 0  # path ids are never reused, even after forget()
        self.backend = pick_backend(self.cache.device)
        self.eos = engine.eos_ids()
        self.steps = 0
        self.kv_tokens_read = 0           # K/V tokens the last step's cascade read
        self.plan_seconds = 0.0           # metadata build time, all steps
        self.prefill_tokens = 0
        self.reused_tokens = 0            # prompt tokens whose pages came from the prefix cache

    # ---- queries --------------------------------------------------------------------------------
    def path(self, path_id: int) -> TreePath:
        require(path_id in self.paths, "path", f"unknown path {path_id!r}")
        return self.paths[path_id]

    def running(self) -> list[int]:
        return [p.id for p in self.paths.values() if p.state == "running"]

    def paused(self) -> list[int]:
        return [p.id for p in self.paths.values() if p.state == "paused"]

    def text(self, path_id: int, since_boundary: bool = False) -> str:
        p = self.path(path_id)
        return self.engine.tokenizer.decode(p.token_ids[p.segment_start:] if since_boundary else p.token_ids)

    def logprobs(self, path_id: int) -> Tensor:
        """log-softmax [V] of the distribution the path's pending token was drawn from."""
        p = self.path(path_id)
        require(p.live and p.logits is not None, "path", f"path {path_id} has no pending distribution")
        return torch.log_softmax(p.logits, dim=-1)

    @property
    def pages_in_use(self) -> int:
        return self.alloc.num_used

    @property
    def pages_available(self) -> int:
        """Pages a new start or fork can still reserve, cached prompt pages nobody uses included
        (they are evicted to make room)."""
        return self.alloc.num_available + (self.prefix.evictable() if self.prefix is not None else 0)

    def pages_for(self, prompt_len: int, n: int, params: SamplingParams) -> int:
        """Pages `start` reserves for n paths of a prompt of `prompt_len` tokens."""
        return self._start_pages(prompt_len, n, params)[3] + n * self.window_pages

    def forget(self, path_id: int) -> None:
        """Drop a finished path's record (a long-lived session, e.g. a server, forgets what it has read)."""
        p = self.path(path_id)
        require(not p.live, "path", f"path {path_id} is live; stop it first")
        del self.paths[path_id]

    # ---- starting and forking -------------------------------------------------------------------
    def _start_pages(self, prompt_len: int, n: int, params: SamplingParams) -> tuple[int, int, int, int]:
        """(prompt pages, the first path's pages, each other path's, all of them) for `start`."""
        ps = self.page_size
        prompt_pages = -(-prompt_len // ps)
        first = self._pages_needed(prompt_len % ps, params, 1)
        others = first + (1 if prompt_len % ps else 0)
        return prompt_pages, first, others, prompt_pages + first + (n - 1) * others

    def _pages_needed(self, rem: int, params: SamplingParams, generated: int) -> int:
        """New pages a leaf with `rem` rows on its partial page needs for every token it may
        still write (the last sampled token is never written)."""
        writes = max(0, params.max_new_tokens - generated)
        return -(-(rem + writes) // self.page_size) - (1 if rem else 0)

    def _generator(self, seed: int | None) -> torch.Generator:
        g = torch.Generator()
        if seed is None:
            g.seed()
        else:
            g.manual_seed(int(seed))
        return g

    def start(self, prompt: str | Sequence[int], n: int = 1, params: SamplingParams | None = None, *,
              chat: bool = True, seeds: Sequence[int] | None = None,
              boundary: Sequence[str] = ()) -> list[int]:
        """Prefill `prompt` (text, or token ids as they are) once and start n paths of it;
        returns their ids. Each path has its first token drawn (pending). seeds: one per
        path (default: params.seed + i, or fresh randomness without a seed)."""
        params = params if params is not None else SamplingParams()
        require(isinstance(params, SamplingParams), "params", f"expected SamplingParams, got {type(params).__name__}")
        require(isinstance(n, int) and not isinstance(n, bool) and n >= 1, "n", f"must be an int >= 1, got {n!r}")
        require(params.speculate == "off", "params", "speculation is not available in a Session")
        if isinstance(prompt, str):
            require(prompt.strip() != "", "prompt", "is empty")
            ids = self.engine.encode(prompt, chat=chat)
        else:
            ids = [int(t) for t in prompt]
            require(len(ids) > 0, "prompt", "has no tokens")
        seeds = self._seeds(seeds, n, params.seed)
        cfg = self.engine.model.config
        require(len(ids) + params.max_new_tokens <= cfg.max_position_embeddings, "params",
                f"prompt ({len(ids)} tokens) + max_new_tokens {params.max_new_tokens} exceeds the model's "
                f"context {cfg.max_position_embeddings}")
        ps = self.page_size
        prompt_pages, first, others, _ = self._start_pages(len(ids), n, params)
        rem = len(ids) % ps
        cached = self.prefix.match(ids[:-1]) if self.prefix is not None else []
        self.alloc.share(cached)  # held before any eviction below
        need = prompt_pages - len(cached) + first + (n - 1) * others + n * self.window_pages
        if not self._reserve(need):
            self.alloc.free(cached)
            require(False, "n", f"{n} paths of a {len(ids)}-token prompt need {need} pages of KV"
                                f"{' (full-precision windows included)' if self.window_pages else ''}, "
                                f"{self.alloc.num_available} are free in the budget")
        floor = self._quant_floor(cached)
        root = self.memory.new_root(cached + [self.alloc.alloc() for _ in range(prompt_pages - len(cached))], len(ids))
        logits = self._prefill(ids, root, len(cached) * ps, floor)
        if self.prefix is not None:
            self.prefix.insert(ids, root.pages)
        leaves = [root] if n == 1 else self.memory.fork(root, n, self.alloc.alloc)
        new = []
        for i, leaf in enumerate(leaves):
            p = self._new_path(ids, leaf, params, self._generator(seeds[i]), boundary)
            p.reserved = first if i == 0 else others - (1 if rem else 0)
            p.window, p.quant_floor, p.quant_done = self.window_pages, floor, floor
            new.append(p)
        self._sample(new, logits[None].expand(n, -1), rows_are_paths=True)
        self._settle()
        return [p.id for p in new]

    def fork(self, path_id: int, k: int, params: SamplingParams | Sequence[SamplingParams] | None = None, *,
             seeds: Sequence[int] | None = None, tokens: Sequence[int] | None = None) -> list[int]:
        """Fork a live path into k children (the path itself ends: finish_reason "forked").

        params: one for all children or one each (default: the parent's); seeds: one per
        child (default: drawn from the parent's generator). tokens: the children's pending
        tokens in place of the parent's (beam search: the k best next tokens), each with its
        log p under the parent's pending distribution. Returns the children's ids.
        """
        require(isinstance(path_id, int) and path_id in self.paths, "path", f"unknown path {path_id!r}")
        parent = self.paths[path_id]
        require(parent.live, "path", f"path {path_id} has finished ({parent.finish_reason}); only live paths fork")
        require(isinstance(k, int) and not isinstance(k, bool) and k >= 1, "k", f"must be an int >= 1, got {k!r}")
        plist = list(params) if isinstance(params, (list, tuple)) else [params or parent.params] * k
        require(len(plist) == k and all(isinstance(q, SamplingParams) for q in plist), "params",
                f"give one SamplingParams or {k} of them")
        if tokens is not None:
            tokens = [int(t) for t in tokens]
            require(len(tokens) == k, "tokens", f"has {len(tokens)} entries for k = {k}")
            vocab = parent.logits.shape[0] if parent.logits is not None else 0
            require(all(0 <= t < vocab for t in tokens), "tokens", f"must be token ids in [0, {vocab})")
        if seeds is None:
            seeds = [int(torch.randint(0, 2 ** 62, (1,), generator=parent.generator)) for _ in range(k)]
        seeds = self._seeds(seeds, k, None)
        rem = parent.leaf.tokens % self.page_size
        generated = len(parent.token_ids)
        needs = [self._pages_needed(rem, q, generated) + (1 if rem else 0) for q in plist]
        own = self._pages_needed(rem, plist[0], generated)
        extra = sum(needs[1:]) + max(0, own - parent.reserved) + (k - 1) * self.window_pages
        require(self._reserve(extra), "k",
                f"forking path {path_id} into {k} needs {extra} more pages of KV"
                f"{' (full-precision windows included)' if self.window_pages else ''}, "
                f"{self.alloc.num_available} are free in the budget")
        self.alloc.release(max(0, parent.reserved - own))
        parent.reserved = min(parent.reserved, own)
        with torch.inference_mode():  # a partial page's copy writes the cache
            leaves = self.memory.fork(parent.leaf, k, self.alloc.alloc)
        children = []
        lp = torch.log_softmax(parent.logits, dim=-1) if tokens is not None else None
        for i, (leaf, q) in enumerate(zip(leaves, plist)):
            c = self._new_path(parent.prompt_ids, leaf, q, self._generator(seeds[i]), parent.boundary)
            c.token_ids, c.token_logprobs = list(parent.token_ids), list(parent.token_logprobs)
            c.token_confidences, c.top_logprobs = list(parent.token_confidences), list(parent.top_logprobs)
            c.logits, c.parent = parent.logits, parent.id
            c.segment_start = len(c.token_ids) - 1 if parent.state == "paused" else parent.segment_start
            c.reserved = parent.reserved if i == 0 else needs[i] - (1 if rem else 0)
            c.window = parent.window if i == 0 else self.window_pages
            c.quant_floor, c.quant_done = parent.quant_floor, parent.quant_done
            if tokens is not None:
                c.token_ids[-1], c.token_logprobs[-1] = tokens[i], float(lp[tokens[i]])
            c.stop = StopChecker(q, self.eos, self.engine.tokenizer)
            children.append(c)
        parent.reserved, parent.leaf, parent.window = 0, None, 0
        parent.state, parent.finish_reason = "finished", "forked"
        for c in children:  # a replaced pending token may end the child at once
            reason = c.stop.check(c.token_ids)
            if reason is not None:
                self._finish(c, reason)
        self._settle()
        return [c.id for c in children]

    def stop(self, path_id: int, reason: str = "stopped") -> None:
        """End a live path now and free what only it held."""
        require(isinstance(path_id, int) and path_id in self.paths, "path", f"unknown path {path_id!r}")
        p = self.paths[path_id]
        require(p.live, "path", f"path {path_id} has already finished ({p.finish_reason})")
        self._finish(p, reason)
        self._settle()

    def resume(self, path_id: int) -> None:
        """A paused path decodes again from the next step; its next boundary is searched from here."""
        p = self.path(path_id)
        require(p.state == "paused", "path", f"path {path_id} is {p.state}, not paused")
        p.state = "running"
        p.segment_start = len(p.token_ids) - 1

    # ---- decoding -------------------------------------------------------------------------------
    def step(self) -> list[StepEvent]:
        """Every running path decodes one token (one forward); returns their events in row order."""
        running = [p for p in self.paths.values() if p.state == "running"]
        if not running:
            return []
        with torch.inference_mode():
            slots: dict[int, int] = {}
            for p in running:
                slots[p.id] = self.memory.slot_for_next(p.leaf, lambda p=p: self._take(p))
            t = time.perf_counter()
            read = self.windows.read_count if self.windows is not None else None
            rows, levels, self.kv_tokens_read, quantized = tree_levels_split(
                self.memory.roots, lambda s: s.owner.state == "running", self.page_size, self.fold_pages, read)
            batch = StepBatch(torch.tensor([p.token_ids[-1] for p in rows], dtype=torch.int64),
                              torch.tensor([p.leaf.end - 1 for p in rows], dtype=torch.int64),
                              torch.tensor([slots[p.id] for p in rows], dtype=torch.int64), levels)
            attend = self._attend(batch, False, quantized)
            self.plan_seconds += time.perf_counter() - t
            logits = self.engine.model.forward(batch.tokens, batch.positions, attend)
            self.steps += 1
            events = self._sample(rows, logits.float(), rows_are_paths=True)
            self._settle()
            return events

    def run(self, on_step: Callable[["Session", list[StepEvent]], None] | None = None) -> None:
        """Step until no path is running; on_step(session, events) may stop, fork or resume paths."""
        while self.running():
            events = self.step()
            if on_step is not None:
                on_step(self, events)

    def events(self) -> Iterator[list[StepEvent]]:
        """Each step's events while paths are running (the caller may change paths between them)."""
        while self.running():
            yield self.step()

    # ---- internals ------------------------------------------------------------------------------
    def _seeds(self, seeds, count: int, base: int | None) -> list[int | None]:
        if seeds is None:
            return [None if base is None else base + i for i in range(count)]
        seeds = list(seeds)
        require(len(seeds) == count and all(isinstance(s, int) for s in seeds), "seeds",
                f"give {count} int seeds, got {seeds!r}")
        return seeds

    def _new_path(self, prompt_ids, leaf, params, generator, boundary) -> TreePath:
        require(all(isinstance(b, str) and b for b in boundary), "boundary", "must be non-empty strings")
        p = TreePath(self._next_id, prompt_ids, leaf, params, generator,
                     StopChecker(params, self.eos, self.engine.tokenizer), tuple(boundary))
        leaf.owner = p
        self.paths[p.id] = p
        self._next_id += 1
        return p

    def _reserve(self, count: int) -> bool:
        """Reserve `count` pages, evicting unused cached prompt pages if that makes room."""
        if count > self.alloc.num_available and self.prefix is not None:
            self.prefix.evict(count - self.alloc.num_available)
        return self.alloc.reserve(count)

    def _take(self, p: TreePath) -> int:
        assert p.reserved > 0, f"path {p.id} wrote past its reservation"
        p.reserved -= 1
        return self.alloc.alloc()

    def _attend(self, batch: StepBatch, prefill: bool, quantized: list[list[int]]):
        if self.windows is None:
            return make_attend(batch, self.cache, prefill=prefill, backend=self.backend)
        return self.cache.make_attend(batch, prefill=prefill, backend=self.backend, read_quantized=quantized)

    def _settle(self) -> None:
        """Quantized kinds: bring pages to the states the live paths' lengths give (tree_windows)."""
        if self.windows is not None:
            with torch.inference_mode():
                self.windows.settle([p for p in self.paths.values() if p.live])

    def _quant_floor(self, cached: list[int]) -> int:
        """Leading pages of a prefix-cache hit read quantized: through the last one that has left
        the window (those before it that are still in a window get their quantized copy too)."""
        if self.windows is None:
            return 0
        floor = max((i + 1 for i, g in enumerate(cached) if not self.cache.has_window(g)), default=0)
        with torch.inference_mode():
            self.cache.quantize(cached[:floor])
        return floor

    def _prefill(self, ids: list[int], root: Segment, start: int, floor: int = 0) -> Tensor:
        """Run ids[start:] (the first `start` are cached, the first `floor` pages read quantized)
        through the model into the root's pages."""
        ps, n = self.page_size, len(ids)
        pages = torch.tensor(root.pages, dtype=torch.int32)
        pos = torch.arange(start, n)
        level = CascadeLevel(torch.tensor([0, n - start], dtype=torch.int32),
                             torch.tensor([0, len(root.pages)], dtype=torch.int32), pages,
                             torch.tensor([n - (len(root.pages) - 1) * ps], dtype=torch.int32), causal=True)
        batch = StepBatch(torch.tensor(ids[start:], dtype=torch.int64), pos, pages.long()[pos // ps] * ps + pos % ps,
                          [level], torch.tensor([n - start - 1]))
        with torch.inference_mode():
            attend = self._attend(batch, True, [[floor]])
            logits = self.engine.model.forward(batch.tokens, batch.positions, attend, logits_rows=batch.logits_rows)
        self.prefill_tokens += n - start
        self.reused_tokens += start
        return logits[0].float()

    def _sample(self, paths: list[TreePath], logits: Tensor, rows_are_paths: bool) -> list[StepEvent]:
        """Draw each path's next token from its row of `logits` with its own params and uniform."""
        uniforms = torch.cat([torch.rand(1, generator=p.generator) for p in paths])
        short = [p.stop.stop_ids if len(p.token_ids) < p.params.min_tokens else () for p in paths]
        d = draw(logits, [p.params for p in paths], uniforms=uniforms, mask_ids=short, backend=self.backend)
        events = []
        for r, (p, tok, lp) in enumerate(zip(paths, d.tokens, d.logprobs)):
            p.token_ids.append(tok)
            p.token_logprobs.append(lp)
            if p.params.confidence_k:
                p.token_confidences.append(d.confidence[r])
            if p.params.top_logprobs:
                p.top_logprobs.append(d.top(r, p.params.top_logprobs))
            p.logits = logits[r]
            ev = StepEvent(p.id, tok, lp)
            reason = p.stop.check(p.token_ids)
            if reason is not None:
                self._finish(p, reason)
                ev.finish_reason = reason
            elif p.boundary and self._at_boundary(p):
                p.state, ev.paused = "paused", True
            events.append(ev)
        return events

    def _at_boundary(self, p: TreePath) -> bool:
        text = self.engine.tokenizer.decode(p.token_ids[p.segment_start:])  # the text a reader sees
        return any(b in text for b in p.boundary)

    def _finish(self, p: TreePath, reason: str) -> None:
        p.state, p.finish_reason = "finished", reason
        self.alloc.release(p.reserved + p.window)
        p.reserved = p.window = 0
        if p.leaf is not None:
            self.memory.release(p.leaf)
            p.leaf = None
        p.logits = None

    def close(self, keep_prefix_cache: bool = False) -> None:
        """Stop every live path; afterwards no page is held (but the prefix cache's, if kept)."""
        for p in list(self.paths.values()):
            if p.live:
                self._finish(p, "stopped")
        if self.prefix is not None and not keep_prefix_cache:
            self.prefix.clear()
        self._settle()
