"""forkdec.Engine: many sampled paths per prompt, prompts prefilled once and shared.

Each prompt is prefilled once into the paged cache; all its paths read those
pages through level 0 of a cascade and their own tokens through level 1.
Paths of every prompt decode together, one token each per step; a path that
finishes leaves the batch and frees its pages at once. A path is admitted only
with every page it could need reserved, so decoding never runs out of memory;
paths that do not fit wait until pages are freed.
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor

import forkdec.ops as ops
from forkdec.cache import PagedKVCache, cache_kind, make_attend, pick_backend
from forkdec.cache.prefix_index import PrefixIndex
from forkdec.engine.completion import Completion, GenerateStats
from forkdec.engine.metadata import decode_batch, prefill_batch
from forkdec.engine.params import SamplingParams
from forkdec.engine.progress import Progress
from forkdec.engine.speculative_step import Speculator
from forkdec.engine.state import PathState, PromptState
from forkdec.engine.step_view import PathDelta, StepView, early_stop_hook
from forkdec.engine.stops import StopChecker
from forkdec.engine.token_sampler import draw
from forkdec.validation import require, validation

EarlyStop = Callable[[int, list[Completion]], bool]


def default_kv_budget() -> int:
    """Half the memory available now (Linux), else 2 GiB."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 2
    except OSError:
        pass
    return 2 << 30


