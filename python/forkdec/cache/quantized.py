"""QuantizedKVCache: the engine's cache for the XQuant and KIVI kinds.

Pages are the engine's logical pages (one allocator, page tables as for the
fp caches). A page is either in full precision, in a slot of the window pool
(`fp[stream] [layers, slots, page_size, W]`, 16-bit), or quantized in
`qpages[layer][stream]` at its own index. New tokens always land in window
pages; after the last layer of a step, every sequence the step touched moves
its oldest full window pages to quantized storage while R + page_size or more
of its tokens are in the window, so the newest R tokens (at least) stay in
full precision and quantized pages always precede a sequence's window pages.

Attention splits every level's page table of a step into its quantized part
and its window part and merges the parts' states by LSE:
- xquant, xquant-latent: `ops.xquant_attention` reads quantized and window
  pages directly (K, V rematerialized inside the kernel);
- kivi: quantized K/V pages are dequantized and go through `ops.attention`
  (no fused kernel for KIVI yet), window pages go to `ops.attention` as they are;
- xquant-cl: the stream is the residual stream scaled to unit RMS per token
  (RMSNorm without its weight; X = weight_l ⊙ it). Per step, a workspace
  accumulates the dequantized deltas of the quantized pages layer by layer
  (closed loop); X from it goes to `ops.xquant_attention` as float pages.

Paths that share pages (forkdec.engine.session): the caller passes
`read_quantized` (per level and request, the leading pages read quantized) and
owns the flush (`quantize` writes a page's quantized copy and keeps its window
slot; `drop_windows` frees slots), so a page read by paths of different
lengths can be in both states at once and each path reads it as its own decode
would (the rule: forkdec.engine.tree_windows). `copy_prefix` copies a partial
window page on a fork.

Tree verification (a level with a custom mask, forkdec.xquant.tree_step): the
step's own tokens (root and draft nodes, all in the window) are a third part,
attended with the mask's columns over them; nothing is flushed until
`keep_accepted` has moved the accepted nodes' window rows behind the root, so
unverified tokens never reach quantized pages. `max_draft_depth` keeps a tree
within the path's current flush interval: a node beyond it would read in full
precision a page that plain decoding reads quantized, and could be accepted
where plain greedy decoding picks another token.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

import forkdec.ops as ops
from forkdec.cache.allocator import PageAllocator
from forkdec.tree import accepted_kv_slots
from forkdec.validation import require, validation, validation_enabled
from forkdec.xquant.accounting import stream_widths, window_dtype
from forkdec.xquant.kinds import KVKind
from forkdec.xquant.pages import QuantizedPages
from forkdec.xquant.tree_step import mask_columns, rope_keys, slot_positions, values
from forkdec.xquant.weights import layer_weights, rope_tables, unit_rms


@dataclass
class _Part:
    """The quantized or the window part of one cascade level, for every request."""
    quantized: bool
    qo_indptr: Tensor
    kv_indptr: Tensor
    kv_indices: Tensor          # logical pages (quantized) or window slots
    kv_last_page_len: Tensor
    kv_start_pos: Tensor
    causal: bool
    gather: Tensor | None = None  # unique pages/slots read, when the family gathers them
    local: Tensor | None = None   # kv_indices renumbered into `gather`
    mask: Tensor | None = None    # a tree step: flat bool, the tree mask's columns over this part's keys
    rows: Tensor | None = None    # a tree step's own tokens (X families): their window rows, one key each,
    cos: Tensor | None = None     # and RoPE at their true positions [T, D]
    sin: Tensor | None = None


@dataclass
class _Step:
    rows: Tensor                        # [T] rows of the window pool (slot * page_size + offset)
    parts: list[_Part]
    sequences: list[tuple[list[int], int]]  # per request: (window pages in order, window tokens)
    cl_acc: Tensor | None = None        # xquant-cl: accumulated residual stream of the quantized pages read
    cl_pages: Tensor | None = None
    layer: int = -1
    tree: list[tuple[int, int]] | None = None  # a tree step: per path (index in sequences, draft nodes)


class QuantizedKVCache:
    """A quantized cache of `kind` for a forkdec.models model (weights read once).

    num_pages: logical pages (page_size = kind.page_size()). The engine hands
    `make_attend` a StepBatch per step; `bytes_used` is what the cache holds now.
    max_window_slots: the window slots a caller's budget allows (None: unbounded); the
    window pool grows by doubling up to it, then a slot at a time.
    """

    def __init__(self, kind: KVKind, model, num_pages: int, *, device: torch.device | str = "cpu",
                 max_window_slots: int | None = None) -> None:
        require(kind.quantized, "kv", f"{kind.name!r} is not a quantized kind")
        require(num_pages >= 1, "num_pages", f"must be >= 1, got {num_pages}")
        require(max_window_slots is None or max_window_slots >= 1, "max_window_slots",
                f"must be >= 1 or None, got {max_window_slots}")
        cfg = model.config
        self.kind, self.config, self.device = kind, cfg, torch.device(device)
        self.page_size = p = kind.page_size()
        self.streams = stream_widths(kind, cfg)
        self.dtype = window_dtype(kind, model.dtype)
        self.num_layers = cfg.num_layers
        self.weights = [layer_weights(kind, layer, cfg) for layer in model.layers]
        self.eps = cfg.rms_norm_eps
        self.rope_cos, self.rope_sin = rope_tables(model.inv_freq, cfg.max_position_embeddings)
        self.allocator = PageAllocator(num_pages, on_free=self._forget)
        self.qpages = [{name: QuantizedPages.empty(num_pages, p, w, kind.bits, kind.group_size, axis, device)
                        for name, w, axis in self.streams} for _ in range(self.num_layers)]
        self.fp = {name: torch.empty(self.num_layers, 0, p, w, dtype=self.dtype, device=device)
                   for name, w, _ in self.streams}
        self.slot_of = torch.full((num_pages,), -1, dtype=torch.long)
        self.quant = torch.zeros(num_pages, dtype=torch.bool)
        self.start_pos = torch.zeros(num_pages, dtype=torch.long)
        self._free_slots: list[int] = []
        self.max_window_slots = max_window_slots
        self._pending: _Step | None = None  # a tree step waiting for keep_accepted (its flush deferred)

    # ---- memory ---------------------------------------------------------------------------------
    @staticmethod
    def page_bytes(kind: KVKind, config) -> int:
        """Bytes of one quantized page across all layers and streams."""
        p = kind.page_size()
        return config.num_layers * sum(p * w * kind.bits // 8 + 4 * p * w // kind.group_size
                                       for _, w, _ in stream_widths(kind, config))

    @property
    def num_pages(self) -> int:
        return self.slot_of.numel()

    @property
    def window_page_bytes(self) -> int:
        return sum(t[:, 0].numel() * t.element_size() for t in self.fp.values())

    @property
    def bytes_used(self) -> int:
        """Bytes held now: quantized pages (codes, scales, zeros) plus window slots in use."""
        quant = sum(qp.nbytes_per_page() for layer in self.qpages for qp in layer.values())
        slots = self.fp[self.streams[0][0]].shape[1] - len(self._free_slots)
        return int(self.quant.sum()) * quant + slots * self.window_page_bytes

    # ---- window slots ---------------------------------------------------------------------------
    def _slot(self) -> int:
        if not self._free_slots:  # grow the pool; slots are only handed out between steps
            old = self.fp[self.streams[0][0]].shape[1]
            new = max(4, 2 * old)
            if self.max_window_slots is not None:  # past the cap only a wide tree step needs more
                new = max(old + 1, min(new, self.max_window_slots))
            for name, t in self.fp.items():
                self.fp[name] = torch.cat([t, t.new_empty(t.shape[0], new - old, *t.shape[2:])], dim=1)
            self._free_slots = list(range(new - 1, old - 1, -1))
        return self._free_slots.pop()

    def _forget(self, pages: list[int]) -> None:
        for page in pages:
            slot = int(self.slot_of[page])
            if slot >= 0:
                self._free_slots.append(slot)
            self.slot_of[page] = -1
            self.quant[page] = False

    # ---- a step ---------------------------------------------------------------------------------
    def make_attend(self, batch, *, prefill: bool = False, backend: str = "auto",
                    read_quantized: list[list[int]] | None = None):
        """attend(layer, q, k, v, x=, residual=) for one step of `batch` (a StepBatch):
        writes the step's tokens into window pages, attends over quantized and
        window parts, and after the last layer flushes what left the window.

        read_quantized: per level, per request, how many leading pages of its table are read
        quantized (each must hold its quantized copy; the rest must hold window slots). Given,
        the caller owns the flush (`quantize`, `drop_windows`; forkdec.engine.tree_windows);
        None: a page is read quantized iff it is, and the cache flushes itself."""
        step = self._prepare(batch, read_quantized)
        check = [validation_enabled()]

        def attend(layer: int, q: Tensor, k: Tensor, v: Tensor, x: Tensor | None = None,
                   residual: Tensor | None = None) -> Tensor:
            with validation(check[0]):
                check[0] = False
                self._write(layer, step, k, v, x, residual)
                out = self._attend(layer, q, step, backend)
            if layer == self.num_layers - 1 and read_quantized is None:
                if step.tree is None:
                    self._flush(step)
                else:  # flushed by keep_accepted, once the accepted nodes are known
                    self._pending = step
            return out

        attend.needs_layer_input = True  # the model passes x (post-norm) and residual (pre-norm)
        return attend

    def _prepare(self, batch, read_quantized: list[list[int]] | None = None) -> _Step:
        self._pending = None  # a tree step never accepted (an aborted call) leaves nothing to flush
        p = self.page_size
        slots = batch.slots.long().cpu()
        masked = [lv for lv in batch.levels if lv.custom_mask is not None]
        require(len(masked) <= 1, "levels", "a quantized cache takes at most one tree-masked level")
        require(not masked or int(masked[0].qo_indptr[-1]) == slots.numel(), "levels",
                "a tree-masked level's queries must be all of the step's tokens")
        pages, offs = slots // p, slots % p
        for page in torch.unique(pages).tolist():
            require(not bool(self.quant[page]), "slots", f"page {page} is quantized and cannot take new tokens")
            if int(self.slot_of[page]) < 0:
                self.slot_of[page] = self._slot()
        positions = batch.positions.long().cpu()
        if masked:
            self.start_pos[pages] = slot_positions(positions, masked[0].qo_indptr.cpu()) - offs
        else:
            self.start_pos[pages] = positions - offs
        rows = self.slot_of[pages] * p + offs
        quant, slot_of, start = self.quant.tolist(), self.slot_of.tolist(), self.start_pos.tolist()
        parts, sequences = [], []
        tree: list[tuple[int, int]] | None = None
        require(read_quantized is None or not masked and len(read_quantized) == len(batch.levels),
                "read_quantized", "give one list per level (tree-masked steps flush themselves)")
        for li, lv in enumerate(batch.levels):
            indptr, idx, last = lv.kv_indptr.tolist(), lv.kv_indices.tolist(), lv.kv_last_page_len.tolist()
            qo = lv.qo_indptr.tolist()
            qtab: list[list[int]] = []
            ftab: list[list[int]] = []
            flast, qstart, fstart, kv_lens = [], [], [], []
            for b in range(len(indptr) - 1):
                pg = idx[indptr[b]:indptr[b + 1]]
                if read_quantized is None:
                    nq = 0
                    while nq < len(pg) and quant[pg[nq]]:
                        nq += 1
                else:
                    nq = read_quantized[li][b]
                    if validation_enabled():
                        require(0 <= nq <= len(pg) and all(quant[g] for g in pg[:nq])
                                and all(slot_of[g] >= 0 for g in pg[nq:]), "read_quantized",
                                f"level {li} request {b}: {nq} of its {len(pg)} pages cannot be read quantized "
                                f"(each needs its quantized copy, each other page a window slot)")
                window = (len(pg) - nq - 1) * p + last[b] if len(pg) > nq else 0
                kv_lens.append(nq * p + window)
                if lv.custom_mask is not None:
                    require(window >= qo[b + 1] - qo[b], "levels", "a tree step's tokens must be in the window")
                if lv.custom_mask is not None and self.kind.family != "kivi":  # stop before the step's tokens
                    older = window - (qo[b + 1] - qo[b])
                    keep = -(-older // p)
                    ftab.append([slot_of[g] for g in pg[nq:nq + keep]])
                    flast.append(older - (keep - 1) * p if keep else 0)
                else:
                    ftab.append([slot_of[g] for g in pg[nq:]])
                    flast.append(last[b] if len(pg) > nq else 0)
                qtab.append(pg[:nq])
                qstart.append(start[pg[0]] if nq else 0)
                fstart.append(start[pg[nq]] if len(pg) > nq else 0)
                sequences.append((pg[nq:], window))
            if any(qtab):
                parts.append(self._part(True, lv.qo_indptr, qtab, [p if t else 0 for t in qtab], qstart, False))
            if any(ftab):
                parts.append(self._part(False, lv.qo_indptr, ftab, flast, fstart, lv.causal))
            if lv.custom_mask is not None:
                qo_lens = [qo[b + 1] - qo[b] for b in range(len(qo) - 1)]
                first = len(sequences) - len(qo_lens)
                tree = [(first + b, n - 1) for b, n in enumerate(qo_lens)]
                if self.kind.family == "kivi":  # the window part, in one call as in a decode step, masked
                    parts[-1].mask = mask_columns(lv.custom_mask.cpu(), qo_lens, kv_lens,
                                                  [len(t) * p for t in qtab])
                else:
                    parts.append(self._step_tokens(lv, rows, positions, slots, qo_lens, kv_lens))
        step = _Step(rows, parts, sequences, tree=tree)
        if self.kind.family == "xquant-cl":
            step.cl_pages = torch.unique(torch.cat([pt.kv_indices.long() for pt in parts if pt.quantized]
                                                   or [torch.zeros(0, dtype=torch.long)]))
            for pt in parts:
                if pt.quantized:  # renumber into the step's workspace of quantized pages
                    pt.gather, pt.local = step.cl_pages, torch.searchsorted(step.cl_pages, pt.kv_indices.long()).int()
        return step

    def _part(self, quantized: bool, qo_indptr: Tensor, table: list[list[int]], last: list[int],
              start: list[int], causal: bool) -> _Part:
        i32 = torch.int32
        counts = torch.tensor([len(t) for t in table], dtype=torch.long)
        indptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(i32)
        indices = torch.tensor([g for t in table for g in t], dtype=i32)
        part = _Part(quantized, qo_indptr.to(i32), indptr, indices, torch.tensor(last, dtype=i32),
                     torch.tensor(start, dtype=torch.int64), causal)
        if self.kind.family == "kivi" and quantized or self.kind.family == "xquant-cl" and not quantized:
            part.gather, inverse = torch.unique(indices.long(), return_inverse=True)
            part.local = inverse.to(i32)
        return part

    def _step_tokens(self, lv, rows: Tensor, positions: Tensor, slots: Tensor, qo_lens: list[int],
                     kv_lens: list[int]) -> _Part:
        """The part of a tree-masked level over the step's own tokens: request b's rows
        qo_indptr[b]..qo_indptr[b + 1] of the batch, written (in that order) as its newest tokens."""
        p, i32 = self.page_size, torch.int32
        if validation_enabled():
            indptr, idx, qo = lv.kv_indptr.tolist(), lv.kv_indices.tolist(), lv.qo_indptr.tolist()
            for b, (q, k) in enumerate(zip(qo_lens, kv_lens)):
                pg = idx[indptr[b]:indptr[b + 1]]
                want = [pg[i // p] * p + i % p for i in range(k - q, k)]
                require(slots[qo[b]:qo[b + 1]].tolist() == want, "slots",
                        f"request {b} of the tree-masked level: its rows must fill its last {q} slots in order")
        counts = torch.tensor(qo_lens, dtype=torch.long)
        return _Part(False, lv.qo_indptr.to(i32), lv.qo_indptr.to(i32), torch.arange(rows.numel(), dtype=i32),
                     (counts > 0).to(i32), torch.zeros(len(qo_lens), dtype=torch.int64), False, rows=rows,
                     mask=mask_columns(lv.custom_mask.cpu(), qo_lens, kv_lens,
                                       [k - q for q, k in zip(qo_lens, kv_lens)]),
                     cos=self.rope_cos[positions], sin=self.rope_sin[positions])

    # ---- per layer ------------------------------------------------------------------------------
    def _write(self, layer: int, step: _Step, k: Tensor, v: Tensor, x: Tensor | None,
               residual: Tensor | None) -> None:
        family, w = self.kind.family, self.weights[layer]
        if family == "kivi":
            values = {"k": k.reshape(k.shape[0], -1), "v": v.reshape(v.shape[0], -1)}
        else:
            require(x is not None and (family != "xquant-cl" or residual is not None), "x",
                    f"{self.kind.name} caches need the layer input: call attend(layer, q, k, v, x=, residual=)")
            if family == "xquant":
                values = {"x": x}
            elif family == "xquant-cl":
                values = {"x": unit_rms(residual, self.eps)}
            else:
                xf = x.float()
                values = {"k": xf @ w.down_k, "v": xf @ w.down_v}
        for name, val in values.items():
            pool = self.fp[name][layer]
            pool.view(-1, pool.shape[-1])[step.rows] = val.to(self.dtype)

    def _attend(self, layer: int, q: Tensor, step: _Step, backend: str) -> Tensor:
        if self.kind.family == "xquant-cl":
            require(layer == step.layer + 1, "layer", "xquant-cl caches need the layers in order")
            read = self.qpages[layer]["x"].read(step.cl_pages)
            step.cl_acc = read if step.cl_acc is None else step.cl_acc + read
        step.layer = layer
        outs, lses = [], []
        for part in step.parts:
            o, lse = self._attend_part(layer, q, part, step, backend)
            outs.append(o.float())
            lses.append(lse)
        if len(outs) == 1:
            return outs[0].to(q.dtype)
        out, _ = ops.merge_states(torch.stack(outs, 1), torch.stack(lses, 1), backend=backend)
        return out.to(q.dtype)

    def _attend_part(self, layer: int, q: Tensor, part: _Part, step: _Step, backend: str) -> tuple[Tensor, Tensor]:
        family, w = self.kind.family, self.weights[layer]
        if part.rows is not None:
            return self._attend_step_tokens(layer, q, part, backend)
        if family == "kivi":
            hkv, d = self.config.num_kv_heads, self.config.head_dim
            if part.quantized:
                kc = self.qpages[layer]["k"].read(part.gather)
                vc = self.qpages[layer]["v"].read(part.gather)
                indices = part.local
            else:
                kc, vc, indices = self.fp["k"][layer], self.fp["v"][layer], part.kv_indices
            shape = (kc.shape[0], self.page_size, hkv, d)
            qq = q.to(kc.dtype)
            return ops.attention(qq, part.qo_indptr, kc.view(shape), vc.view(shape), part.kv_indptr, indices,
                                 part.kv_last_page_len, causal=part.causal, custom_mask=part.mask,
                                 return_lse=True, backend=backend)
        indices = part.kv_indices
        if family == "xquant-cl":
            u = step.cl_acc if part.quantized else self.fp["x"][layer][part.gather].float()
            xk = xv = u * w.norm  # X = RMSNorm_l(residual) = weight_l ⊙ unit-RMS stream
            indices = part.local
        elif part.quantized:
            xk, xv = (self.qpages[layer]["x"],) * 2 if family == "xquant" else (self.qpages[layer]["k"],
                                                                                self.qpages[layer]["v"])
        else:
            xk, xv = (self.fp["x"][layer],) * 2 if family == "xquant" else (self.fp["k"][layer], self.fp["v"][layer])
        return ops.xquant_attention(q, part.qo_indptr, xk, xv, part.kv_indptr, indices, part.kv_last_page_len,
                                    part.kv_start_pos, w.wk, w.wv, self.rope_cos, self.rope_sin, bk=w.bk, bv=w.bv,
                                    causal=part.causal, return_lse=True, backend=backend)

    def _attend_step_tokens(self, layer: int, q: Tensor, part: _Part, backend: str) -> tuple[Tensor, Tensor]:
        """A tree step's own tokens (X-caching families): K and V from their window rows, RoPE at
        the tokens' true positions, one key per row, under the tree mask."""
        w, d = self.weights[layer], self.config.head_dim
        row = {name: t[layer].view(-1, t.shape[-1])[part.rows] for name, t in self.fp.items()}
        xk, xv = (row["x"], row["x"]) if "x" in row else (row["k"], row["v"])
        if self.kind.family == "xquant-cl":
            xk = xv = xk.float() * w.norm
        k = rope_keys(xk, w.wk, w.bk, part.cos, part.sin, d)
        v = values(xv, w.wv, w.bv, d)
        return ops.attention(q.float(), part.qo_indptr, k[:, None], v[:, None], part.kv_indptr, part.kv_indices,
                             part.kv_last_page_len, custom_mask=part.mask, return_lse=True, backend=backend)

    # ---- after a tree step ----------------------------------------------------------------------
    def max_draft_depth(self, pages: list[int], kv_len: int) -> int:
        """Deepest draft node a path holding `kv_len` own tokens on `pages` may have verified:
        plain decoding flushes the path's oldest window page once R + page_size tokens are in
        the window, and a node past that point must read the page quantized, as plain decoding
        does, not in full precision, as the tree step (which flushes only after acceptance) would."""
        p = self.page_size
        quantized = int(self.quant[pages].sum()) if pages else 0
        return self.kind.residual + p - 1 - (kv_len - quantized * p)

    def keep_accepted(self, node_slots: Tensor, tree_indptr: Tensor, accepted_nodes: Tensor,
                      num_accepted: Tensor) -> None:
        """After the tree step just run: copy each path's accepted nodes' window rows (every layer
        and stream) to the slots after its root, as forkdec.tree.accept_path_kv does for K/V pages
        (same arguments), then flush what has left the window by now. The cache then holds what
        plain decoding of the accepted tokens holds; the engine frees the pages past them."""
        step = self._pending
        require(step is not None and step.tree is not None, "keep_accepted",
                "no tree step is waiting for its accepted nodes")
        self._pending = None
        p = self.page_size
        slots = node_slots.long().cpu()
        rows = self.slot_of[slots // p] * p + slots % p
        src, dst = accepted_kv_slots(rows, tree_indptr.cpu(), accepted_nodes.cpu(), num_accepted.cpu())
        if src.numel():
            for t in self.fp.values():
                flat = t.view(t.shape[0], -1, t.shape[-1])
                flat[:, dst] = flat[:, src]  # the gather copies: sources are read before any write
        for (i, nodes), num in zip(step.tree, num_accepted.tolist()):
            pages, window = step.sequences[i]
            step.sequences[i] = (pages, window - nodes + num)
        self._flush(step)

    # ---- after the last layer -------------------------------------------------------------------
    def _flush(self, step: _Step) -> None:
        limit = self.kind.residual + self.page_size
        for pages, tokens in step.sequences:
            for page in pages:
                if tokens < limit:
                    break
                if not bool(self.quant[page]):  # a prompt's pages appear once per group of its paths
                    self._quantize_page(page)
                tokens -= self.page_size

    # ---- a caller-owned flush (read_quantized given) --------------------------------------------
    def has_window(self, page: int) -> bool:
        return int(self.slot_of[page]) >= 0

    def is_quantized(self, page: int) -> bool:
        return bool(self.quant[page])

    def windowed_pages(self) -> list[int]:
        """Pages holding a window slot now."""
        return torch.nonzero(self.slot_of >= 0).flatten().tolist()

    def quantize(self, pages: list[int]) -> None:
        """Write the quantized copy of each of `pages` (full pages in the window) that has none
        yet; their window slots stay until `drop_windows`."""
        for page in pages:
            if not bool(self.quant[page]):
                require(int(self.slot_of[page]) >= 0, "pages", f"page {page} holds no tokens")
                with torch.inference_mode():
                    self._quantize_page(page, keep_window=True)

    def drop_windows(self, pages: list[int]) -> None:
        """Free the window slots of `pages` (each quantized first if it is not yet)."""
        for page in pages:
            slot = int(self.slot_of[page])
            if slot < 0:
                continue
            self.quantize([page])
            self.slot_of[page] = -1
            self._free_slots.append(slot)

    def copy_prefix(self, src: int, dst: int, tokens: int) -> None:
        """Copy the first `tokens` rows of window page `src` into page `dst` (given a slot), every
        layer and stream: copy on write of a partial page a forked path goes on writing."""
        s = int(self.slot_of[src])
        require(s >= 0 and not bool(self.quant[src]), "src", f"page {src} is not a window page")
        if int(self.slot_of[dst]) < 0:
            self.slot_of[dst] = self._slot()
        d = int(self.slot_of[dst])
        with torch.inference_mode():  # the pool's tensors are made in inference mode (a step's growth)
            for t in self.fp.values():
                t[:, d, :tokens] = t[:, s, :tokens]
        self.start_pos[dst] = self.start_pos[src]
        self.quant[dst] = False

    def _quantize_page(self, page: int, keep_window: bool = False) -> None:
        slot = int(self.slot_of[page])
        if self.kind.family == "xquant-cl":
            # Closed loop: each layer stores x_l minus the reconstruction of the layers below it.
            acc = None
            for layer in range(self.num_layers):
                qp = self.qpages[layer]["x"]
                x = self.fp["x"][layer, slot].float()
                qp.write(page, x if acc is None else x - acc)
                deq = qp.read(torch.tensor([page]))[0]
                acc = deq if acc is None else acc + deq
        else:
            for layer in range(self.num_layers):
                for name, qp in self.qpages[layer].items():
                    qp.write(page, self.fp[name][layer, slot].float())
        self.quant[page] = True
        if not keep_window:
            self.slot_of[page] = -1
            self._free_slots.append(slot)
