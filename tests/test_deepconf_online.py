"""DeepConf online on a Session against the offline replay of the same rule
(forkdec.strategies.simulate_online) over the same paths decoded in full."""
from __future__ import annotations

import pytest

import forkdec
from engine_fixtures import ByteTokenizer, TinyLlama

from forkdec.engine import Engine, SamplingParams
from forkdec.engine.session import Session
from forkdec.search import deepconf_online
from forkdec.strategies.deepconf import simulate_online, stop_position

pytestmark = pytest.mark.skipif(forkdec._extension.load() is None,
                                reason=f"C++ extension unavailable: {forkdec._extension.error()}")
PROMPT = "3 + 4 = "


def session():
    return Session(Engine(TinyLlama(seed=0, eos_bias=1.0), tokenizer=ByteTokenizer()))


class _Full:
    def __init__(self, p, tok):
        self.token_ids, self.token_confidences = p.token_ids, p.token_confidences
        self.finish_reason, self.text = p.finish_reason, tok.decode(p.token_ids)


@pytest.mark.parametrize("keep,tau,batch", [(10.0, None, None), (90.0, None, None), (90.0, 0.6, 1), (10.0, 0.6, 1)])
def test_online_equals_the_replay_of_full_paths(keep, tau, batch):
    """With tau, one path at a time (batch 1) so that paths end in the replay's order."""
    n, warmup, window = 12, 4, 4
    params = SamplingParams(temperature=1.0, max_new_tokens=24, seed=5, confidence_k=20)
    s = session()
    run = deepconf_online(s, PROMPT, n, params, keep=keep, warmup=warmup, window=window, tau=tau, batch=batch,
                          chat=False)
    full = session()
    ids = full.start(PROMPT, n, params, chat=False, seeds=[5 + i for i in range(n)])
    full.run()
    paths = [_Full(full.path(i), ByteTokenizer()) for i in ids]
    replay = simulate_online(paths, warmup=warmup, keep=keep, window=window, tau=tau)
    assert run.threshold == pytest.approx(replay.threshold, rel=1e-5)
    assert run.generated_tokens == replay.generated_tokens and len(run.paths) == replay.paths_run
    assert run.vote.answer == replay.vote.answer
    for k, pid in enumerate(run.paths):
        got = s.path(pid)
        stop = stop_position(paths[k].token_confidences, run.threshold, window)
        if pid in run.stopped:
            assert got.finish_reason == "stopped" and len(got.token_ids) == stop
            assert got.token_ids == paths[k].token_ids[:stop]  # the same path, cut where the rule says
        else:
            assert got.token_ids == paths[k].token_ids
    if tau is None:
        assert (keep == 10.0) <= (len(run.stopped) > 0)  # DeepConf-low's high threshold stops some paths here
    else:
        assert run.consensus_stop and run.paths_not_started > 0  # consensus ends the run early here
    s.close()
    assert s.pages_in_use == (s.prefix.num_pages if s.prefix is not None else 0)


@pytest.mark.parametrize("kw,arg", [(dict(n=1), "n"), (dict(prompt="  "), "prompt"), (dict(warmup=12), "warmup"),
                                    (dict(window=0), "window"), (dict(keep=100), "keep"), (dict(batch=0), "batch")])
def test_bad_arguments_name_them(kw, arg):
    call = dict(n=12, keep=10.0)
    call.update(kw)
    n, prompt = call.pop("n"), call.pop("prompt", PROMPT)
    with pytest.raises(ValueError, match=f"^{arg}:"):
        deepconf_online(session(), prompt, n, SamplingParams(max_new_tokens=8), chat=False, **call)


@pytest.mark.parametrize("budget_pages,tau", [(None, 0.95), (None, None), (40, None), (10, None)])
def test_many_prompts_side_by_side_equal_each_alone(budget_pages, tau):
    """Searches of several prompts in one Session (queued when the KV budget is short)
    keep, cut and vote exactly as each run alone. (With a consensus tau and a short
    budget they may not: fewer paths run at once, so consensus is checked between
    other starts, as with a smaller `batch`.)"""
    from forkdec.search.deepconf_online import OnlineSearch, deepconf_online_many

    prompts = ["3 + 4 = ", "12 - 5 = ", "2 * 8 = "]
    params = SamplingParams(temperature=1.0, max_new_tokens=16, seed=9, confidence_k=20)
    alone = []
    for p in prompts:
        s = session()
        run = deepconf_online(s, p, 8, params, keep=10.0, window=4, tau=tau, chat=False)
        alone.append((run, [s.path(i).token_ids for i in run.paths]))
    engine = Engine(TinyLlama(seed=0, eos_bias=1.0), tokenizer=ByteTokenizer())
    if budget_pages is not None:
        engine = Engine(engine.model, tokenizer=ByteTokenizer(), kv_budget_bytes=budget_pages * engine.page_bytes)
    s = Session(engine)
    searches = [OnlineSearch(s, p, 8, params, keep=10.0, window=4, tau=tau, chat=False) for p in prompts]
    seen = []
    runs = deepconf_online_many(s, searches, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 3), (2, 3), (3, 3)]
    for run, (want, tokens) in zip(runs, alone):
        assert [s.path(i).token_ids for i in run.paths] == tokens
        assert run.generated_tokens == want.generated_tokens and run.vote.answer == want.vote.answer
        assert len(run.stopped) == len(want.stopped) and run.threshold == pytest.approx(want.threshold)
    s.close()
    assert s.pages_in_use == s.prefix.num_pages
