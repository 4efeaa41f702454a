"""vLLM and SGLang KV-cache layouts as forkdec page tables, by index arithmetic only.

forkdec's attention ops read any cache laid out as [num_pages, page_size, Hkv, D]
(strides allowed, the last dimension contiguous) through a CSR page table:
kv_indptr [B+1], kv_indices [nnz], kv_last_page_len [B] (docs/attention.md).

- vLLM's paged cache is that layout with page = block: `kv_cache[0]`/`kv_cache[1]`
  of its `[2, num_blocks, block_size, Hkv, D]` tensor are k_cache/v_cache as
  they are. Row b of the block table lists request b's blocks; its first
  ceil(seq_len / block_size) entries are its pages. vLLM's slot mapping
  (block * block_size + offset) is exactly the slot `forkdec.ops.append_kv` takes.
- SGLang's token-level pool is the same layout with page_size 1: the token pool
  `[size, Hkv, D]` viewed as `[size, 1, Hkv, D]`, and row req_pool_indices[b] of
  `req_to_token` lists request b's token slots; its first seq_lens[b] are its pages.

Only these small int32 index tensors are built; the caches are never touched.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from forkdec.ops.attention import CascadeLevel
from forkdec.validation import require, validation_enabled


@dataclass(frozen=True)
class PageTable:
    """forkdec's page table for B requests: int32 kv_indptr [B+1], kv_indices [nnz],
    kv_last_page_len [B] (0 for a request with no keys)."""
    kv_indptr: Tensor
    kv_indices: Tensor
    kv_last_page_len: Tensor


def _require_table(table: Tensor, name: str) -> None:
    require(isinstance(table, Tensor) and table.dim() == 2 and not table.is_floating_point()
            and table.dtype != torch.bool, name, "must be a 2-D integer tensor")


def _require_lens(lens: Tensor, name: str, rows: int, limit: int, limit_text: str) -> None:
    require(isinstance(lens, Tensor) and lens.dim() == 1 and not lens.is_floating_point()
            and lens.dtype != torch.bool, name, "must be a 1-D integer tensor")
    require(lens.numel() == rows, name, f"has {lens.numel()} entries, expected {rows}")
    require(lens.numel() == 0 or int(lens.min()) >= 0, name, "must be non-negative")
    require(lens.numel() == 0 or int(lens.max()) <= limit, name,
            f"longest sequence {int(lens.max()) if lens.numel() else 0} exceeds {limit_text} = {limit}")


def _ragged_rows(table: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """The first counts[i] entries of each row of `table`, concatenated, and their indptr."""
    indptr = torch.zeros(counts.numel() + 1, dtype=torch.int32, device=table.device)
    torch.cumsum(counts, 0, out=indptr[1:])
    cols = torch.arange(table.shape[1], device=table.device)
    keep = cols[None, :] < counts[:, None].to(table.device)
    # Boolean indexing walks row-major, so each row's entries stay contiguous and in order.
    return indptr, table[keep].to(torch.int32)


def from_vllm_block_table(block_table: Tensor, seq_lens: Tensor, block_size: int, *,
                          num_blocks: int | None = None) -> PageTable:
    """vLLM's block table as a forkdec page table over its cache, with page = block.

    block_table [num_seqs, max_blocks] int32/int64: request b's blocks in order
        (entries past its last block are ignored, whatever they hold).
    seq_lens [num_seqs]: request b's KV length, new tokens included (vLLM's seq_lens).
    block_size: vLLM's block size = forkdec's page_size.
    num_blocks: the cache's first dimension; if given, used block ids are checked
        against it (the ops check them again when validation is on).
    Pass k_cache = kv_cache[0], v_cache = kv_cache[1] ([num_blocks, block_size, Hkv, D]
    views) and qo_indptr = vLLM's query_start_loc to `forkdec.ops.attention`.
    """
    require(isinstance(block_size, int) and block_size >= 1, "block_size", f"must be an int >= 1, got {block_size!r}")
    _require_table(block_table, "block_table")
    if validation_enabled():
        _require_lens(seq_lens, "seq_lens", block_table.shape[0], block_table.shape[1] * block_size,
                      "max_blocks * block_size")
    counts = (seq_lens.long() + block_size - 1) // block_size
    indptr, indices = _ragged_rows(block_table, counts)
    if validation_enabled() and num_blocks is not None:
        require(indices.numel() == 0 or (int(indices.min()) >= 0 and int(indices.max()) < num_blocks),
                "block_table", f"block ids of the used entries must be in [0, num_blocks = {num_blocks})")
    last = torch.where(counts > 0, seq_lens.long() - (counts - 1) * block_size, 0).to(torch.int32)
    return PageTable(indptr, indices, last)


def from_sglang_req_to_token(req_to_token: Tensor, req_pool_indices: Tensor, seq_lens: Tensor, *,
                             pool_size: int | None = None) -> PageTable:
    """SGLang's token-level cache (page size 1) as a forkdec page table.

    req_to_token [max_reqs, max_context] int32/int64: row r lists the KV-pool slots of
        the request held in pool row r, in token order.
    req_pool_indices [B]: the pool row of each request in the batch.
    seq_lens [B]: request b's KV length (its first seq_lens[b] slots are used).
    pool_size: the token pool's size; if given, used slots are checked against it.
    Pass k_cache = k_buffer.view(size, 1, Hkv, D) (likewise v) to the ops.
    """
    _require_table(req_to_token, "req_to_token")
    require(isinstance(req_pool_indices, Tensor) and req_pool_indices.dim() == 1
            and not req_pool_indices.is_floating_point() and req_pool_indices.dtype != torch.bool,
            "req_pool_indices", "must be a 1-D integer tensor")
    if validation_enabled():
        rows = req_to_token.shape[0]
        require(req_pool_indices.numel() == 0 or (int(req_pool_indices.min()) >= 0
                                                  and int(req_pool_indices.max()) < rows),
                "req_pool_indices", f"pool rows must be in [0, {rows})")
        _require_lens(seq_lens, "seq_lens", req_pool_indices.numel(), req_to_token.shape[1],
                      "req_to_token's max_context")
    # Gathering the batch's rows copies B x max_context indices, never the cache.
    table = req_to_token.index_select(0, req_pool_indices.to(device=req_to_token.device, dtype=torch.long))
    indptr, indices = _ragged_rows(table, seq_lens.long())
    if validation_enabled() and pool_size is not None:
        require(indices.numel() == 0 or (int(indices.min()) >= 0 and int(indices.max()) < pool_size),
                "req_to_token", f"slots of the used entries must be in [0, pool_size = {pool_size})")
    last = (seq_lens > 0).to(torch.int32)
    return PageTable(indptr, indices, last)


def token_pool_as_pages(buffer: Tensor) -> Tensor:
    """SGLang's per-layer token pool [size, Hkv, D] as forkdec pages [size, 1, Hkv, D] (a view)."""
    require(isinstance(buffer, Tensor) and buffer.dim() == 3, "buffer",
            f"expected a [size, Hkv, D] token pool, got {tuple(buffer.shape) if isinstance(buffer, Tensor) else buffer!r}")
    return buffer.unsqueeze(1)


