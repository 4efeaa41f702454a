"""The speculation controller: cost model, per-step choice, holds and the measured safety net."""
from __future__ import annotations

import random

import pytest
import torch

from forkdec.engine.spec_control import SpeculationControl, StepCostModel


def test_cost_model_recovers_a_line_and_needs_spread():
    m = StepCostModel()
    for t in (4, 4, 4, 4):
        m.observe(t, 0.02 + 0.001 * t)
    assert m.fit() is None
    for t in (12, 20, 30):
        m.observe(t, 0.02 + 0.001 * t)
    a, o, b = m.fit()
    assert a == pytest.approx(0.02) and o == pytest.approx(0.0, abs=1e-9) and b == pytest.approx(0.001)
    for t in (9, 17, 25):   # verification steps: 3 ms more than their size alone
        m.observe(t, 0.023 + 0.001 * t, tree=True)
    a, o, b = m.fit()
    assert (a, o, b) == (pytest.approx(0.02), pytest.approx(0.003), pytest.approx(0.001))


def test_cost_model_fit_equals_torch_least_squares_on_noisy_steps():
    rng = random.Random(0)
    m = StepCostModel(window=40)
    for _ in range(60):   # the window keeps the last 40
        tree = rng.random() < 0.6
        n = rng.randrange(2, 90) if tree else 64
        m.observe(n, 0.02 + 0.004 * tree + 0.0007 * n + rng.gauss(0, 0.002), tree=tree)
    x = torch.tensor([[1.0, float(tr), float(n)] for n, tr, _ in m.points], dtype=torch.float64)
    y = torch.tensor([[s] for _, _, s in m.points], dtype=torch.float64)
    want = torch.linalg.lstsq(x, y).solution[:, 0].tolist()
    assert m.fit() == pytest.approx(tuple(want), rel=1e-9)


def _trained(a, b, batch, **kw):
    c = SpeculationControl(**kw)
    for t in (batch, batch + 8, batch + 16, batch, batch + 24):
        c.observe(t, a + b * t, emitted=batch, tree=t > batch)
    return c


def test_cost_model_speculates_when_the_step_is_overhead_bound():
    c = _trained(a=0.02, b=0.0005, batch=1)        # n=1 on a CPU: the fixed cost dominates
    k, gain = c.model_choice(1, [0.9, 0.8, 0.6, 0.4, 0.2, 0.1])
    assert k == 6 and gain > 1.0                    # (1 + 3.0 tokens) / 1.0235 s-units vs 1 / 1.0205
    assert c.choose(1, [0.9, 0.8, 0.6, 0.4, 0.2, 0.1]) == 6


def test_cost_model_switches_off_when_compute_bound_and_reprobes():
    c = _trained(a=0.002, b=0.001, batch=64)       # 64 paths: nearly all cost is per token
    assert c.model_choice(64, [0.6, 0.5, 0.3])[0] == 0
    assert c.model_choice(64, [0.999, 0.6])[0] == 1   # a near-certain node still pays, barely
    for _ in range(60):                             # only plain steps of one size: the fit goes stale
        c.observe(64, 0.002 + 0.001 * 64, emitted=64)
    assert c.model_choice(64, [0.6, 0.5, 0.3]) == (3, float("inf"))  # so it probes with the whole draft


def test_a_gain_below_the_margin_is_not_worth_a_tree():
    c = _trained(a=0.002, b=0.001, batch=64)
    k, gain = c.model_choice(64, [0.999])
    assert k == 1 and 0 < gain < 0.01
    assert c.choose(64, [0.999]) == 0
    # compute-bound (a node must be accepted > 50% of the time to pay): the stricter margin applies
    assert _trained(a=0.002, b=0.001, batch=64, gain_margin=0.0).choose(64, [0.999]) == 0
    assert _trained(a=0.002, b=0.001, batch=64, bound_gain_margin=0.0).choose(64, [0.999]) == 1
    # overhead-bound (n=1): a 5% gain is taken, the compute-bound margin of 10% does not apply
    c = _trained(a=0.02, b=0.0005, batch=1)
    k, gain = c.model_choice(1, [0.06])
    assert k == 1 and 0.03 < gain < 0.1 and c.choose(1, [0.06]) == 1


def _step(control, batch, scores, plain_rate, tree_rate, seconds=0.01):
    """One engine step as the speculator runs it; returns 'h' (held: no drafting), 'p' or 't'."""
    if not control.drafting():
        control.observe(batch, seconds, emitted=round(plain_rate * seconds))
        return "h"
    k = control.choose(batch, list(scores))
    tree = k > 0
    control.observe(batch + k, seconds, emitted=round((tree_rate if tree else plain_rate) * seconds), tree=tree)
    return "t" if tree else "p"


def _run(control, steps, plain_rate, tree_rate, batch=4, scores=(0.9, 0.8, 0.7)):
    return [_step(control, batch, scores, plain_rate, tree_rate) for _ in range(steps)]


def test_when_nothing_pays_speculation_holds_off_without_drafting_and_backs_off():
    c = _trained(a=0.002, b=0.001, batch=64)        # nothing pays at 64 paths
    kinds = "".join(_step(c, 64, (0.6, 0.5, 0.3), 64 / 0.066, 64 / 0.066, 0.066) for _ in range(140))
    # patience: 3 drafted plain steps, then holds of 4, 8, 16, 32 steps that do not draft, each
    # ended by a probe that drafts and finds nothing paying; by then the cost model's window holds
    # only plain steps, so the next probe verifies the whole draft (t), which measures as losing
    assert kinds.startswith("ppp" + "h" * 4 + "p" + "h" * 8 + "p" + "h" * 16 + "p" + "h" * 32 + "tp" + "h" * 64)
    assert kinds.count("t") <= 2 and c.holds == 6


