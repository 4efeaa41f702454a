"""When speculation pays: a measured cost model of a step and a calibrated acceptance estimate.

A decode step that feeds T tokens takes about a + b*T seconds: `a` is the part
that does not grow with the batch (reading the weights once, Python and op
overhead) and `b` the compute per token. A plain step of B paths feeds B tokens
and yields B; a tree step that adds k draft nodes feeds B + k and yields
B + (accepted nodes). With the ranked nodes' acceptance estimates p_1 >= p_2 ...
(calibrated by what verification actually accepted), the controller picks the
k that maximizes the expected tokens per second (B + c * sum p_i) / (a + b (B + k)),
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


class StepCostModel:
    """Least-squares fit of seconds = a + b * tokens over the last `window` steps."""

    def __init__(self, window: int = 48) -> None:
        self.points: deque[tuple[int, float]] = deque(maxlen=window)

    def observe(self, tokens: int, seconds: float) -> None:
        self.points.append((tokens, seconds))

    def fit(self) -> tuple[float, float] | None:
        """(a, b), or None while the window's step sizes are too alike to separate them."""
        n = len(self.points)
        if n < 3:
            return None
        mt = sum(t for t, _ in self.points) / n
        ms = sum(s for _, s in self.points) / n
        var = sum((t - mt) ** 2 for t, _ in self.points) / n
        # step sizes must spread over a few tokens, or timing noise decides the slope
        if var < max(1.0, (0.05 * mt) ** 2):
            return None
        b = sum((t - mt) * (s - ms) for t, s in self.points) / n / var
        b = max(b, 1e-7)
        return max(ms - b * mt, 0.0), b


class SpeculationControl:
    """Chooses how many ranked draft nodes a step verifies (0 = a plain step).

    Two layers. The cost model and the calibrated scores pick the tree (how many
    nodes pay). The measured throughput of recent tree steps and of recent plain
    steps (tokens per second, moving averages) decides whether speculating pays
    at all: when the trees lose, steps go plain; when they win, plain steps stop.
    The losing kind is re-tried every `explore` steps, an interval that doubles
    (up to `max_explore`) each time the re-try confirms the choice and drops back
    when it does not, so a wrong choice is found quickly and a right one costs
    little (a tree step among 64 plain ones). adaptive=False verifies every node
    the budget took (the fixed policy, for comparisons).
    """

    def __init__(self, adaptive: bool = True, window: int = 48, prior_tokens: float = 2.0, explore: int = 8,
                 max_explore: int = 64, smoothing: float = 0.3) -> None:
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
        self.winner: bool | None = None

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
        a, b = fit
        c = self.calibration
        best_k, best_rate, gain = 0, batch / (a + b * batch), 0.0
        for k, p in enumerate(scores, 1):
            gain += min(1.0, c * p)
            rate = (batch + gain) / (a + b * (batch + k))
            if rate > best_rate:
                best_k, best_rate = k, rate
        return best_k

    def choose(self, batch: int, scores: list[float]) -> int:
        """How many of the ranked nodes (scores best first) to verify with `batch` paths."""
        if not scores or not self.adaptive:
            return len(scores)
        k = self.model_choice(batch, scores)
        plain, tree = self.rate[False], self.rate[True]
        if plain is None or tree is None:  # measure both kinds early: a tree step first, then a plain one
            if tree is None:
                return k or len(scores)
            return 0 if self.since[False] >= 2 else k
        winner = tree > plain
        if winner != self.winner:  # the choice flipped: re-check the other kind soon
            self.winner, self.explore = winner, self.min_explore
        if winner:
            return 0 if self.since[False] >= self.explore else k
        return (k or len(scores)) if self.since[True] >= self.explore else 0

    def observe(self, tokens_fed: int, seconds: float, emitted: int, predicted: float = 0.0, accepted: int = 0,
                tree: bool = False) -> None:
        """One finished step: its size, time and tokens emitted; for a tree step, the verified
        nodes' summed scores and the draft tokens verification accepted."""
        self.cost.observe(tokens_fed, seconds)
        if tree:
            self.accepted.append((accepted, predicted))
        if self.winner is not None and self.since[tree] >= self.explore:  # a re-try of the losing kind
            self.explore = min(2 * self.explore, self.max_explore)
        rate = emitted / max(seconds, 1e-9)
        old = self.rate[tree]
        self.rate[tree] = rate if old is None else old + self.smoothing * (rate - old)
        self.since[tree] = 0
        self.since[not tree] += 1
