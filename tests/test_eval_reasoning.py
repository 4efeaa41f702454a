"""forkdec eval reasoning: the questions, the strategies' bookkeeping (on the tiny
model: the same paths, real DeepConf online runs), the offline confidence scoring (on
the real model), bad input."""
from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

from forkdec.cli import main
from forkdec.engine.params import SamplingParams
from forkdec.eval.arith import arith_problems
from forkdec.eval.reasoning import Question, evaluate, load_questions, parse_budgets, parse_strategies
from engine_fixtures import EOS, ByteTokenizer, TinyLlama


def test_arith_problems_are_reproducible_and_exact():
    a, b = arith_problems(30, seed=3), arith_problems(10, seed=3)
    assert a[:10] == b  # problem i does not depend on the count
    assert a != arith_problems(30, seed=4)
    p = arith_problems(1, seed=3, steps=1)[0]
    # "X has A items. Then ... B ... How many": recompute the answer from the text
    import re
    numbers = [int(n) for n in re.findall(r"\d+", p.question)]
    gained = "buys" in p.question or "gives " + p.question.split()[0] in p.question
    assert int(p.answer) == (numbers[0] + numbers[1] if gained else numbers[0] - numbers[1])
    assert all(int(q.answer) >= 1 for q in a)


def test_load_questions_reads_gsm8k_style_jsonl(tmp_path):
    f = tmp_path / "q.jsonl"
    f.write_text(json.dumps({"question": "1+1?", "answer": "It is 1+1=<<1+1=2>>2.\n#### 2"}) + "\n"
                 + json.dumps({"question": "Half of 3?", "answer": "1.50"}) + "\n")
    qs = load_questions(str(f))
    assert [(q.question, q.answer) for q in qs] == [("1+1?", "2"), ("Half of 3?", "1.5")]
    assert len(load_questions("arith", limit=5)) == 5


@pytest.mark.parametrize("content,match", [
    ('{"q": "x", "a": "1"}\n', "no question/answer"),
    ("not json\n", "not JSON"),
    ("", "no question"),
])
def test_bad_data_file_names_the_argument(tmp_path, content, match):
    f = tmp_path / "bad.jsonl"
    f.write_text(content)
    with pytest.raises(ValueError, match=f"^data: .*{match}"):
        load_questions(str(f))
    with pytest.raises(ValueError, match="^data: cannot read"):
        load_questions(str(tmp_path / "missing.jsonl"))


