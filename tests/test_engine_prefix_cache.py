"""generate's prefix cache (forkdec.cache.prefix_index): prompts that extend a cached prefix
prefill only their new tokens, within one call and across calls, give what a cold prefill
gives, and eviction never takes a page in use."""
from __future__ import annotations

import pytest
import torch

import forkdec
from forkdec.cache import PageAllocator
from forkdec.cache.prefix_index import PrefixIndex
from forkdec.engine import Engine, SamplingParams
from engine_fixtures import ByteTokenizer, TinyLlama, greedy_no_cache

pytestmark = pytest.mark.skipif(forkdec._extension.load() is None,
                                reason=f"C++ extension unavailable: {forkdec._extension.error()}")

SHOTS = "Q: 1+1? A: 2. Q: 2+3? A: 5. Q: 4+4? A: 8. "   # 42 bytes
QUESTIONS = ["Q: 3+3? A:", "Q: 7+1? A:", "Q: 9+0? A:"]


def engine(page_size=5, prefix_cache=True, **kw):
    return Engine(TinyLlama(seed=2), tokenizer=ByteTokenizer(), page_size=page_size, prefix_cache=prefix_cache, **kw)


def test_a_prompt_extending_a_cached_prefix_prefills_only_its_new_tokens():
    eng, cold = engine(), engine(prefix_cache=False)
    params = SamplingParams(temperature=0, max_new_tokens=10, ignore_eos=True)
    eng.generate(SHOTS, 2, params, chat=False)
    assert eng.last_stats.prompt_tokens_reused == 0 and eng.last_stats.prompt_tokens_prefilled == len(SHOTS)
    assert eng.kv_pages_cached == len(SHOTS) // 5 == eng.cache.allocator.num_used
    prompt = SHOTS + QUESTIONS[0]
    [[hit]] = eng.generate(prompt, 1, params, chat=False)
    [[miss]] = cold.generate(prompt, 1, params, chat=False)
    assert eng.last_stats.prompt_tokens_reused == 40   # the shots' 8 whole pages
    assert eng.last_stats.prompt_tokens_prefilled == len(prompt) - 40
    assert cold.last_stats.prompt_tokens_reused == 0
    assert hit.token_ids == miss.token_ids == greedy_no_cache(eng.model, ByteTokenizer().encode(prompt), 10, set())
    assert hit.cumulative_logprob == pytest.approx(miss.cumulative_logprob, abs=1e-4)  # fp32 cache


def test_prompts_sharing_a_prefix_in_one_call_prefill_it_once():
    eng = engine()
    params = SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True)
    prompts = [SHOTS + q for q in QUESTIONS]
    out = eng.generate(prompts, 2, params, chat=False)
    st = eng.last_stats
    # the prompts share the shots and "Q: ": 45 tokens, 9 whole pages, prefilled once
    assert st.prompt_tokens_reused == 2 * 45
    assert st.prompt_tokens_prefilled == sum(len(p) for p in prompts) - 2 * 45
    cold = engine(prefix_cache=False)
    cold_out = cold.generate(prompts, 2, params, chat=False)
    assert cold.last_stats.prompt_tokens_reused == 0 and cold.kv_pages_cached == 0
    for p, paths, cold_paths in zip(prompts, out, cold_out):
        want = greedy_no_cache(eng.model, ByteTokenizer().encode(p), 6, set())
        assert all(c.token_ids == want for c in paths + cold_paths)


def test_logits_after_a_prefix_hit_equal_a_cold_prefill():
    eng = engine(page_size=16)
    params = SamplingParams(temperature=0, max_new_tokens=1, ignore_eos=True)
    eng.generate(SHOTS, 1, params, chat=False)
    seen = {}
    original = eng.model.forward

    def spy(tokens, positions, attend, logits_rows=None):
        out = original(tokens, positions, attend, logits_rows)
        seen.setdefault("logits", out)
        return out

    eng.model.forward = spy
    eng.generate(SHOTS + QUESTIONS[1], 1, params, chat=False)
    assert eng.last_stats.prompt_tokens_reused == 32
    cold = engine(page_size=16, prefix_cache=False)
    cold.model.forward = lambda *a, **k: seen.setdefault("cold", original(*a, **k))
    cold.generate(SHOTS + QUESTIONS[1], 1, params, chat=False)
    torch.testing.assert_close(seen["logits"], seen["cold"], atol=1e-4, rtol=1e-4)


def test_eviction_frees_unused_prefixes_lru_and_never_pages_in_use():
    page = engine().page_bytes
    eng = engine(kv_budget_bytes=30 * page)  # 30 pages of 5 tokens
    params = SamplingParams(temperature=0, max_new_tokens=10, ignore_eos=True)
    for i in range(4):  # 4 distinct prompts of 42+ tokens: 8 whole pages each are cached
        eng.generate(f"{i}" + SHOTS, 1, params, chat=False)
    assert eng.kv_pages_cached <= 30
    held_before = eng.kv_pages_cached
    # a prompt that reuses prompt 3's pages while needing room: older prefixes go first
    out = eng.generate(["3" + SHOTS + QUESTIONS[0]] + [f"x{i}" + SHOTS for i in range(2)], 1, params, chat=False)
    assert eng.last_stats.prompt_tokens_reused >= 40
    for prompt, [c] in zip(["3" + SHOTS + QUESTIONS[0]] + [f"x{i}" + SHOTS for i in range(2)], out):
        assert c.token_ids == greedy_no_cache(eng.model, ByteTokenizer().encode(prompt), 10, set())
    assert eng.cache.allocator.num_used == eng.kv_pages_cached and held_before > 0
    eng.clear_prefix_cache()
    assert eng.cache.allocator.num_used == 0 and eng.kv_pages_cached == 0


def test_the_index_keeps_pages_in_use_and_evicts_least_recently_used_first():
    a = PageAllocator(10)
    idx = PrefixIndex(a, 2)
    assert a.reserve(6)
    p1 = [a.alloc() for _ in range(3)]
    p2 = [a.alloc() for _ in range(3)]
    idx.insert([1, 2, 3, 4, 5, 6], p1)
    idx.insert([7, 8, 9, 9], p2[:2])
    a.free(p1)
    a.free(p2)          # p2[2] was not listed: it is gone; the others are held by the index only
    assert a.num_used == 5 and idx.num_pages == 5
    assert idx.match([1, 2, 3, 4, 0]) == p1[:2]   # touches the first prompt: it is now the most recent
    assert idx.evict(1) == 1 and a.refcount(p1[2]) == 0   # the least recently used leaf
    hold = idx.match([7, 8])
    a.share(hold)       # in use by a sequence
    assert idx.evict(10) == 3   # p1's two pages and p2[1]; p2[0] is in use
    assert a.num_used == 1 and idx.match([7, 8, 9, 9]) == p2[:1]
    a.free(hold)
    assert idx.evict(10) == 1 and a.num_used == 0
