"""Per-step control of `Engine.generate` (on_step, early_stop as one of its hooks), `Engine.stream`,
and the per-token signals in Completion (logprobs, confidences, top logprobs, min_tokens)."""
from __future__ import annotations

import math

import pytest
import torch

import forkdec
from engine_fixtures import ByteTokenizer, TinyLlama, dense_causal_attend

from forkdec.engine import Engine, SamplingParams
from forkdec.reference import token_signals

pytestmark = pytest.mark.skipif(forkdec._extension.load() is None,
                                reason=f"C++ extension unavailable: {forkdec._extension.error()}")

PROMPTS = ["the cat sat on", "a b c d e f"]


def engine(**kw):
    return Engine(TinyLlama(seed=0), tokenizer=ByteTokenizer(), **kw)


def test_stream_gives_the_tokens_generate_gives():
    params = SamplingParams(temperature=0.9, max_new_tokens=12, seed=3)
    whole = engine().generate(PROMPTS, n=3, params=params, chat=False)
    e = engine()
    got: dict[tuple[int, int], list[int]] = {}
    reasons = {}
    for events in e.stream(PROMPTS, n=3, params=params, chat=False):
        for d in events:
            got.setdefault((d.prompt, d.path), []).extend(d.token_ids)
            assert len(d.logprobs) == len(d.token_ids)
            if d.finish_reason:
                reasons[(d.prompt, d.path)] = d.finish_reason
    for p, paths in enumerate(whole):
        for i, c in enumerate(paths):
            assert got[(p, i)] == c.token_ids and reasons[(p, i)] == c.finish_reason
    assert e.last_stats.generated_tokens == sum(len(c.token_ids) for ps in whole for c in ps)


def test_a_hook_stops_single_paths_and_frees_their_pages():
    e = engine()
    seen = []

    def hook(view):
        for d in view.events:
            seen.append((d.prompt, d.path, len(d.token_ids), d.finish_reason))
        if view.step == 3:
            view.stop(0, 1)
    out = e.generate(PROMPTS, n=3, params=SamplingParams(max_new_tokens=10, seed=1, ignore_eos=True), chat=False,
                     on_step=hook)
    assert out[0][1].finish_reason == "stopped" and len(out[0][1].token_ids) == 4  # first token + 3 steps
    assert [c.finish_reason for c in out[0][:1] + out[0][2:] + out[1]] == ["length"] * 5
    assert ((0, 1, 0, "stopped") in seen)
    assert e.cache.allocator.num_used == e.kv_pages_cached  # nothing but the prefix cache holds pages


def test_stopping_paths_admits_waiting_ones():
    # a budget that holds the prompt and one path at a time: the others wait for the stops
    params = SamplingParams(max_new_tokens=16, seed=0, ignore_eos=True)
    one_path = engine(page_size=4).page_bytes * (-(-len(PROMPTS[1]) // 4) + -(-15 // 4))
    e = engine(page_size=4, kv_budget_bytes=one_path, prefix_cache=False)
    started = set()

    def hook(view):
        for d in view.events:
            started.add(d.path)
            if d.finish_reason is None:
                view.stop(d.prompt, d.path)  # each path ends after its first token
    out = e.generate(PROMPTS[1], n=3, params=params, chat=False, on_step=hook)[0]
    assert [c.finish_reason for c in out] == ["stopped"] * 3 and started == {0, 1, 2}
    assert e.last_stats.max_batch <= 1


def test_signals_in_completions_match_the_reference():
    e = engine()
    params = SamplingParams(temperature=0.0, max_new_tokens=6, seed=0, confidence_k=5, top_logprobs=3)
    c = e.generate(PROMPTS[0], n=1, params=params, chat=False)[0][0]
    assert len(c.token_logprobs) == len(c.token_confidences) == len(c.top_logprobs) == len(c.token_ids)
    assert math.isclose(sum(c.token_logprobs), c.cumulative_logprob, rel_tol=1e-6)
    # greedy: the drawn token is the most likely one; its logprob heads the top list
    for tok, lp, top in zip(c.token_ids, c.token_logprobs, c.top_logprobs):
        assert top[0][0] == tok and top[0][1] == pytest.approx(lp, abs=1e-5) and len(top) == 3
    # the first token's signals from the prompt's logits without any cache, by the reference op
    ids = ByteTokenizer().encode(PROMPTS[0])
    with torch.no_grad():
        logits = TinyLlama(seed=0).forward(torch.tensor(ids), torch.arange(len(ids)), dense_causal_attend,
                                           logits_rows=torch.tensor([len(ids) - 1]))
    lp, top, top_ids, conf = token_signals(logits, torch.tensor([c.token_ids[0]]), num_top=5)
    assert c.token_confidences[0] == pytest.approx(float(conf[0]), abs=1e-4)
    assert c.token_logprobs[0] == pytest.approx(float(lp[0]), abs=1e-4)
    assert [t for t, _ in c.top_logprobs[0]] == top_ids[0, :3].tolist()


def test_min_tokens_masks_the_stop_tokens():
    e = engine()
    vocab = 272
    params = SamplingParams(max_new_tokens=6, seed=0, min_tokens=6,
                            stop_token_ids=tuple(t for t in range(vocab) if t != ord("x")))
    c = e.generate(PROMPTS[0], n=2, params=params, chat=False)[0]
    assert [x.text for x in c] == ["xxxxxx"] * 2 and [x.finish_reason for x in c] == ["length"] * 2


@pytest.mark.parametrize("kw,arg", [(dict(min_tokens=-1), "min_tokens"), (dict(min_tokens=9), "min_tokens"),
                                    (dict(confidence_k=2, speculate="ngram"), "speculate"),
                                    (dict(top_logprobs=True), "top_logprobs")])
def test_bad_signal_params_name_the_argument(kw, arg):
    with pytest.raises(ValueError, match=arg):
        SamplingParams(max_new_tokens=8, **kw)
