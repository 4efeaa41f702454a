"""forkdec eval reasoning: the questions, the strategies' bookkeeping (on a
scripted engine), the offline confidence scoring (on the real model), bad input."""
from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from forkdec.cli import main
from forkdec.engine.params import SamplingParams
from forkdec.eval.arith import arith_problems
from forkdec.eval.reasoning import evaluate, load_questions, parse_budgets, parse_strategies


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


class ScriptedEngine:
    """Answers every prompt with the same scripted paths: 3 paths say 7 (low
    confidence), 1 says 5 (high confidence); greedy says 5."""
    def __init__(self):
        self.calls = []

    def encode(self, prompt):
        return [1, 2, 3]

    def generate(self, prompts, n, params, early_stop=None):
        self.calls.append((n, params.temperature, early_stop is not None))
        return [self.paths(n, params, early_stop) for _ in prompts]

    def paths(self, n, params, early_stop):
        if params.temperature == 0:
            paths = [FakeCompletion("#### 5", [0] * 4, "stop", -1.0, 0, [9.0] * 4)]
        else:
            paths = [FakeCompletion("#### 7" if i % 4 else "#### 5", [0] * (10 + i), "stop", -float(i), i,
                                    [1.0] * (10 + i) if i % 4 else [9.0] * (10 + i)) for i in range(n)]
        if early_stop is not None:
            paths = paths[:max(1, n // 4)]
        return paths


def test_evaluate_applies_each_strategy_to_its_own_paths():
    questions = load_questions("arith", limit=2)
    answer = questions[0].answer
    engine = ScriptedEngine()
    names = ["majority", "best-logprob", "greedy", "first-finish", "deepconf-low", "deepconf-online-low"]
    r = evaluate(engine, questions[:1], names, [8], SamplingParams(temperature=0.7), window=4)
    t = {s: r.tallies[s][8] for s in names}
    right = {s: (answer == "7") if s in ("majority",) else (answer == "5") for s in names}
    for s in ("majority", "best-logprob", "greedy", "first-finish", "deepconf-low"):
        assert t[s].correct == int(right[s]), s
    # majority and best-logprob share one call's tokens; first-finish stopped after 2 paths
    assert t["majority"].generated_tokens == t["best-logprob"].generated_tokens == sum(10 + i for i in range(8))
    assert t["first-finish"].generated_tokens == 10 + 11
    assert t["greedy"].generated_tokens == 4
    # online: warm-up 2 paths (threshold from their lowest groups 9 and 1 at keep 10%: 8.2), later
    # low-confidence paths stop after the first window of 4 tokens, the 5-path at index 4 finishes
    assert t["deepconf-online-low"].generated_tokens < t["majority"].generated_tokens
    assert t["deepconf-online-low"].seconds_estimated
    assert (8, 0.7, False) in engine.calls and (1, 0.0, False) in engine.calls and (8, 0.7, True) in engine.calls
    d = r.as_dict()["strategies"]["majority"]["8"]
    assert set(d) >= {"accuracy", "generated_tokens", "seconds"}


def test_score_confidences_agree_with_the_engines_own_logprobs():
    """The scoring pass (paths batched through a paged prefill) gives back the
    logprobs the engine summed while decoding the same paths."""
    import math

    from forkdec.engine.engine import Engine
    from forkdec.eval.reasoning import score_confidences

    engine = Engine()
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