class Engine:
    """Batched multi-path decoding over a paged, prefix-shared KV cache.

    model: None (the embedded default, `forkdec.models.load_model()`), a model
        file path, a (model, tokenizer) pair, or a model with `tokenizer=`.
        The model follows forkdec.models' interface: `forward(tokens, positions,
        attend, logits_rows)`, `config`, `dtype`.
    kv_budget_bytes: most bytes the KV cache may take (default: half the
        available memory); paths beyond it wait, and a path that cannot fit
        even alone is refused with a ValueError.
    dtype: passed to load_model when the engine loads the model; the KV cache
        uses the model's dtype unless `kv` says otherwise.
    kv: cache kind (forkdec.xquant.kinds): None (K/V in the model's dtype), "fp32",
        "bf16", "fp16", "xquant-4", "xquant-latent-4", "xquant-cl-2", "kivi-4", ...
        Quantized kinds use their own page size (page_size is then ignored).
    prefix_cache: keep the whole pages of prompts after a call (fp kinds), so a later
        prompt that extends a cached prefix prefills only its new tokens; unused cached
        pages are evicted least-recently-used when admission needs them.
    """

    def __init__(self, model: Any = None, *, tokenizer: Any = None, kv_budget_bytes: int | None = None,
                 dtype: torch.dtype | None = None, page_size: int = 16, kv: str | None = None,
                 prefix_cache: bool = True) -> None:
        if model is None or isinstance(model, (str, os.PathLike)):
            from forkdec.models import load_model
            model, tokenizer = load_model(None if model is None else os.fspath(model), dtype=dtype)
        elif isinstance(model, tuple):
            model, tokenizer = model
        require(tokenizer is not None, "tokenizer", "a model object needs its tokenizer (tokenizer=...)")
        require(isinstance(page_size, int) and page_size >= 1, "page_size", f"must be an int >= 1, got {page_size!r}")
        self.model, self.tokenizer = model, tokenizer
        self.kv = kv
        self.kv_dtype = model.dtype
        self.kind = cache_kind(kv, model, page_size)  # the kind string, parsed once
        self.page_size, self.page_bytes = self.kind.page_size, self.kind.page_bytes
        # quantized kinds: pages of the budget that cover a live sequence's full-precision window
        self.window_pages = self.kind.window_pages
        budget = default_kv_budget() if kv_budget_bytes is None else kv_budget_bytes
        require(isinstance(budget, int) and budget > 0, "kv_budget_bytes", f"must be a positive int, got {budget!r}")
        require(budget >= self.page_bytes, "kv_budget_bytes",
                f"{budget} bytes hold no page; one page of {self.page_size} tokens takes {self.page_bytes} bytes")
        self.kv_budget_bytes = budget
        self.max_pages = budget // self.page_bytes
        # the most window slots the budget can hold: caps the quantized cache's window pool
        self.max_window_slots = (max(1, self.max_pages // self.window_pages) * self.kind.window_slots
                                 if self.window_pages else None)
        self.cache: PagedKVCache | None = None
        self.use_prefix_cache = bool(prefix_cache) and not self.kind.quantized
        self.prefix: PrefixIndex | None = None  # the prompts' pages the cache keeps across calls
        self.last_stats: GenerateStats | None = None

    @classmethod
    def from_transformers(cls, model: Any, tokenizer: Any, **kwargs: Any) -> "Engine":
        """An engine on a loaded transformers Llama/Mistral/Qwen2 model and its tokenizer, using the
        model's weights in place (no copy); kwargs as for Engine (kv_budget_bytes, page_size)."""
        from forkdec.integrations.transformers_model import adapt
        return cls(adapt(model, tokenizer), **kwargs)

    # ---- prompts ------------------------------------------------------------------------------
    def encode(self, prompt: str, chat: bool = True) -> list[int]:
        """Token ids of `prompt`, as a one-turn user message in the chat template if `chat`."""
        if chat:
            prompt = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                        add_generation_prompt=True)
        return list(self.tokenizer.encode(prompt, add_bos=False))

    def eos_ids(self) -> set[int]:
        ids = set(getattr(self.tokenizer, "eos_token_ids", ()) or ())
        return ids | set(getattr(self.model.config, "eos_token_ids", ()) or ())

    # ---- the call -----------------------------------------------------------------------------
    def generate(self, prompts: Sequence[str] | str, n: int | Sequence[int] = 1, params: SamplingParams | None = None, *,
                 chat: bool = True, progress: Callable[[Progress], None] | None = None,
                 early_stop: EarlyStop | None = None,
                 on_step: Callable[[StepView], None] | None = None) -> list[list[Completion]]:
        """Decode `n` paths of every prompt; returns, per prompt, its n Completions in path order.

        prompts: one string or a list of them (each non-empty). n: paths per
        prompt, one int for all or one per prompt. chat: wrap each
        in the tokenizer's chat template. progress: called after prefill and
        every step. on_step(view) is called after every step with each path's new
        tokens and signals, and may stop single paths or cancel prompts
        (forkdec.engine.step_view). early_stop(prompt_index, finished) is the
        special case `early_stop_hook`: after a step in which paths of a prompt
        finished, it gets that prompt's finished Completions in finish order, and
        returning True cancels the prompt's other paths (finish_reason
        "cancelled"; paths that finished in that same step are kept) and frees
        their pages.
        """
        run = self._run(prompts, n, params, chat, progress, early_stop, on_step)
        for _ in run.steps(views=False):
            pass
        self.last_stats = run.stats
        return [[c for c in s.results] for s in run.states]  # type: ignore[misc]

    def stream(self, prompts: Sequence[str] | str, n: int | Sequence[int] = 1, params: SamplingParams | None = None,
               *, chat: bool = True, on_step: Callable[[StepView], None] | None = None) -> Iterator[list[PathDelta]]:
        """Decode as `generate` does, yielding each step's `PathDelta`s as they are decoded
        (new token ids, logprobs, confidences, finish reasons); `Engine.last_stats` is set
        when the iterator is exhausted. The tokens are those `generate` gives with the same seed."""
        run = self._run(prompts, n, params, chat, None, None, on_step)
        for view in run.steps():
            if view.events:
                yield view.events
        self.last_stats = run.stats

    def _run(self, prompts, n, params, chat, progress, early_stop, on_step) -> "_Run":
        """Check the call's arguments and set up its run."""
        params = params if params is not None else SamplingParams()
        require(isinstance(params, SamplingParams), "params", f"expected SamplingParams, got {type(params).__name__}")
        if isinstance(prompts, str):
            prompts = [prompts]
        require(len(prompts) > 0, "prompts", "no prompt given")
        counts = [n] * len(prompts) if isinstance(n, int) else list(n)
        require(len(counts) == len(prompts), "n", f"has {len(counts)} entries for {len(prompts)} prompts")
        for c in counts:
            require(isinstance(c, int) and not isinstance(c, bool) and c >= 1, "n", f"must be an int >= 1, got {c!r}")
        for i, p in enumerate(prompts):
            require(isinstance(p, str) and p.strip() != "", "prompt", f"prompt {i} is empty")
        ids = [self.encode(p, chat) for p in prompts]
        context = self.model.config.max_position_embeddings
        for i, t in enumerate(ids):
            require(len(t) > 0, "prompt", f"prompt {i} encodes to no tokens")
            # The steps run the model with validation off: its token check happens here, once.
            require(max(t) < self.model.config.vocab_size and min(t) >= 0, "prompt",
                    f"prompt {i} encodes to token ids outside the model's vocabulary of {self.model.config.vocab_size}")
            params.check_fits(len(t), context, which=f"prompt {i}")
        states = [PromptState(i, t, c, results=[None] * c) for i, (t, c) in enumerate(zip(ids, counts))]
        hooks = [h for h in (on_step, early_stop_hook(early_stop) if early_stop is not None else None) if h]
        return _Run(self, states, params, progress, hooks)

    def _cache_for(self, pages: int) -> PagedKVCache:
        if self.use_prefix_cache and str(getattr(self.model, "device", "cpu")) == "cpu":
            # On CPU untouched pages are never committed (pages are handed out low ids first), so the
            # cache takes the whole budget at once and is never replaced: what it keeps stays valid.
            pages = max(pages, self.max_pages)
        if self.cache is None or self.cache.num_pages < pages:
            self.cache = self.prefix = None  # drop the old cache (and what it kept) before allocating its successor
            self.cache = self.kind.make(self.model, pages, max_window_slots=self.max_window_slots)
            if self.use_prefix_cache:
                self.prefix = PrefixIndex(self.cache.allocator, self.page_size)
        return self.cache

    @property
    def kv_pages_cached(self) -> int:
        """Pages the prefix cache keeps between calls (0 without one)."""
        return 0 if self.prefix is None else self.prefix.num_pages

    def clear_prefix_cache(self) -> None:
        """Forget every cached prompt page (pages in use stay with their users)."""
        if self.prefix is not None:
            self.prefix.clear()


