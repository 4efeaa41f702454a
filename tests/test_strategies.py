"""Answer extraction and the voting strategies."""
from __future__ import annotations

import pytest

from forkdec.engine import Completion
from forkdec.strategies import (best_logprob, extract_answer, first_finish, first_finish_stopper, majority_vote,
                                normalize_answer)


@pytest.mark.parametrize("text,answer", [
    ("so the total is \\boxed{42}.", "42"),
    ("first \\boxed{1} then \\boxed{\\frac{3}{4}}", "\\frac{3}{4}"),
    ("Natalia sold 48 + 24 = 72 clips.\n#### 72", "72"),
    ("#### 1,000", "1000"),
    ("The answer is $1,234.50.", "1234.5"),
    ("It costs 42.0 dollars", "42"),
    ("He has -3 apples left.", "-3"),
    ("We get 5 and then 7.", "7"),
    ("#### 18\n\nsome trailing chatter 99", "18"),
    ("no number here", None),
    ("\\boxed{}  but 12", "12"),
    ("about .5 of it", "0.5"),
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


@pytest.mark.parametrize("raw,norm", [("1,000", "1000"), ("42.0", "42"), ("$5", "5"), ("3.50", "3.5"),
                                      ("007", "7"), (" x + 1 ", "x+1"), ("12.", "12"), ("50%", "50")])
def test_normalize_answer(raw, norm):
    assert normalize_answer(raw) == norm


def path(text, lp=-1.0, n=10, reason="stop", order=0):
    return Completion(list(range(n)), text, reason, lp * n, finish_order=order)


def test_majority_vote_counts_normalized_answers():
    paths = [path("#### 72", order=3), path("\\boxed{72.0}", order=1), path("so 1,000", order=0),
             path("1000 it is", order=2), path("72 clips", order=4), path("no idea", order=5)]
    v = majority_vote(paths)
    assert v.answer == "72" and v.votes == {"72": 3, "1000": 2}
    assert v.chosen in (0, 1, 4) and v.strategy == "majority"


def test_majority_tie_goes_to_the_likelier_answer():
    paths = [path("#### 5", lp=-2.0), path("#### 6", lp=-0.5), path("#### 5", lp=-1.5), path("#### 6", lp=-3.0)]
    v = majority_vote(paths)
    assert v.votes == {"5": 2, "6": 2} and v.answer == "6" and v.chosen == 1


def test_cancelled_paths_do_not_vote():
    paths = [path("#### 1"), path("#### 2", reason="cancelled"), path("#### 2", reason="cancelled")]
    assert majority_vote(paths).answer == "1"


def test_first_finish_votes_among_the_first_k_natural_finishers():
    paths = [path("#### 9", reason="length", order=0), path("#### 4", order=3), path("#### 7", order=1),
             path("#### 7", order=2), path("#### 4", order=4)]
    v = first_finish(paths, k=2)
    assert v.answer == "7" and v.considered == [2, 3] and v.votes == {"7": 2}
    assert first_finish(paths, k=1).answer == "7"
    with pytest.raises(ValueError, match="^k:"):
        first_finish(paths, k=0)


def test_first_finish_stopper():
    stop = first_finish_stopper(2)
    assert not stop(0, [path("a")])
    assert not stop(0, [path("a"), path("b", reason="length")])
    assert stop(0, [path("a"), path("b")])


def test_best_logprob_picks_the_highest_mean_logprob():
    paths = [path("#### 3", lp=-1.0, n=10), path("#### 8", lp=-0.2, n=50), path("#### 3", lp=-0.9, n=5)]
    v = best_logprob(paths)
    assert v.answer == "8" and v.chosen == 1 and v.votes == {"3": 2, "8": 1}


def test_no_answers_anywhere():
    v = majority_vote([path("hmm"), path("what")])
    assert v.answer is None and v.votes == {} and v.chosen is None
