"""A decode step with n-gram drafts, verified by tree attention (docs/speculative.md, "In the engine").

Each step: every path's new tokens go into its prompt's n-gram table; the
drafter ranks draft nodes over the whole batch; the controller decides how
many of them are worth verifying (none: a plain step). A tree step feeds every
path's root and draft tree in one forward (`tree_batch`: cascade level 0 the
shared prompt, level 1 the path's pages with the tree mask), verifies, keeps
the accepted nodes' K/V where plain decoding would have put them
(`accept_path_kv`), gives back the pages the rejected nodes took, and emits the
accepted tokens plus one more, checking stops after each token exactly as a
plain step does.

Temperature 0 verifies with `verify_tree_greedy` on the logits. Temperature > 0
draws one token per tree row with the engine's own sampler (same temperature,
top-k, top-p, min-p as a plain step) and accepts a child when its token is the
one drawn at its parent; the first draw that matches no child is the bonus.
Every emitted token is thus a draw from the filtered target distribution at its
position, so the output is distributed exactly as plain sampling. This is
SpecInfer's recursive rejection with one-hot draft distributions, which is what a
deterministic n-gram tree has; `verify_tree_sampling` assumes children drawn
independently from a draft distribution, which n-gram children are not, so it
would not be lossless here. The walk itself is `verify_tree_greedy` on a one-hot
table over the draft tokens (the drawn token, or "none of them").
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable

import torch
from torch import Tensor

import forkdec.ops as ops
from forkdec.cache import make_attend
from forkdec.engine.drafter import AcceptanceModel, NgramTable, rank_nodes, split_trees
from forkdec.cache import TreeInputs
from forkdec.engine.metadata import tree_batch
from forkdec.engine.spec_control import SpeculationControl
from forkdec.engine.state import PathState, PromptState
from forkdec.tree import accept_path_kv
from forkdec.validation import validation

if TYPE_CHECKING:
    from forkdec.engine.engine import _Run


class Speculator:
    """Per-call state of speculative decoding: the prompts' n-gram tables and the controller."""

    def __init__(self, run: "_Run") -> None:
        p = run.params
        self.budget, self.depth = p.draft_budget, p.draft_depth
        self.control = SpeculationControl(adaptive=p.draft_adaptive)
        self.acceptance = AcceptanceModel()
        self.tables: dict[int, NgramTable] = {}          # id(PromptState) -> its table
        self.counted: dict[int, tuple[PathState, int]] = {}  # id(PathState) -> (path, tokens already counted)

    # ---- the n-gram tables ------------------------------------------------------------------
    def table(self, prompt: PromptState) -> NgramTable:
        t = self.tables.get(id(prompt))
        if t is None:
            t = self.tables[id(prompt)] = NgramTable()
            t.extend(prompt.token_ids)
        return t

    def observe(self, running: list[PathState]) -> None:
        """Count every path's tokens not yet in its prompt's table, those of paths that finished
        since the last step included (siblings still running learn from them)."""
        for path in running:
            self.counted.setdefault(id(path), (path, 0))
        for key, (path, done) in list(self.counted.items()):
            table = self.table(path.prompt)
            if len(path.token_ids) > done:
                ctx = _tail(path, table.order, upto=done)
                table.extend(ctx + path.token_ids[done:], start=len(ctx))
            if path.finished:
                del self.counted[key]
            else:
                self.counted[key] = (path, len(path.token_ids))

    # ---- one step ---------------------------------------------------------------------------
    def step(self, run: "_Run", plain_step: Callable[[], None]) -> None:
        """One decode step of every running path: a tree step, or `plain_step` when no draft pays."""
        t0 = time.perf_counter()
        paths = list(run.running)
        if not self.control.drafting():  # speculation held off: a plain step that does not even draft
            return self.plain(run, len(paths), plain_step, t0)
        self.observe(paths)
        ps, max_new = run.e.page_size, run.params.max_new_tokens
        tables = [self.table(p.prompt) for p in paths]
        tails = [_tail(p, t.order) for p, t in zip(paths, tables)]
        # room: slots the path's pages and reservation still hold after the root; depth: tokens left - 1
        room = [(len(p.pages) + p.reserved) * ps - p.kv_len - 1 for p in paths]
        # a path `lead` tokens ahead of the slowest drafts at most depth - lead: the run ends with its
        # slowest path, so trees that run some paths ahead leave a tail of steps with few paths
        # (at 16 paths that tail cost more than the trees gained)
        slowest = min(len(p.token_ids) for p in paths)
        depth = [min(self.depth - (len(p.token_ids) - slowest), max_new - len(p.token_ids) - 1) for p in paths]
        if hasattr(run.cache, "max_draft_depth"):  # a quantized cache: a tree stops at the path's next flush
            depth = [min(d, run.cache.max_draft_depth(p.pages, p.kv_len)) for d, p in zip(depth, paths)]
        ranked = rank_nodes(tables, tails, room, depth, self.budget, acceptance=self.acceptance)
        k = self.control.choose(len(paths), [r.score for r in ranked])
        if k == 0:
            return self.plain(run, len(paths), plain_step, t0)
        stats = run.stats
        stats.path_steps += len(paths)
        trees = split_trees(ranked, k, len(paths))
        with validation(False):  # the trees come from split_trees: valid by construction
            batch = tree_batch(paths, trees, run.alloc, ps)
        run.note_memory()
        attend = make_attend(batch, run.cache, prefill=False, backend=run.backend)
        with validation(False):  # the trees' own metadata: valid by construction
            logits = run.e.model.forward(batch.tokens, batch.positions, attend).float()
        tree = batch.tree
        assert tree is not None
        accepted, nodes, bonus = self.verify(run, tree, logits)
        keep_accepted_kv(run, paths, tree, nodes, accepted)
        for t, nd, n in zip(trees, nodes.tolist(), accepted.tolist()):
            self.acceptance.update(t.kinds, t.parents, nd[:n])
        emitted = self.emit(run, paths, tree, logits, nodes, accepted, bonus)
        stats.decode_steps += 1
        stats.speculative_steps += 1
        stats.max_batch = max(stats.max_batch, len(paths))
        stats.draft_tokens += k
        stats.accepted_draft_tokens += int(accepted.sum())
        stats.path_step_tokens += emitted
        seconds = time.perf_counter() - t0
        stats.decode_seconds += seconds
        self.control.observe(int(batch.tokens.numel()), seconds, emitted, predicted=sum(r.score for r in ranked[:k]),
                             accepted=int(accepted.sum()), tree=True)

    def plain(self, run: "_Run", batch: int, plain_step: Callable[[], None], t0: float) -> None:
        """A plain step of `batch` paths after the drafting (if any) that began at t0; the step
        and its drafting count as decode time and as one plain step for the controller."""
        stats = run.stats
        before = stats.generated_tokens
        stats.decode_seconds += time.perf_counter() - t0  # drafting time; plain_step adds its own
        plain_step()
        emitted, seconds = stats.generated_tokens - before, time.perf_counter() - t0
        stats.path_steps += batch
        stats.path_step_tokens += emitted
        stats.plain_step_seconds += seconds
        stats.plain_step_tokens += emitted
        self.control.observe(batch, seconds, emitted)

    def verify(self, run: "_Run", tree: TreeInputs, logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(num_accepted [B], accepted_nodes [B, D], bonus token [B]) of the step's trees."""
        p = run.params
        if p.temperature == 0:
            with validation(False):  # the step's own tree metadata and the model's logits
                res = ops.verify_tree_greedy(tree.draft_tokens, tree.parents, tree.tree_indptr, logits,
                                             max_depth=tree.max_depth)
            return res.num_accepted, res.accepted_nodes, res.bonus_token
        drawn = run.sample(logits, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, min_p=p.min_p,
                           generator=run.generator)
        with validation(False):
            res = ops.verify_tree_greedy(*_one_hot_walk(tree, drawn), max_depth=tree.max_depth)
        batch = tree.tree_indptr.numel() - 1
        block = tree.tree_indptr.long()[:-1] + torch.arange(batch)
        last = torch.gather(res.accepted_nodes.long(), 1, (res.num_accepted.long() - 1).clamp_min(0)[:, None])[:, 0]
        row = block + torch.where(res.num_accepted > 0, last + 1, 0)
        return res.num_accepted, res.accepted_nodes, drawn[row]

    def emit(self, run: "_Run", paths: list[PathState], tree: TreeInputs, logits: Tensor, nodes: Tensor,
             accepted: Tensor, bonus: Tensor) -> int:
        """Append each path's accepted tokens and bonus token, with their log-probabilities,
        checking stops after every token; returns the tokens emitted."""
        starts = tree.tree_indptr.tolist()
        draft = tree.draft_tokens.tolist()
        rows, tokens = [], []
        for b, (n, nd, bt) in enumerate(zip(accepted.tolist(), nodes.tolist(), bonus.tolist())):
            block = starts[b] + b
            rows.append([block] + [block + 1 + i for i in nd[:n]])
            tokens.append([draft[starts[b] + i] for i in nd[:n]] + [bt])
        flat_rows = torch.tensor([r for rs in rows for r in rs])
        flat_tokens = torch.tensor([t for ts in tokens for t in ts])
        # log p(token) at temperature 1, unfiltered, as plain steps report it
        lps = (logits[flat_rows, flat_tokens] - torch.logsumexp(logits[flat_rows], dim=-1)).tolist()
        emitted, i = 0, 0
        for path, toks in zip(paths, tokens):
            for j, tok in enumerate(toks):
                if path.finished:
                    break
                run.stats.generated_tokens += 1
                emitted += 1
                path.token_ids.append(tok)
                path.token_logprobs.append(lps[i + j])
                reason = run.stop.check(path.token_ids)
                if reason is not None:
                    run.finish(path, reason)
            i += len(toks)
        run.running = [q for q in run.running if not q.finished]
        run.report()
        return emitted


def keep_accepted_kv(run: "_Run", paths: list[PathState], tree: TreeInputs, nodes: Tensor, accepted: Tensor) -> None:
    """Move the accepted nodes' K/V to the slots after the root, in every layer with one
    accept_path_kv call, then give back the pages only rejected nodes used.

    The call treats (layer, path) as one request over all layers' pages viewed as one pool
    of num_layers * num_pages pages: node slots of layer l are offset by l * pages * page_size.
    """
    cache = run.cache
    ps = cache.page_size
    n = tree.node_slots.numel()
    if hasattr(cache, "keep_accepted"):  # a quantized cache moves its window rows, then flushes
        cache.keep_accepted(tree.node_slots, tree.tree_indptr, nodes, accepted)
    elif n and bool((accepted > 0).any()):
        layers, pages = cache.k.shape[0], cache.k.shape[1]
        offsets = torch.arange(layers, dtype=torch.int64)[:, None] * (pages * ps)
        slots = (tree.node_slots[None] + offsets).reshape(-1)
        indptr = torch.cat([tree.tree_indptr[:1].long(), (tree.tree_indptr[1:].long()[None] +
                                                          torch.arange(layers)[:, None] * n).reshape(-1)])
        with validation(False):  # built here from the step's own metadata
            accept_path_kv(cache.k.view(layers * pages, *cache.k.shape[2:]),
                           cache.v.view(layers * pages, *cache.v.shape[2:]), slots, indptr.to(torch.int32),
                           nodes.repeat(layers, 1), accepted.repeat(layers))
    alloc = run.alloc
    for path, num in zip(paths, accepted.tolist()):
        path.kv_len += num
        keep = -(-path.kv_len // ps)
        spare = path.pages[keep:]
        if spare:
            del path.pages[keep:]
            alloc.free(spare)
            reserved = alloc.reserve(len(spare))
            assert reserved, "pages just freed must be reservable again"
            path.reserved += len(spare)


def _one_hot_walk(tree: TreeInputs, drawn: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """verify_tree_greedy inputs that accept a child iff its token was drawn at its parent:
    draft tokens renumbered into the distinct draft tokens, and per row a one-hot "logit"
    on the drawn token's number (or on an extra column when no draft token was drawn)."""
    vocab, local = torch.unique(tree.draft_tokens, return_inverse=True)
    pos = torch.searchsorted(vocab, drawn.to(vocab.dtype)).clamp_max(max(vocab.numel() - 1, 0))
    hit = vocab[pos] == drawn if vocab.numel() else torch.zeros_like(drawn, dtype=torch.bool)
    column = torch.where(hit, pos, vocab.numel())
    table = torch.zeros(drawn.numel(), vocab.numel() + 1)
    table[torch.arange(drawn.numel()), column] = 1.0
    return local.to(torch.int32), tree.parents, tree.tree_indptr, table


def _tail(path: PathState, order: int, upto: int | None = None) -> list[int]:
    """The last `order` tokens of prompt + path.token_ids[:upto]."""
    own = path.token_ids[:upto] if upto is not None else path.token_ids
    own = own[-order:]
    if len(own) < order:
        return path.prompt.token_ids[len(own) - order:] + own if path.prompt.token_ids else list(own)
    return list(own)
