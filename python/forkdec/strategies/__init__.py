"""Choosing one answer from many paths.

voting:   answer extraction, majority vote, first-finish, best mean logprob.
deepconf: DeepConf's confidence signals over per-token confidences (group,
          lowest-group, bottom-10%, tail), its threshold and online stopping
          test, consensus, and the filtered confidence-weighted vote.
"""
from forkdec.strategies.deepconf import (DEFAULT_WINDOW, OnlineResult, bottom_group_confidence, consensus,
                                         consensus_reached, deepconf_threshold, deepconf_vote, group_confidences,
                                         lowest_group_confidence, should_stop, simulate_online, stop_position,
                                         tail_confidence, trace_score)
from forkdec.strategies.voting import (STRATEGIES, PathLike, Vote, best_logprob, extract_answer, first_finish,
                                       first_finish_stopper, majority_vote, normalize_answer)


def deepconf_low(paths, window: int = DEFAULT_WINDOW, **kw) -> Vote:
    """Offline DeepConf-low: the top 10% of paths by lowest group confidence, weighted vote."""
    return deepconf_vote(paths, keep=10.0, score="lowest-group", window=window, **kw)


def deepconf_high(paths, window: int = DEFAULT_WINDOW, **kw) -> Vote:
    """Offline DeepConf-high: the top 90% of paths by lowest group confidence, weighted vote."""
    return deepconf_vote(paths, keep=90.0, score="lowest-group", window=window, **kw)


# Strategies that need per-token confidences on the paths (`token_confidences`).
CONFIDENCE_STRATEGIES = {"deepconf-low": deepconf_low, "deepconf-high": deepconf_high}
STRATEGIES.update(CONFIDENCE_STRATEGIES)


def get_strategy(name: str):
    """The strategy called `name`; ValueError naming `strategy` for an unknown one."""
    if name not in STRATEGIES:
        raise ValueError(f"strategy: unknown strategy {name!r}; choose from {', '.join(STRATEGIES)}")
    return STRATEGIES[name]


__all__ = ["CONFIDENCE_STRATEGIES", "DEFAULT_WINDOW", "OnlineResult", "PathLike", "STRATEGIES", "Vote",
           "best_logprob", "bottom_group_confidence", "consensus", "consensus_reached", "deepconf_high",
           "deepconf_low", "deepconf_threshold", "deepconf_vote", "extract_answer", "first_finish",
           "first_finish_stopper", "get_strategy", "group_confidences", "lowest_group_confidence", "majority_vote",
           "normalize_answer", "should_stop", "simulate_online", "stop_position", "tail_confidence", "trace_score"]
