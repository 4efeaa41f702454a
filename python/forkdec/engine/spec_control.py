"""When speculation pays: a measured cost model of a step and a calibrated acceptance estimate.

A decode step that feeds T tokens takes about a + b*T seconds: `a` is the part
that does not grow with the batch (reading the weights once, Python and op
overhead) and `b` the compute per token; a verification step costs `o` more
(tree metadata, the verify op, moving K/V). A plain step of B paths feeds B tokens
and yields B; a tree step that adds k draft nodes feeds B + k and yields
B + (accepted nodes). With the ranked nodes' acceptance estimates p_1 >= p_2 ...
(calibrated by what verification actually accepted), the controller picks the
k that maximizes the expected tokens per second (B + c * sum p_i) / (a + o + b (B + k)),
k = 0 meaning a plain step. At n = 1 on a CPU `a` dominates and deep trees pay;
at large batches the step is compute-bound (a << b*B) and only near-certain nodes
do, so speculation switches itself off.

Both `a`, `b` and the calibration come from the run's own steps. A fit needs
steps of different sizes; when the recent window holds only plain steps (after
speculation switched off for a while), the next step is a probe with the drafts
the budget allows, which re-measures both the cost of verification and the
acceptance: speculation comes back on when the paths start repeating themselves.
"""
from __future__ import annotations

from collections import deque

import torch


class StepCostModel:
    """Least-squares fit of seconds = a + o * [tree step] + b * tokens over the last `window` steps.

    `o` is what any verification step costs beyond its tokens (the tree's metadata, the
    verify op, moving K/V), so a small tree is charged for it and a large one amortizes it.
    """

    def __init__(self, window: int = 48) -> None:
        self.points: deque[tuple[int, bool, float]] = deque(maxlen=window)

    def observe(self, tokens: int, seconds: float, tree: bool = False) -> None:
        self.points.append((tokens, tree, seconds))

    def fit(self) -> tuple[float, float, float] | None:
        """(a, o, b), or None while the window's step sizes are too alike to separate them."""
        if len(self.points) < 3:
            return None
        t = torch.tensor([[1.0, float(tr), float(n)] for n, tr, _ in self.points], dtype=torch.float64)
        y = torch.tensor([[sec] for _, _, sec in self.points], dtype=torch.float64)
        sizes = t[:, 2]
        # step sizes must spread over a few tokens, or timing noise decides the slope
        if float(sizes.var(unbiased=False)) < max(1.0, (0.05 * float(sizes.mean())) ** 2):
            return None
        kinds = t[:, 1]
        # o is separable only with both kinds and tree steps of several sizes; else fold it into a and b
        tree_sizes = sizes[kinds > 0]
        if not (0 < tree_sizes.numel() < len(self.points)) or float(tree_sizes.var(unbiased=False)) < 1.0:
            t = t[:, [0, 2]]
        coef = torch.linalg.lstsq(t, y).solution[:, 0].tolist()
        a, o, b = (coef[0], coef[1], coef[2]) if len(coef) == 3 else (coef[0], 0.0, coef[1])
        return max(a, 0.0), max(o, 0.0), max(b, 1e-7)


class SpeculationControl:
    """Chooses how many ranked draft nodes a step verifies (0 = a plain step).

    Two layers. Each step, the cost model and the calibrated scores of this
    step's drafts pick the tree (how many nodes pay; none = a plain step). As a
    safety net against a wrong cost model, the measured throughput of recent
    tree steps and plain steps (tokens per second, moving averages) is compared
    once `min_samples` tree steps are in: while trees measure more than
    `margin` below plain steps, steps go plain, and a tree step is re-tried
    every `explore` steps, an interval that doubles (up to `max_explore`) each
    time the re-try confirms it and drops back when the trees win again; while
    trees win, a plain step every `plain_every` steps keeps the comparison current.
    adaptive=False verifies every node the budget took (the fixed policy, for
    comparisons).
    """

    def __init__(self, adaptive: bool = True, window: int = 48, prior_tokens: float = 2.0, explore: int = 8,
                 max_explore: int = 32, smoothing: float = 0.3, min_samples: int = 4, margin: float = 0.02,
                 plain_every: int = 16) -> None:
        self.adaptive = adaptive
        self.cost = StepCostModel(window)
        # calibration: accepted draft tokens / the sum of the verified nodes' scores, over recent tree steps,
        # starting from `prior_tokens` of agreement so a few unlucky steps do not switch speculation off
        self.accepted: deque[tuple[int, float]] = deque(maxlen=window)
        self.prior = prior_tokens
        self.rate: dict[bool, float | None] = {False: None, True: None}  # tokens/s of plain, tree steps
        self.since: dict[bool, int] = {False: 0, True: 0}                # steps since the last plain, tree step
        self.min_explore, self.explore, self.max_explore = explore, explore, max_explore
        self.smoothing = smoothing
        self.min_samples, self.margin, self.plain_every = min_samples, margin, plain_every
        self.samples = {False: 0, True: 0}  # steps measured of each kind
        self.losing = False                 # the safety net holds speculation off

    @property
    def calibration(self) -> float:
        acc = sum(a for a, _ in self.accepted) + self.prior
        pred = sum(p for _, p in self.accepted) + self.prior
        return acc / pred

    def model_choice(self, batch: int, scores: list[float]) -> int:
        """The k that maximizes the cost model's expected tokens/s (all of them while it has no fit)."""
        fit = self.cost.fit()
        if fit is None:
            return len(scores)  # probe: measure a tree step
        a, o, b = fit
        c = self.calibration
        best_k, best_rate, gain = 0, batch / (a + b * batch), 0.0
        for k, p in enumerate(scores, 1):
            gain += min(1.0, c * p)
            rate = (batch + gain) / (a + o + b * (batch + k))
            if rate > best_rate:
                best_k, best_rate = k, rate
        return best_k

    def choose(self, batch: int, scores: list[float]) -> int:
        """How many of the ranked nodes (scores best first) to verify with `batch` paths."""
        if not scores or not self.adaptive:
            return len(scores)
        k = self.model_choice(batch, scores)
        plain, tree = self.rate[False], self.rate[True]
        if self.samples[True] < self.min_samples or tree is None:
            return k
        if plain is None:
            return 0  # the net needs a plain step to compare with
        losing = tree < (1 - self.margin) * plain
        if losing != self.losing:  # the net switched: re-try soon
            self.losing, self.explore = losing, self.min_explore
        if not losing:  # keep the plain rate current: the cost model may favour trees wrongly
            return 0 if self.since[False] >= self.plain_every else k
        return (k or len(scores)) if self.since[True] >= self.explore else 0

    def observe(self, tokens_fed: int, seconds: float, emitted: int, predicted: float = 0.0, accepted: int = 0,
                tree: bool = False) -> None:
        """One finished step: its size, time and tokens emitted; for a tree step, the verified
        nodes' summed scores and the draft tokens verification accepted."""
        self.cost.observe(tokens_fed, seconds, tree)
        if tree:
            self.accepted.append((accepted, predicted))
        if tree and self.losing and self.since[True] >= self.explore:  # a re-try under the safety net
            self.explore = min(2 * self.explore, self.max_explore)
        self.samples[tree] += 1
        rate = emitted / max(seconds, 1e-9)
        old = self.rate[tree]
        self.rate[tree] = rate if old is None else old + self.smoothing * (rate - old)
        self.since[tree] = 0
        self.since[not tree] += 1
