"""Beam search and step-level tree search on the tree session against plain references
that decode every hypothesis from scratch with no cache (tiny random llama)."""
from __future__ import annotations

import pytest
import torch

import forkdec
from forkdec import reference
from forkdec.engine import Engine, SamplingParams
from forkdec.engine.session import Session
from forkdec.search import beam_search, tree_search
from engine_fixtures import EOS, ByteTokenizer, TinyLlama, dense_causal_attend

pytestmark = pytest.mark.skipif(forkdec._extension.load() is None,
                                reason=f"C++ extension unavailable: {forkdec._extension.error()}")

PROMPT = "the quick brown fox j"


def engine(page_size=5, eos_bias=0.0):
    return Engine(TinyLlama(seed=1, eos_bias=eos_bias), tokenizer=ByteTokenizer(), page_size=page_size)


def next_logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        logits = model.forward(torch.tensor(ids), torch.arange(len(ids)), dense_causal_attend,
                               logits_rows=torch.tensor([len(ids) - 1]))
    return torch.log_softmax(logits[0].float(), -1).double()


def reference_beam_search(model, prompt: list[int], width: int, max_new: int, alpha: float, ends: set[int]):
    """Hugging Face's beam search with early_stopping=True, in plain Python over full recomputes."""
    beams = [([], 0.0)]
    pool = []
    for length in range(1, max_new + 1):
        cands = []
        for b, (ids, lp) in enumerate(beams):
            row = next_logprobs(model, prompt + ids)
            cands += [(lp + float(row[t]), b, t) for t in range(row.numel())]
        cands.sort(key=lambda c: (-c[0], c[1] * 10 ** 6 + c[2]))
        cands = cands[:2 * width]
        new = []
        for rank, (score, b, t) in enumerate(cands):
            ids = beams[b][0] + [t]
            if t in ends:
                if rank < width:
                    pool.append((score / length ** alpha, ids, score))
                continue
            if len(new) < width:
                new.append((ids, score))
        pool = sorted(pool, key=lambda h: -h[0])[:width]
        if len(pool) >= width:
            break
        if length == max_new:
            pool = sorted(pool + [(s / length ** alpha, ids, s) for ids, s in new], key=lambda h: -h[0])[:width]
        beams = new
    return pool


@pytest.mark.parametrize("width,alpha,eos_bias", [(1, 1.0, 0.0), (3, 1.0, 1.5), (4, 0.5, 2.0), (4, 1.0, 2.5)])
def test_beam_search_equals_a_brute_force_reference(width, alpha, eos_bias):
    eng = engine(eos_bias=eos_bias)
    s = Session(eng)
    got = beam_search(s, PROMPT, width=width, max_new_tokens=8, length_penalty=alpha, chat=False)
    want = reference_beam_search(eng.model, ByteTokenizer().encode(PROMPT), width, 8, alpha, {EOS})
    assert [b.token_ids for b in got] == [ids for _, ids, _ in want]
    for b, (score, _, lp) in zip(got, want):
        assert b.cumulative_logprob == pytest.approx(lp, abs=1e-4)
        assert b.score == pytest.approx(score, abs=1e-4)
    assert s.alloc.num_used == s.prefix.num_pages and s.alloc.num_reserved == 0


def reference_tree_search(model, prompt, branch, keep, params, boundary, score, max_steps, seed, max_new):
    """The tree search's policy with each path decoded alone from scratch (dense attention),
    each with its own generator: one uniform per token."""
    tok = ByteTokenizer()
    next_seed = [seed]

    def seeds(k):
        out = list(range(next_seed[0], next_seed[0] + k))
        next_seed[0] += k
        return out

    def sample(ids, gen):
        with torch.inference_mode():
            logits = model.forward(torch.tensor(ids), torch.arange(len(ids)), dense_causal_attend,
                                   logits_rows=torch.tensor([len(ids) - 1])).float()
        t = int(reference.sample(logits, torch.rand(1, generator=gen), temperature=params.temperature)[0])
        return t, float(torch.log_softmax(logits[0], -1)[t])

    # a path: dict(ids, lps, gen, seg, state)
    def new(ids, lps, s, seg):
        return dict(ids=ids, lps=lps, gen=torch.Generator().manual_seed(s), seg=seg, state="running", boundary=True)

    def advance(p):  # draw one token after p's ids
        t, lp = sample(prompt + p["ids"], p["gen"])
        p["ids"].append(t)
        p["lps"].append(lp)
        if t == EOS or len(p["ids"]) >= max_new:
            p["state"] = "finished"
        elif p["boundary"] and any(b in tok.decode(p["ids"][p["seg"]:]) for b in boundary):
            p["state"] = "paused"

    live = [new([], [], s, 0) for s in seeds(branch)]
    for p in live:
        advance(p)
    finished, rounds = [], 0
    while True:
        while any(p["state"] == "running" for p in live):
            for p in live:
                if p["state"] == "running":
                    advance(p)
        finished += [p for p in live if p["state"] == "finished"]
        paused = [p for p in live if p["state"] == "paused"]
        if not paused:
            break
        best = sorted(paused, key=lambda p: -score(p["lps"]))[:keep]
        rounds += 1
        if rounds > max_steps:
            for p in best:
                p["boundary"], p["state"] = False, "running"
            live = best
            continue
        live = []
        for p in best:
            for s in seeds(branch):
                live.append(new(list(p["ids"]), list(p["lps"]), s, len(p["ids"]) - 1))
    return sorted(([score(p["lps"]), p["ids"]] for p in finished), key=lambda t: -t[0])


def test_tree_search_equals_a_plain_reference_of_the_same_policy():
    eng = engine(page_size=4, eos_bias=2.0)
    s = Session(eng)
    params = SamplingParams(temperature=1.0, max_new_tokens=30)
    mean = lambda lps: sum(lps) / len(lps)
    got = tree_search(s, PROMPT, branch=3, keep=2, params=params, boundary=tuple("aeiou"), max_steps=3, seed=7,
                      chat=False, score=lambda sess, i: mean(sess.path(i).token_logprobs))
    want = reference_tree_search(eng.model, ByteTokenizer().encode(PROMPT), 3, 2, params, "aeiou", mean, 3, 7, 30)
    assert len(s.paths) > 12 and len(want) >= 4  # several rounds of branching happened
    assert [s.path(i).token_ids for _, i in got] == [ids for _, ids in want]
    assert [sc for sc, _ in got] == pytest.approx([sc for sc, _ in want], abs=1e-4)
    assert s.alloc.num_used == s.prefix.num_pages and s.alloc.num_reserved == 0


def test_a_score_function_that_raises_is_a_value_error_and_the_session_stays_usable():
    eng = engine(page_size=4)
    s = Session(eng)
    params = SamplingParams(temperature=1.0, max_new_tokens=30, ignore_eos=True)

    def bad(sess, i):
        raise RuntimeError("boom")

    with pytest.raises(ValueError, match="^score:"):
        tree_search(s, PROMPT, branch=2, keep=1, params=params, boundary=("e",), score=bad, chat=False)
    assert s.alloc.num_used == s.prefix.num_pages and s.alloc.num_reserved == 0
    got = beam_search(s, PROMPT, width=2, max_new_tokens=4, chat=False)
    assert len(got) == 2