class _Run:
    """State of one `generate` call: admission, prefill, decode steps, finishing."""

    def __init__(self, engine: Engine, states: list[PromptState], params: SamplingParams,
                 progress: Callable[[Progress], None] | None, hooks: list[Callable[[StepView], None]]) -> None:
        self.e, self.states, self.params = engine, states, params
        self.progress, self.hooks = progress, hooks
        self.finished_now: list[PathState] = []  # paths that ended since the last view
        ps = engine.page_size
        # The last sampled token's K/V is never written, so a path stores at most max_new_tokens - 1.
        self.path_pages = -(-(params.max_new_tokens - 1) // ps)
        # Quantized kinds: every live sequence (a prompt, a path) also holds a full-precision window,
        # worth window_pages of the budget; it is budgeted here, apart from the pool's page ids, so
        # that the quantized pool is not allocated for pages that will only ever be window.
        wp = engine.window_pages
        self.windows = 0  # live sequences whose window is budgeted
        need = 0
        for s in states:
            one = -(-len(s.token_ids) // ps) + self.path_pages + 2 * wp
            require(one <= engine.max_pages, "kv_budget_bytes",
                    f"prompt {s.index} ({len(s.token_ids)} tokens) with one path of max_new_tokens "
                    f"{params.max_new_tokens} needs {one * engine.page_bytes} bytes of KV"
                    f"{' (full-precision windows included)' if wp else ''}; the budget "
                    f"{engine.kv_budget_bytes} holds {engine.max_pages * engine.page_bytes}")
            need += one - 2 * wp + (s.n - 1) * self.path_pages
        # ids past max_pages - 2 windows are never in use: a live path has its own and its prompt's window
        self.cache = engine._cache_for(min(need, engine.max_pages - 2 * wp))
        self.alloc = self.cache.allocator
        self.prefix = engine.prefix
        self.stop = StopChecker(params, engine.eos_ids(), engine.tokenizer)
        self.sample = ops.sample
        self.generator = torch.Generator()
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()
        self.running: list[PathState] = []
        self.stats = GenerateStats(prompt_tokens=[len(s.token_ids) for s in states],
                                   kv_bytes_per_token=engine.page_bytes // ps)
        self.backend = pick_backend(self.cache.device)
        self.speculator = Speculator(self) if params.speculate != "off" else None
        self.t0 = time.perf_counter()

    # ---- loop -----------------------------------------------------------------------------------
    def steps(self, views: bool = True) -> Iterator[StepView | None]:
        """Admit, step, and show each step to the hooks; yields the step's view (generate and
        stream drive this; views=False with no hooks builds none: generate's hot path).
        Inference mode is held per step, never across a yield."""
        views = views or bool(self.hooks)
        while True:
            with torch.inference_mode():
                admitted = self.admit()
                if self.running:
                    self.step()
                elif not any(s.waiting for s in self.states):
                    break
                elif not admitted:  # cannot happen: the budget check holds one path of every prompt
                    raise RuntimeError("engine: paths are waiting but none can be admitted")
                view = self.view() if views else None
                self.finished_now.clear()
                for hook in self.hooks:
                    hook(view)
            yield view
        if self.finished_now and views:  # paths a hook ended after the last step
            yield self.view()
        assert all(None not in s.results for s in self.states) and self.windows == 0
        assert self.alloc.num_used == self.e.kv_pages_cached, "pages left held after the call"

    def view(self) -> StepView:
        """Every path's tokens since the last view (running ones and those that just ended)."""
        events = []
        for path in self.finished_now + self.running:
            new = len(path.token_ids) - path.reported
            if new <= 0 and not (path.finished and path in self.finished_now):
                continue
            r = path.reported
            events.append(PathDelta(path.prompt.index, path.index, path.token_ids[r:], path.token_logprobs[r:],
                                    path.token_confidences[r:] if self.params.confidence_k else None,
                                    path.prompt.results[path.index].finish_reason if path.finished else None))
            path.reported = len(path.token_ids)
        self.finished_now = []
        return StepView(self.stats.decode_steps, events, self.stop_path, self.cancel_prompt, self.finished_of)

    def stop_path(self, prompt: int, path: int) -> None:
        for q in self.running:
            if q.prompt.index == prompt and q.index == path and not q.finished:
                self.finish(q, "stopped")
        self.running = [q for q in self.running if not q.finished]

    def cancel_prompt(self, prompt: int) -> None:
        s = self.states[prompt]
        if not s.cancelled:
            self.cancel(s)
        self.running = [q for q in self.running if not q.finished]

    def finished_of(self, prompt: int) -> list[Completion]:
        return sorted((c for c in self.states[prompt].results
                       if c is not None and c.finish_reason not in ("cancelled", "stopped")),
                      key=lambda c: c.finish_order)

    def reserve(self, pages: int, windows: int) -> bool:
        """Reserve `pages` page ids and budget `windows` more full-precision windows, if both fit."""
        a = self.alloc
        short = max(a.num_used + a.num_reserved + pages + (self.windows + windows) * self.e.window_pages
                    - self.e.max_pages, pages - a.num_available)
        if short > 0 and self.prefix is not None:  # cached prompt pages nobody uses make room
            self.prefix.evict(short)
        if a.num_used + a.num_reserved + pages + (self.windows + windows) * self.e.window_pages > self.e.max_pages:
            return False
        if not a.reserve(pages):
            return False
        self.windows += windows
        return True

    def admit(self) -> int:
        """Start waiting paths in prompt order while their pages fit (first come, first served);
        returns how many started. (New paths may finish at once, on their first token.)"""
        ps, new_prompts, new_paths = self.e.page_size, [], []
        for s in self.states:
            if s.waiting == 0:
                continue
            if not s.prefilled:
                prompt_pages = -(-len(s.token_ids) // ps)
                # whole pages of a cached prefix (the last token is always prefilled: its logits are needed)
                cached = self.prefix.match(s.token_ids[:-1]) if self.prefix is not None else []
                if self.prefix is not None and new_prompts and self._extends_pending(s, len(cached), new_prompts):
                    self.prefill(new_prompts)  # prefill the earlier prompt first, so this one reuses its pages
                    new_prompts = []
                    cached = self.prefix.match(s.token_ids[:-1])
                self.alloc.share(cached)  # held before reserve(), so its eviction cannot take them
                if not self.reserve(prompt_pages - len(cached) + self.path_pages, windows=2):
                    self.alloc.free(cached)
                    break
                self.alloc.release(self.path_pages)  # taken back just below for the first path
                self.windows -= 1
                s.pages = cached + [self.alloc.alloc() for _ in range(prompt_pages - len(cached))]
                s.cached = len(cached) * ps
                new_prompts.append(s)
            while s.waiting > 0 and self.reserve(self.path_pages, windows=1):
                new_paths.append(PathState(s, s.admitted, reserved=self.path_pages))
                s.admitted += 1
                s.running += 1
            if s.waiting > 0:
                break
        if new_prompts:
            self.prefill(new_prompts)
        if new_paths:
            self.first_tokens(new_paths)
        return len(new_paths)

    def _extends_pending(self, s: PromptState, cached_pages: int, pending: list[PromptState]) -> bool:
        """Whether a prompt about to be prefilled in this batch holds the next whole page of `s`."""
        ps = self.e.page_size
        lo, hi = cached_pages * ps, (cached_pages + 1) * ps
        if len(s.token_ids) - 1 < hi:
            return False
        page = s.token_ids[lo:hi]
        return any(len(p.token_ids) >= hi and p.token_ids[lo:hi] == page for p in pending)

    def prefill(self, prompts: list[PromptState]) -> None:
        t = time.perf_counter()
        batch = prefill_batch(prompts, self.e.page_size)
        attend = make_attend(batch, self.cache, prefill=True, backend=self.backend)
        with validation(False):  # metadata built by prefill_batch from checked prompts
            logits = self.e.model.forward(batch.tokens, batch.positions, attend, logits_rows=batch.logits_rows)
        for s, row in zip(prompts, logits.float()):
            s.last_logits = row
            self.stats.prompt_tokens_reused += s.cached
            self.stats.prompt_tokens_prefilled += len(s.token_ids) - s.cached
            if self.prefix is not None:
                self.prefix.insert(s.token_ids, s.pages)
        self.stats.prefill_seconds += time.perf_counter() - t

    def first_tokens(self, paths: list[PathState]) -> None:
        """Each new path's first token, drawn from its prompt's logits, one sampler call."""
        t = time.perf_counter()
        prompts = list({id(p.prompt): p.prompt for p in paths}.values())
        row = {id(s): i for i, s in enumerate(prompts)}
        logits = torch.stack([s.last_logits for s in prompts])
        row_ids = torch.tensor([row[id(p.prompt)] for p in paths], dtype=torch.int64)
        self.running += paths
        self.running.sort(key=lambda p: (p.prompt.index, p.index))
        self.accept(paths, logits, row_ids)
        self.stats.decode_seconds += time.perf_counter() - t

    def step(self) -> None:
        if self.speculator is not None:
            self.speculator.step(self, self.plain_step)
        else:
            self.plain_step()

    def plain_step(self) -> None:
        t = time.perf_counter()
        batch = decode_batch(self.running, self.alloc, self.e.page_size)
        self.note_memory()
        with validation(False):  # the step's own metadata and sampled tokens: valid by construction
            attend = make_attend(batch, self.cache, prefill=False, backend=self.backend)
            logits = self.e.model.forward(batch.tokens, batch.positions, attend)
        self.stats.decode_steps += 1
        self.stats.max_batch = max(self.stats.max_batch, len(self.running))
        self.accept(list(self.running), logits, None)
        self.stats.decode_seconds += time.perf_counter() - t

    def accept(self, paths: list[PathState], logits: Tensor, row_ids: Tensor | None) -> None:
        """Sample one token for every path (one call), add it, and finish the paths that end."""
        p = self.params
        short = [self.stop.stop_ids if len(q.token_ids) < p.min_tokens else () for q in paths]
        with validation(False):  # the model's logits, and params checked when they were made
            d = draw(logits.float(), [p] * len(paths), generator=self.generator, row_ids=row_ids, mask_ids=short,
                     backend=self.backend)
        for r, (path, tok, lp) in enumerate(zip(paths, d.tokens, d.logprobs)):
            if path.finished:  # cancelled by an early stop earlier in this loop: its draw is dropped
                continue
            self.stats.generated_tokens += 1
            path.token_ids.append(tok)
            path.token_logprobs.append(lp)
            if d.confidence is not None:
                path.token_confidences.append(d.confidence[r])
            if p.top_logprobs:
                path.top_logprobs.append(d.top(r, p.top_logprobs))
            reason = self.stop.check(path.token_ids)
            if reason is not None:
                self.finish(path, reason)
        self.running = [q for q in self.running if not q.finished]
        self.report()

    def finish(self, path: PathState, reason: str) -> None:
        s = path.prompt
        path.finished = True
        self.alloc.free(path.pages)
        self.alloc.release(path.reserved)
        path.pages, path.reserved = [], 0
        self.windows -= 1
        s.running -= 1
        p = self.params
        s.results[path.index] = Completion(
            list(path.token_ids), self.stop.final_text(path.token_ids), reason, float(sum(path.token_logprobs)),
            finish_order=s.finished, token_logprobs=list(path.token_logprobs),
            token_confidences=list(path.token_confidences) if p.confidence_k else None,
            top_logprobs=list(path.top_logprobs) if p.top_logprobs else None)
        s.finished += 1
        self.finished_now.append(path)
        if s.running == 0 and s.waiting == 0 and s.pages:
            self.alloc.free(s.pages)
            self.windows -= 1
            s.pages, s.last_logits = [], None

    def cancel(self, s: PromptState) -> None:
        s.cancelled = True
        for j in range(s.n):
            if s.results[j] is None and j >= s.admitted:
                s.results[j] = Completion([], "", "cancelled", 0.0)
        for q in self.running:
            if q.prompt is s and not q.finished:
                self.finish(q, "cancelled")

    # ---- reporting -----------------------------------------------------------------------------
    def note_memory(self) -> None:
        pb = self.e.page_bytes
        held = self.cache.bytes_used  # what the cache holds (quantized kinds: codes, scales, window)
        extra = sum((s.running - 1) * len(s.pages) for s in self.states if s.running > 1) * pb
        self.stats.kv_bytes_peak = max(self.stats.kv_bytes_peak, held)
        self.stats.kv_bytes_if_copied = max(self.stats.kv_bytes_if_copied, held + extra)
        self.stats.kv_bytes_prompts = max(self.stats.kv_bytes_prompts,
                                          sum(len(s.pages) for s in self.states) * pb)

    def report(self) -> None:
        if self.progress is None:
            return
        self.progress(Progress(
            finished_paths=sum(s.finished for s in self.states) + sum(s.n - s.admitted for s in self.states
                                                                      if s.cancelled),
            total_paths=sum(s.n for s in self.states), running_paths=len(self.running),
            generated_tokens=self.stats.generated_tokens, elapsed_seconds=time.perf_counter() - self.t0,
            kv_pages_used=self.alloc.num_used, kv_pages_total=self.alloc.num_pages))