def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"prompt": "x"}\n')
    for argv, arg in ((["--data", str(f)], "data"), (["--data", "arith", "--strategies", "majority,vibes"],
                                                     "strategies"),
                      (["--data", "arith", "--n", "8,0"], "n"), (["--data", "arith", "--window", "0"], "window")):
        assert main(["eval", "reasoning", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"forkdec eval: {arg}:"), err


def test_parse_lists():
    assert parse_strategies("majority, greedy") == ["majority", "greedy"]
    assert parse_budgets("8,32") == [8, 32]


@dataclass
class FakeCompletion:
    text: str
    token_ids: list
    finish_reason: str
    cumulative_logprob: float
    finish_order: int
    token_confidences: list


class DigitLlama(TinyLlama):
    """The tiny model writing only digits and its end token, so its paths carry answers."""
    def forward(self, *args, **kwargs):
        logits = super().forward(*args, **kwargs)
        allowed = torch.full((logits.shape[-1],), float("-inf"))
        allowed[ord("0"):ord("9") + 1] = 0.0
        allowed[EOS] = 0.0
        return logits + allowed


def digit_engine():
    from forkdec.engine.engine import Engine
    return Engine(DigitLlama(seed=2, eos_bias=2.0), tokenizer=ByteTokenizer())


def test_evaluate_scores_each_strategy_on_the_paths_it_decodes():
    """Every sampled strategy is scored on the same Session paths (path i: seed + i), DeepConf
    online is a real run whose paths are prefixes of those, and the tallies are what direct
    runs of the same pieces give."""
    from forkdec.engine.session import Session
    from forkdec.search import deepconf_online
    from forkdec.strategies import best_logprob, majority_vote

    engine, n, window = digit_engine(), 6, 2
    params = SamplingParams(temperature=1.0, max_new_tokens=8, seed=3)
    sampled = SamplingParams(temperature=1.0, max_new_tokens=8, seed=3, confidence_k=20)
    prompts = ["1 + 2 = ?", "4 + 4 = ?", "9 - 3 = ?"]
    direct = Session(engine)
    full = [[direct.path(i) for i in direct.start(engine.encode(p), n, sampled)] for p in prompts]
    direct.run()
    texts = [[engine.tokenizer.decode(p.token_ids) for p in paths] for paths in full]

    def as_paths(k):
        return [FakeCompletion(t, p.token_ids, p.finish_reason, p.cumulative_logprob, i, p.token_confidences)
                for i, (t, p) in enumerate(zip(texts[k], full[k]))]
    majority = [majority_vote(as_paths(k)).answer for k in range(3)]
    assert any(m is not None for m in majority)
    # questions whose answers the majority of q0 and q2 hits, q1 misses
    questions = [Question(prompts[0], str(majority[0])), Question(prompts[1], "nope"), Question(prompts[2], str(majority[2]))]
    online = {keep: [deepconf_online(Session(engine), p, n, sampled, keep=keep, window=window) for p in prompts]
              for keep in (10.0, 90.0)}

    names = ["majority", "best-logprob", "deepconf-low", "deepconf-online-low", "deepconf-online-high",
             "first-finish-replay"]
    r = evaluate(engine, questions, names, [n], params, window=window)
    t = {s: r.tallies[s][n] for s in names}
    every = sum(len(p.token_ids) for paths in full for p in paths)
    assert t["majority"].generated_tokens == t["best-logprob"].generated_tokens == every
    assert t["majority"].correct == sum(m == q.answer for m, q in zip(majority, questions)) >= 1
    assert t["best-logprob"].correct == sum(best_logprob(as_paths(k)).answer == q.answer
                                            for k, q in enumerate(questions))
    for s, keep in (("deepconf-online-low", 10.0), ("deepconf-online-high", 90.0)):
        runs = online[keep]
        assert t[s].generated_tokens == sum(run.generated_tokens for run in runs) <= every
        assert t[s].correct == sum(run.vote.answer == q.answer for run, q in zip(runs, questions))
        assert not t[s].seconds_estimated
    # DeepConf online's path i is a prefix of the full run's path i (same seed)
    s = Session(engine)
    run = deepconf_online(s, prompts[0], n, sampled, keep=10.0, window=window)
    for i, pid in enumerate(run.paths):
        got = s.path(pid).token_ids
        assert got == full[0][i].token_ids[:len(got)]
    assert t["first-finish-replay"].generated_tokens <= every


def test_evaluate_refuses_online_budgets_below_two():
    with pytest.raises(ValueError, match="^n:"):
        evaluate(digit_engine(), [Question("1?", "1")], ["deepconf-online-low"], [1], SamplingParams())


def test_score_confidences_agree_with_the_engines_own_logprobs():
    """The scoring pass (paths batched through a paged prefill) gives back the
    logprobs the engine summed while decoding the same paths."""
    import math

    from forkdec.engine.engine import Engine
    from forkdec.eval.reasoning import score_confidences

    from forkdec.models import load_model

    # bf16 weights for every product: the default form computes decode steps of <= 16 rows with
    # the GGUF blocks (int8 activations), the scoring prefill with bf16 copies
    model, tokenizer = load_model(None, weights="bf16")
    engine = Engine(model, tokenizer=tokenizer)
    prompt = "What is 2 + 3?"
    paths = engine.generate(prompt, 3, SamplingParams(temperature=1.0, max_new_tokens=12, seed=1))[0]
    scored = score_confidences(engine.model, engine.encode(prompt), [p.token_ids for p in paths])
    for path, (lps, conf) in zip(paths, scored):
        assert len(lps) == len(conf) == len(path.token_ids)
        assert math.isclose(sum(lps), path.cumulative_logprob, abs_tol=0.02 * len(lps)), (sum(lps), path)
        assert all(c > 0 for c in conf) and all(lp <= 0 for lp in lps)


def test_reasoning_report_renders_a_table_and_a_plot(tmp_path):
    from forkdec.bench import reasoning as report
    from forkdec.eval.reasoning import ReasoningResult, Tally

    t = Tally(correct=3, questions=4, generated_tokens=400, seconds=2.0)
    r = ReasoningResult({"questions": 4, "budgets": [8], "strategies": ["majority"], "temperature": 0.7,
                         "top_p": 1.0, "top_k": 0, "max_new_tokens": 96, "seed": 0, "window": 32,
                         "confidence_k": 20, "prompt": "{question}", "data": "arith"}, {"majority": {8: t}})
    f = tmp_path / "r.json"
    f.write_text(json.dumps(r.as_dict()))
    assert report.run([str(f), "--out", str(tmp_path)]) == 0
    md = (tmp_path / "reasoning.md").read_text()
    assert "| majority | 8 | 0.75 (3/4" in md and (tmp_path / "reasoning.png").stat().st_size > 0


def test_replay_first_finish_charges_each_path_up_to_the_kth_end():
    from forkdec.eval.reasoning import replay_first_finish

    paths = [FakeCompletion(f"#### {a}", [0] * n, r, 0.0, -1, [1.0] * n)
             for a, n, r in ((1, 30, "stop"), (2, 10, "stop"), (2, 50, "length"), (3, 20, "stop"))]
    vote, tokens = replay_first_finish(paths, 2)  # the 2nd natural end is at 20 tokens
    assert tokens == 20 + 10 + 20 + 20
    assert vote.answer in ("2", "3") and set(vote.considered) == {1, 3}
    vote, tokens = replay_first_finish(paths, 4)  # only 3 end naturally: nothing is cut
    assert tokens == 110