def vllm_cascade_levels(block_table: Tensor, seq_lens: Tensor, query_start_loc: Tensor, block_size: int,
                        common_prefix_len: int) -> list[CascadeLevel]:
    """vLLM's prefix-cached batch as a two-level forkdec cascade (`forkdec.ops.cascade_attention`).

    All requests' block tables start with the same blocks holding the first
    common_prefix_len tokens (a multiple of block_size, as vLLM computes it),
    and every request's queries come after that prefix. Level 0: one group with
    every query row over the shared blocks (read once, no mask); level 1: each
    request over its own remaining blocks, causal. query_start_loc [B+1] is
    vLLM's (forkdec's qo_indptr); the other arguments as in from_vllm_block_table.
    """
    require(isinstance(common_prefix_len, int) and common_prefix_len >= 0
            and common_prefix_len % block_size == 0, "common_prefix_len",
            f"must be a non-negative multiple of block_size = {block_size}, got {common_prefix_len!r}")
    _require_table(block_table, "block_table")
    shared = common_prefix_len // block_size
    require(shared <= block_table.shape[1], "common_prefix_len", "is longer than the block table")
    q_lens = (query_start_loc[1:] - query_start_loc[:-1]).long()
    if validation_enabled():
        require(block_table.shape[0] > 0, "block_table", "a cascade needs at least one request")
        require(bool((block_table[:, :shared] == block_table[:1, :shared]).all()), "block_table",
                f"the first {shared} blocks must be the same in every row (the shared prefix)")
        require(bool((seq_lens.long() - q_lens >= common_prefix_len).all()), "common_prefix_len",
                "every request's queries must come after the shared prefix")
    total_q = int(query_start_loc[-1])
    dev = block_table.device
    level0 = CascadeLevel(
        torch.tensor([0, total_q], dtype=torch.int32, device=dev),
        torch.tensor([0, shared], dtype=torch.int32, device=dev),
        block_table[0, :shared].to(torch.int32),
        torch.tensor([block_size if shared else 0], dtype=torch.int32, device=dev))
    own = from_vllm_block_table(block_table[:, shared:], seq_lens.long() - common_prefix_len, block_size)
    level1 = CascadeLevel(query_start_loc.to(torch.int32), own.kv_indptr, own.kv_indices, own.kv_last_page_len,
                          causal=True)
    return [level0, level1]


def common_prefix_blocks(block_table: Tensor, seq_lens: Tensor, query_start_loc: Tensor, block_size: int) -> int:
    """How many leading blocks every request of a vLLM batch shares and has fully computed
    (all its queries come after them): the level 0 that `vllm_cascade_levels` can use.
    vLLM's prefix caching gives requests with a common prefix the same block ids."""
    if block_table.shape[0] < 2 or block_table.shape[1] == 0:
        return 0
    same = (block_table == block_table[:1]).all(0).long()
    leading = int(same.cumprod(0).sum())
    computed = int(((seq_lens.long() - (query_start_loc[1:] - query_start_loc[:-1]).long()) // block_size).min())
    return max(0, min(leading, computed))
