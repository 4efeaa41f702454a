"""DeepConf signals and votes (forkdec.strategies.deepconf) on hand-worked examples."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from forkdec.strategies import (bottom_group_confidence, consensus, consensus_reached, deepconf_high, deepconf_low,
                                deepconf_threshold, deepconf_vote, get_strategy, group_confidences,
                                lowest_group_confidence, majority_vote, should_stop, simulate_online, stop_position,
                                tail_confidence)


@dataclass
class P:
    text: str
    token_confidences: list[float] | None
    finish_reason: str = "stop"
    cumulative_logprob: float = -1.0
    finish_order: int = 0

    @property
    def token_ids(self) -> list[int]:
        return list(range(len(self.token_confidences) if self.token_confidences is not None else 3))


def test_group_confidences_slide_a_full_window():
    assert group_confidences([1, 2, 3, 4], 2) == [1.5, 2.5, 3.5]
    assert group_confidences([1, 2, 3, 4], 4) == [2.5]
    assert group_confidences([1, 2, 3, 4], 5) == [2.5]  # shorter than the window: one group
    assert group_confidences([], 3) == []


def test_trace_scores():
    assert lowest_group_confidence([1, 2, 3, 4], 2) == 1.5
    # groups of 1: [5, 1, 3, 2, 4]; the lowest 40% are 1 and 2
    assert bottom_group_confidence([5, 1, 3, 2, 4], window=1, percent=40) == 1.5
    assert bottom_group_confidence([5, 1, 3, 2, 4], window=1) == 1.0  # 10% of 5 groups: at least one
    assert tail_confidence([1, 2, 3, 4], 2) == 3.5
    assert tail_confidence([1, 2], 10) == 1.5


def test_threshold_is_the_percentile_that_keeps_the_top_share():
    warm = [1, 2, 3, 4, 5]
    assert deepconf_threshold(warm, keep=10) == pytest.approx(4.6)  # DeepConf-low: 90th percentile
    assert deepconf_threshold(warm, keep=90) == pytest.approx(1.4)  # DeepConf-high: 10th percentile


def test_threshold_leaves_out_paths_without_tokens():
    import math
    scores = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert deepconf_threshold(scores + [-math.inf, -math.inf], 50) == deepconf_threshold(scores, 50) == 3.0
    assert deepconf_threshold([-math.inf, -math.inf], 10) == -math.inf


def test_online_stop_needs_a_full_window_below_the_threshold():
    assert should_stop([3, 3, 1, 1], threshold=2, window=2)
    assert not should_stop([3, 3, 3, 1], threshold=2, window=2)  # mean 2 is not below 2
    assert not should_stop([0], threshold=2, window=2)  # window not full yet
    # groups [3, 2, 1, 2]: first below 2.5 after 3 tokens
    assert stop_position([3, 3, 1, 1, 3], threshold=2.5, window=2) == 3
    assert stop_position([3, 3], threshold=2.5, window=2) is None


def test_consensus():
    assert consensus({"a": 3.0, "b": 1.0}) == 0.75
    assert consensus({}) == 0.0
    assert consensus_reached({"a": 3.0, "b": 1.0}, tau=0.7)
    assert not consensus_reached({"a": 3.0, "b": 1.0}, tau=0.8)


PATHS = [P("#### 5", [10, 10]), P("#### 5", [1, 1]), P("#### 7", [8, 8]), P("#### 7", [7, 7]), P("#### 7", [6, 6])]


def test_filtered_weighted_vote():
    # keep 90%: all five; 5 weighs 10 + 1, 7 weighs 8 + 7 + 6
    v = deepconf_vote(PATHS, keep=90, window=2)
    assert (v.answer, v.votes, v.considered, v.chosen) == ("7", {"5": 11.0, "7": 21.0}, [0, 1, 2, 3, 4], 2)
    # keep 10%: only the most confident path
    v = deepconf_vote(PATHS, keep=10, window=2)
    assert (v.answer, v.considered) == ("5", [0])
    # keep 50%: ceil(2.5) = 3 paths, 5: 10 against 7: 8 + 7
    v = deepconf_vote(PATHS, keep=50, window=2)
    assert (v.answer, v.votes) == ("7", {"5": 10.0, "7": 15.0})
    assert deepconf_low(PATHS, window=2).answer == "5"
    assert deepconf_high(PATHS, window=2).answer == "7"
    assert majority_vote(PATHS).answer == "7"
    assert get_strategy("deepconf-low") is deepconf_low


def test_tail_and_bottom_scores_filter_differently():
    paths = [P("#### 1", [1, 1, 9, 9]), P("#### 2", [5, 5, 4])]
    assert deepconf_vote(paths, keep=10, score="tail", window=2).answer == "1"  # tails 9 vs 4.5
    assert deepconf_vote(paths, keep=10, score="lowest-group", window=2).answer == "2"  # groups 1 vs 4.5
    assert deepconf_vote(paths, keep=10, score="bottom-10", window=1).answer == "2"  # lowest token 1 vs 4


def test_simulate_online_stops_low_confidence_paths():
    paths = [P("#### 5", [10, 10]), P("#### 7", [2, 2]), P("#### 7", [9, 9, 1, 1]), P("#### 7", [8, 8])]
    # threshold: median of the warm-up lowest groups [10, 2] = 6; path 2's groups [9, 5, 1] stop it after 3 tokens
    r = simulate_online(paths, warmup=2, keep=50, window=2, tau=None)
    assert r.threshold == 6.0
    assert (r.generated_tokens, r.paths_run) == (2 + 2 + 3 + 2, 4)
    assert (r.vote.answer, r.vote.votes, r.vote.considered) == ("5", {"5": 10.0, "7": 8.0}, [0, 3])
    # with tau: consensus counts every warm-up path (5: 10, 7: 2) and is tested after each later
    # path that finishes; the one kept warm-up voter alone does not end the run
    r = simulate_online(paths, warmup=2, keep=50, window=2, tau=0.95)
    assert (r.generated_tokens, r.paths_run, r.vote.answer) == (9, 4, "5")
    # after path 3 the pool is 5: 10, 7: 2 + 8, a share of 0.5: tau 0.5 ends the run before path 4
    r = simulate_online(paths + [P("#### 7", [8, 8])], warmup=2, keep=50, window=2, tau=0.5)
    assert (r.generated_tokens, r.paths_run) == (9, 4)
    r = simulate_online(paths + [P("#### 7", [8, 8])], warmup=2, keep=50, window=2, tau=0.95)
    assert (r.generated_tokens, r.paths_run) == (11, 5)


@pytest.mark.parametrize("call,arg", [
    (lambda: group_confidences([1.0], 0), "window"),
    (lambda: lowest_group_confidence([1.0], -3), "window"),
    (lambda: should_stop([1.0], 1.0, 0), "window"),
    (lambda: deepconf_threshold([1.0], 0), "keep"),
    (lambda: deepconf_threshold([1.0], 100), "keep"),
    (lambda: deepconf_vote(PATHS, keep=150), "keep"),
    (lambda: bottom_group_confidence([1.0], 1, percent=0), "percent"),
    (lambda: tail_confidence([1.0], 0), "tail"),
    (lambda: deepconf_vote(PATHS, score="median"), "score"),
    (lambda: consensus_reached({"a": 1.0}, tau=0), "tau"),
    (lambda: simulate_online(PATHS, warmup=0), "warmup"),
    (lambda: get_strategy("deepconf-medium"), "strategy"),
    (lambda: deepconf_vote([P("#### 1", None)]), "paths"),
])
def test_bad_input_names_the_argument(call, arg):
    with pytest.raises(ValueError, match=f"^{arg}:"):
        call()
