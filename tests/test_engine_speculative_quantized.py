"""Speculative decoding over the quantized caches (XQuant, XQuant-latent, XQuant-CL, KIVI):
lossless against plain decoding with the same cache kind, and the cache a tree step leaves.

The tiny forkdec.models llama of tests/test_kv_engine.py (fp32, no EOS), its output restricted
to four bytes, with the kinds' 64-token pages: -r0 and -r64 kinds flush a path's pages every 64
tokens, so 130 new tokens cross flush boundaries inside speculative runs.
"""
from __future__ import annotations

import math

import pytest
import torch

import forkdec
from forkdec.engine import Engine, SamplingParams
from forkdec.engine import engine as engine_module
from forkdec.engine import speculative_step
from forkdec.cache.quantized import QuantizedKVCache
from forkdec.xquant.kinds import parse_kind
from test_kv_cache import tiny_model
from test_kv_engine import PROMPT, NoEosTokenizer

pytestmark = pytest.mark.skipif(forkdec._extension.load() is None,
                                reason=f"C++ extension unavailable: {forkdec._extension.error()}")

# the first is 180 bytes (whole quantized prompt pages with -r0); the others repeat, for the drafter
PROMPTS = [PROMPT, "abcabcabcabcab abcabc", "one two one two one two o"]
COUNTS = [2, 1, 2]
GREEDY = SamplingParams(temperature=0, max_new_tokens=130)
SPEC = dict(speculate="ngram", draft_budget=16, draft_adaptive=False)  # verify every draft: trees each step


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny shapes run fastest on one thread, and far faster than two on a loaded 2-core machine,
    where a second intra-op thread mostly waits for a core (minutes instead of seconds here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class FourTokenModel:
    """A forkdec.models llama whose logits allow only the bytes of "abc " (sharpened), so that
    drafts from the prompt's n-grams are often right and often wrong."""
    ALLOWED = [ord(ch) for ch in "abc "]

    def __init__(self, model):
        self.inner = model
        self.config, self.dtype = model.config, model.dtype
        self.layers, self.inv_freq = model.layers, model.inv_freq

    def forward(self, *args, **kwargs):
        logits = self.inner.forward(*args, **kwargs)
        keep = torch.full((logits.shape[-1],), float("-inf"))
        keep[self.ALLOWED] = 0.0
        return logits * 2 + keep


def four_token_engine(kv: str, **kw) -> Engine:
    """The tiny llama of tests/test_kv_engine.py restricted to "abc ": greedy decoding falls into
    repetitions the n-gram drafter finds, so trees are accepted often (the unrestricted model's
    greedy text rarely repeats, and nearly every draft would be rejected)."""
    base = tiny_model(seed=3, vocab_size=272)
    base.config.eos_token_ids = []
    return Engine(FourTokenModel(base), tokenizer=NoEosTokenizer(), kv=kv, **kw)


def _spec(params: SamplingParams) -> SamplingParams:
    return SamplingParams(**{**params.__dict__, **SPEC})


def _count_flushes_in_accept(monkeypatch) -> list[int]:
    """Pages quantized by each keep_accepted call (the flush a tree step defers)."""
    flushed: list[int] = []
    original = QuantizedKVCache.keep_accepted

    def counting(self, *args):
        before = int(self.quant.sum())
        original(self, *args)
        flushed.append(int(self.quant.sum()) - before)

    monkeypatch.setattr(QuantizedKVCache, "keep_accepted", counting)
    return flushed


@pytest.mark.parametrize("kv", ["xquant-latent-4-r0", "xquant-4-r0", "xquant-cl-4-r0", "kivi-4-r64",
                                "xquant-latent-4", "kivi-4"])
def test_greedy_speculation_equals_plain_greedy_with_the_same_quantized_kind(monkeypatch, kv):
    # the default window (R = 128) flushes a path after 192 tokens: a 360-byte prompt flushes instead
    prompts = PROMPTS if "-r" in kv else [PROMPT * 2] + PROMPTS[1:]
    plain = four_token_engine(kv).generate(prompts, n=COUNTS, params=GREEDY, chat=False)
    flushed = _count_flushes_in_accept(monkeypatch)
    eng = four_token_engine(kv)
    spec = eng.generate(prompts, n=COUNTS, params=_spec(GREEDY), chat=False)
    assert [[c.token_ids for c in p] for p in spec] == [[c.token_ids for c in p] for p in plain]
    for sp, pp in zip(spec, plain):
        for s, p in zip(sp, pp):
            assert len(s.token_ids) == 130
            assert s.cumulative_logprob == pytest.approx(p.cumulative_logprob, abs=1e-2)
    stats = eng.last_stats
    assert stats.speculative_steps > 0 and 0 < stats.accepted_draft_tokens < stats.draft_tokens
    assert stats.tokens_per_path_step > 1.2, stats
    if "-r" in kv:  # accepted runs reached flush points: pages flushed after acceptance, not in the forward
        assert sum(flushed) > 0, flushed
    assert eng.cache.allocator.num_used == 0 and eng.cache.allocator.num_reserved == 0
    assert eng.cache.bytes_used == 0 and not bool(eng.cache.quant.any())


def test_speculation_over_a_quantized_cache_keeps_within_a_tight_kv_budget():
    params = SamplingParams(temperature=0, max_new_tokens=100)
    eng = four_token_engine("xquant-4-r0")
    plain = eng.generate(PROMPTS[1], n=5, params=params, chat=False)
    # room for the prompt's page and two paths of 2 pages, and the three sequences' full-precision
    # windows: the others wait; trees must fit the reservations
    budget = (1 + 2 * 2 + 3 * eng.window_pages) * eng.page_bytes
    small = four_token_engine("xquant-4-r0", kv_budget_bytes=budget)
    held = []
    out = small.generate(PROMPTS[1], n=5, params=_spec(params), chat=False,
                         progress=lambda p: held.append((small.cache.bytes_used, p.running_paths)))
    assert [c.token_ids for c in out[0]] == [c.token_ids for c in plain[0]]
    assert small.last_stats.speculative_steps > 0 and small.cache.num_pages == 5 + small.window_pages
    assert max(b for b, _ in held) <= budget and max(r for _, r in held) == 2
    assert small.cache.allocator.num_used == 0 and small.cache.allocator.num_reserved == 0


@pytest.mark.parametrize("kv, residual", [("xquant-4-r0", 0), ("kivi-4-r64", 64)])
def test_drafts_stop_at_the_next_flush_point(kv, residual):
    cache = QuantizedKVCache(parse_kind(kv), tiny_model(vocab_size=272), num_pages=4)
    p = cache.page_size
    # plain decoding flushes a page once R + p tokens are in the window: a root with w tokens in
    # the window before it may have nodes down to depth R + p - 1 - w (the last before the flush)
    assert cache.max_draft_depth([0], 10) == residual + p - 1 - 10
    cache.quant[0] = True  # the path's first page flushed: its tokens left the window
    assert cache.max_draft_depth([0, 1, 2], p + residual + 6) == p - 1 - 6
    assert cache.max_draft_depth([0, 1, 2], p + residual + p - 1) == 0


# ---- what a tree step leaves: logits and cache contents equal plain decoding's ----------------------

def _path_contents(cache: QuantizedKVCache, pages: list[int], kv_len: int) -> tuple[list[bool], dict]:
    """Which of the path's pages are quantized, and per stream its tokens' cached values
    [layers, kv_len, W] fp32 (quantized pages dequantized)."""
    p = cache.page_size
    pages = pages[:-(-kv_len // p)]
    flags = [bool(cache.quant[g]) for g in pages]
    values = {}
    for name, _, _ in cache.streams:
        per_page = []
        for g, quantized in zip(pages, flags):
            if quantized:
                per_page.append(torch.stack([cache.qpages[layer][name].read(torch.tensor([g]))[0]
                                             for layer in range(cache.num_layers)]))
            else:
                per_page.append(cache.fp[name][:, int(cache.slot_of[g])].float())
        values[name] = torch.cat(per_page, dim=1)[:, :kv_len] if per_page else None
    return flags, values


def _record(monkeypatch, speculative: bool) -> tuple[dict, dict]:
    """Hooks that record, keyed by (prompt, path, tokens so far): the next-token logits the
    step computed and the path's cache contents after the step."""
    logits_at, cache_at = {}, {}
    report = engine_module._Run.report

    def reporting(run):
        for path in run.running:
            key = (path.prompt.index, path.index, len(path.token_ids))
            cache_at[key] = (path.kv_len, _path_contents(run.cache, path.pages, path.kv_len))
        report(run)

    monkeypatch.setattr(engine_module._Run, "report", reporting)
    if speculative:
        verify = speculative_step.Speculator.verify

        def verifying(self, run, tree, logits):
            accepted, nodes, bonus = verify(self, run, tree, logits)
            starts = tree.tree_indptr.tolist()
            for b, path in enumerate(run.running):
                rows = [starts[b] + b] + [starts[b] + b + 1 + i for i in nodes[b, :int(accepted[b])].tolist()]
                for j, row in enumerate(rows):
                    logits_at[(path.prompt.index, path.index, len(path.token_ids) + j)] = logits[row].clone()
            return accepted, nodes, bonus

        monkeypatch.setattr(speculative_step.Speculator, "verify", verifying)
    else:
        accept = engine_module._Run.accept

        def accepting(run, paths, logits, row_ids):
            if row_ids is None:  # decode steps (not the first token, drawn from the prompt's logits)
                for path, row in zip(paths, logits.float()):
                    logits_at[(path.prompt.index, path.index, len(path.token_ids))] = row.clone()
            accept(run, paths, logits, row_ids)

        monkeypatch.setattr(engine_module._Run, "accept", accepting)
    return logits_at, cache_at


@pytest.mark.parametrize("kv", ["xquant-latent-4-r0", "xquant-cl-3-r0", "kivi-4-r0"])
def test_every_tree_step_leaves_the_cache_and_logits_of_plain_decoding(monkeypatch, kv):
    params = SamplingParams(temperature=0, max_new_tokens=100)
    with monkeypatch.context() as m:
        plain_logits, plain_cache = _record(m, speculative=False)
        want = four_token_engine(kv).generate(PROMPTS[:2], n=[2, 1], params=params, chat=False)
    spec_logits, spec_cache = _record(monkeypatch, speculative=True)
    got = four_token_engine(kv).generate(PROMPTS[:2], n=[2, 1], params=_spec(params), chat=False)
    assert [[c.token_ids for c in p] for p in got] == [[c.token_ids for c in p] for p in want]
    # every logits row verification used (roots and accepted nodes) is plain decoding's at that position.
    # Tolerance: fp32 rounding of other matmul shapes; KIVI attends its window with q rounded to fp16 and
    # returns fp16 (as a decode step does), so those differences reach the logits as fp16 ulps (~1e-3).
    tol = dict(atol=1e-2, rtol=5e-3) if kv.startswith("kivi") else dict(atol=2e-3, rtol=1e-3)
    assert len(spec_logits) > 100 and set(spec_logits) <= set(plain_logits)
    for key, row in spec_logits.items():
        torch.testing.assert_close(row, plain_logits[key], **tol, msg=lambda m: f"{key}: {m}")
    # after every tree step the path's cache is plain decoding's after as many tokens
    flushed_keys = 0
    for key, (kv_len, (flags, values)) in spec_cache.items():
        want_len, (want_flags, want_values) = plain_cache[key]
        assert kv_len == want_len and flags == want_flags, key
        flushed_keys += any(flags)
        for name, val in values.items():
            if val is None:
                continue
            ref = want_values[name]
            # window rows: fp16 storage of fp32 values computed in another batch shape (one fp16 ulp);
            # quantized rows: a code may round the other way, one step, rarely
            close = torch.isclose(val, ref, atol=2e-3, rtol=2e-3)
            assert close.float().mean() > 0.999, (key, name, (val - ref).abs().max())
    assert flushed_keys > 0, "some checked paths must hold quantized pages of their own"


# ---- sampling: the same distribution as plain sampling with the same kind ----------------------

def test_sampled_speculation_over_a_quantized_cache_matches_plain_sampling():
    # Two-sample test, 4 generated tokens, 2 x 600 paths each way, kv xquant-latent-4-r0 with a 96-token
    # prompt (its first page quantized). Tolerance: chi-square homogeneity p-value > 1e-3 over
    # sequences with >= 5 draws in both runs (the rest pooled), and total variation < 0.12
    # (sampling noise alone gives ~0.07 between two runs of this size).
    eng = four_token_engine("xquant-latent-4-r0")
    prompt = "abc abca bcab cabc ab" * 4 + "abc abca bcab"
    params = SamplingParams(temperature=0.8, top_k=3, max_new_tokens=4, draft_budget=4000, draft_depth=3,
                            draft_adaptive=False)
    counts = []
    for speculate in ("off", "ngram"):
        c: dict[tuple, int] = {}
        for seed in range(2):
            out = eng.generate(prompt, n=600, params=SamplingParams(**{**params.__dict__, "seed": seed,
                                                                        "speculate": speculate}), chat=False)
            for comp in out[0]:
                c[tuple(comp.token_ids)] = c.get(tuple(comp.token_ids), 0) + 1
        counts.append(c)
        if speculate == "ngram":
            s = eng.last_stats
            assert s.draft_tokens > 0 and 0.1 < s.accepted_draft_tokens / s.draft_tokens < 0.9, s
    plain, spec = counts
    assert int(eng.cache.quant.sum()) == 0 and eng.cache.bytes_used == 0
    n = sum(plain.values())
    tv = 0.5 * sum(abs(plain.get(s, 0) - spec.get(s, 0)) for s in set(plain) | set(spec)) / n
    assert tv < 0.12, tv
    big = [s for s in set(plain) | set(spec) if plain.get(s, 0) >= 5 and spec.get(s, 0) >= 5]
    cells = [(plain.get(s, 0), spec.get(s, 0)) for s in big]
    cells.append((n - sum(a for a, _ in cells), n - sum(b for _, b in cells)))
    cells = [(a, b) for a, b in cells if a + b > 0]
    chi2 = sum((a - (a + b) / 2) ** 2 / ((a + b) / 2) + (b - (a + b) / 2) ** 2 / ((a + b) / 2) for a, b in cells)
    dof = len(cells) - 1
    limit = dof * (1 - 2 / (9 * dof) + 3.09 * math.sqrt(2 / (9 * dof))) ** 3  # Wilson-Hilferty, p = 1e-3
    assert chi2 < limit, (chi2, limit, dof)


# ---- the command line and the real model --------------------------------------------------------

def test_cli_generates_with_a_quantized_cache_and_speculation(monkeypatch, tmp_path, capsys):
    import json

    from forkdec.cli import main
    from forkdec.engine import cli
    model = tiny_model(seed=3, vocab_size=272)
    model.config.eos_token_ids = []
    monkeypatch.setattr(cli, "load", lambda path, dtype: (model, NoEosTokenizer()))
    out = tmp_path / "r.json"
    assert main(["generate", "abcabcabcabc", "-n", "2", "--max-new-tokens", "40", "--temperature", "0",
                 "--kv", "xquant-latent-4", "--speculate", "ngram", "--raw", "--json", str(out)]) == 0
    assert "tokens per path per step" in capsys.readouterr().out
    r = json.loads(out.read_text())
    assert r["params"]["speculate"] == "ngram" and r["stats"]["speculative_steps"] > 0


@pytest.mark.parametrize("kv, prompts", [("xquant-latent-4-r0", slice(1, 2)), ("kivi-4-r0", slice(2, 3))])
def test_real_model_greedy_speculation_over_a_quantized_cache_equals_plain_greedy(monkeypatch, kv, prompts):
    # fp32; -r0 flushes every 64 tokens of a path, so accepted runs reach flush points
    from test_engine_speculative import REAL_PROMPTS, check_real_model_greedy

    quantized = []
    original = QuantizedKVCache._quantize_page
    monkeypatch.setattr(QuantizedKVCache, "_quantize_page", lambda self, page: quantized.append(original(self, page)))
    check_real_model_greedy(torch.float32, REAL_PROMPTS[prompts], kv)
    # the chat prompts are shorter than a page: these are the paths' own first pages, in both runs
    assert len(quantized) == 2 * len(REAL_PROMPTS[prompts]), len(quantized)