def test_idle_steps_do_not_hold_speculation_off_when_the_step_is_overhead_bound():
    c = _trained(a=0.02, b=0.0005, batch=1)         # n=1: a node pays from ~2.5% acceptance
    assert not c.compute_bound(1) and _trained(a=0.002, b=0.001, batch=64).compute_bound(64)
    # drafts too unlikely to pay for 40 steps (new text): plain steps that keep drafting, no hold,
    # so the first repetition is drafted and verified at once
    kinds = "".join(_step(c, 1, (0.001,), 50, 50, 0.0205) for _ in range(40))
    assert kinds == "p" * 40 and c.holds == 0
    assert _step(c, 1, (0.9, 0.8), 50, 50, 0.0205) == "t"


def test_measured_losing_trees_switch_speculation_off_with_rarer_retries():
    c = SpeculationControl()
    c.observe(4, 0.01, emitted=4)                      # one plain step measured
    # the cost model (every step 10 ms) says trees are free; the measured rates say they lose
    kinds = "".join(_run(c, 300, plain_rate=400, tree_rate=300))
    assert kinds.startswith("tttt" + "p")             # min_samples tree steps before the net may act
    retries = [i for i, k in enumerate(kinds) if k == "t"][4:]
    assert 4 <= len(retries) <= 7                     # probes after holds of 4, 8, 16, 32, ...
    gaps = [b - a for a, b in zip(retries, retries[1:])]
    assert gaps == sorted(gaps) and gaps[0] >= 5
    assert kinds.count("h") > 250                     # held steps do not even draft


def test_a_probe_that_wins_turns_speculation_back_on():
    c = SpeculationControl()
    c.observe(4, 0.01, emitted=4)
    _run(c, 40, plain_rate=400, tree_rate=300)
    assert c.losing
    kinds = "".join(_run(c, 200, plain_rate=400, tree_rate=900))
    assert not c.losing and kinds[-50:].count("t") > 40 and c.hold_next == c.hold_base


def test_measured_winning_trees_keep_speculation_on():
    c = SpeculationControl()
    c.observe(4, 0.01, emitted=4)
    kinds = _run(c, 200, plain_rate=400, tree_rate=700)
    assert 180 < kinds.count("t") < 200               # a plain step every 16 keeps the comparison honest
    assert all(k == "t" for k in kinds[:16]) and "h" not in kinds


def test_rates_are_ratios_of_sums_over_recent_steps():
    c = SpeculationControl(rate_window=3)
    for emitted, sec in [(9, 1.0), (1, 0.01), (1, 0.01), (1, 0.01)]:
        c.observe(5, sec, emitted=emitted, tree=True)
    assert c.rate(True) == pytest.approx(3 / 0.03)   # the oldest step left the window
    assert c.rate(False) is None


def test_calibration_follows_measured_acceptance():
    c = SpeculationControl(calibration_window=16)
    for _ in range(20):
        c.observe(10, 0.1, emitted=3, predicted=4.0, accepted=1, tree=True)
    assert c.calibration == pytest.approx((16 + 2) / (64 + 2))
    assert SpeculationControl(adaptive=False).choose(64, [0.1, 0.1]) == 2
    assert SpeculationControl(adaptive=False).drafting()


def test_trees_must_win_by_the_margin_not_merely_break_even():
    c = SpeculationControl()
    c.observe(4, 0.01, emitted=4)
    kinds = "".join(_run(c, 300, plain_rate=400, tree_rate=408))   # 2% faster: within timing noise
    assert kinds.count("t") < 20 and kinds.count("h") > 250
    c = SpeculationControl(margin=0.0)
    c.observe(4, 0.01, emitted=4)
    assert "".join(_run(c, 300, plain_rate=400, tree_rate=408)).count("t") > 250


def test_a_burst_of_slow_tree_steps_does_not_hold_winning_trees_off():
    c = SpeculationControl()
    c.observe(4, 0.01, emitted=4)
    _run(c, 16, plain_rate=400, tree_rate=100)     # a load burst: tree steps measured 4x slower
    assert c.losing
    kinds = "".join(_run(c, 60, plain_rate=400, tree_rate=900))
    first = kinds.index("t")
    assert first <= c.hold_base * 2 + 1            # the probe ending the current hold
    assert kinds[first:].count("t") > 0.8 * len(kinds[first:]) and not c.losing


# (tokens fed, ms, tree step) of 20 steps measured at 16 paths, 2 threads (trees of 35-40 tokens)
STEPS_AT_16 = [(40, 34.2, True), (40, 31.4, True), (16, 20.4, False), (40, 31.4, True), (40, 31.3, True),
               (35, 32.7, True), (16, 20.7, False), (40, 32.0, True), (16, 21.0, False), (40, 31.1, True),
               (40, 30.9, True), (16, 20.8, False), (40, 31.6, True), (16, 27.0, False), (16, 20.8, False),
               (16, 20.9, False), (40, 31.9, True), (40, 31.6, True), (16, 21.1, False), (16, 21.0, False)]


def test_cost_model_folds_o_into_a_line_when_tree_sizes_barely_spread():
    m = StepCostModel()
    for n, ms, tree in STEPS_AT_16:
        m.observe(n, ms / 1e3, tree=tree)
    a, o, b = m.fit()
    # a 3-term fit of these steps put 14 ms in o and nothing in b; forwards of 16 and 40 tokens
    # measured alone on that machine cost 19.0 and ~29 ms (a = 13.4 ms, b = 0.41 ms per token)
    assert o == 0.0 and 0.010 < a < 0.016 and 0.0003 < b < 0.0005
