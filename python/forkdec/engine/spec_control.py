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
Where trees do not pay, speculation is held off for stretches of plain steps that
skip drafting altogether, re-probed with exponential back-off (SpeculationControl).
"""
from __future__ import annotations

from collections import deque


class StepCostModel:
    """Least-squares fit of seconds = a + o * [tree step] + b * tokens over the last `window` steps.

    `o` is what any verification step costs beyond its tokens (the tree's metadata, the
    verify op, moving K/V), so a small tree is charged for it and a large one amortizes it.
    """

    def __init__(self, window: int = 48) -> None:
        self.points: deque[tuple[int, bool, float]] = deque(maxlen=window)
        self._fit: tuple[float, float, float] | None = None
        self._stale = True

    def observe(self, tokens: int, seconds: float, tree: bool = False) -> None:
        self.points.append((tokens, tree, seconds))
        self._stale = True

    def fit(self) -> tuple[float, float, float] | None:
        """(a, o, b), or None while the window's step sizes are too alike to separate them.

        Plain Python on purpose, and cached until the next step is observed: it runs every
        step, and at n = 1 a step is ~25 ms, so the ~0.4 ms of building tensors for
        torch.linalg.lstsq would be a visible overhead."""
        if self._stale:
            self._fit, self._stale = self._solve(), False
        return self._fit

    def _solve(self) -> tuple[float, float, float] | None:
        if len(self.points) < 3:
            return None
        sizes = [float(n) for n, _, _ in self.points]
        # step sizes must spread over a few tokens, or timing noise decides the slope
        if _variance(sizes) < max(1.0, (0.05 * sum(sizes) / len(sizes)) ** 2):
            return None
        tree_sizes = [float(n) for n, tr, _ in self.points if tr]
        # o is separable only with both kinds and tree steps of clearly different sizes (at 16 paths
        # trees of 28-40 tokens against plain steps of 16 leave o and b nearly collinear, and the
        # 3-term fit put all the cost in o); else fold it into a and b
        spread = max(1.0, (0.2 * sum(tree_sizes) / len(tree_sizes)) ** 2) if tree_sizes else 0.0
        if 0 < len(tree_sizes) < len(self.points) and _variance(tree_sizes) >= spread:
            a, o, b = _least_squares([(1.0, float(tr), float(n)) for n, tr, _ in self.points],
                                     [sec for _, _, sec in self.points])
        else:
            a, b = _least_squares([(1.0, float(n)) for n, _, _ in self.points], [sec for _, _, sec in self.points])
            o = 0.0
        return max(a, 0.0), max(o, 0.0), max(b, 1e-7)


def _variance(xs: list[float]) -> float:
    mean = sum(xs) / len(xs)
    return sum((x - mean) ** 2 for x in xs) / len(xs)


def _least_squares(rows: list[tuple[float, ...]], y: list[float]) -> list[float]:
    """Coefficients minimizing sum (row . c - y)^2: the normal equations, solved by Gaussian
    elimination with partial pivoting (2 or 3 unknowns; the callers rule out degenerate sizes)."""
    m = len(rows[0])
    g = [[sum(r[i] * r[j] for r in rows) for j in range(m)] + [sum(r[i] * v for r, v in zip(rows, y))]
         for i in range(m)]
    for col in range(m):
        piv = max(range(col, m), key=lambda r: abs(g[r][col]))
        g[col], g[piv] = g[piv], g[col]
        if g[col][col] == 0.0:
            return [0.0] * m
        for r in range(col + 1, m):
            f = g[r][col] / g[col][col]
            g[r] = [x - f * z for x, z in zip(g[r], g[col])]
    coef = [0.0] * m
    for i in reversed(range(m)):
        coef[i] = (g[i][m] - sum(g[i][j] * coef[j] for j in range(i + 1, m))) / g[i][i]
    return coef


class SpeculationControl:
    """Chooses, step by step, whether to draft at all and how many ranked draft nodes to verify.

    Each drafted step, the cost model and the calibrated scores of this step's drafts pick
    the tree: the k that maximizes expected tokens/s, kept only if it beats a plain step
    by `gain_margin`, or `bound_gain_margin` where the step is compute-bound (else k = 0,
    a plain step). Two things hold speculation off for a
    while, `hold` plain steps that do not even draft (at large batches drafting itself
    costs a few percent of a step):
    - in the compute-bound regime (`compute_bound`), `patience` drafted steps in a row on
      which nothing paid;
    - the safety net against a wrong cost model: once `min_samples` tree steps are
      measured, the measured tokens/s of recent tree steps and plain steps (ratios of
      sums over the last `rate_window` steps of each kind) are compared, and unless trees
      measure at least `margin` faster than plain steps no tree is verified. The margin
      pays for what a step's own time does not show (drafting on the plain steps, paths
      finishing unevenly) and keeps trees that merely break even within timing noise off.
    The hold doubles (up to `max_hold`) each time it ends without a tree that pays, and
    drops back when trees win again. The first drafted step after a hold is a probe: if
    the net holds trees off it verifies them anyway (the model's choice, or the whole
    draft); a probe that wins by the margin clears the tree steps that tripped the net,
    which are stale by then (a burst of load has passed, or the paths repeat more now).
    Its cost counts in the measured rates like any step's. While trees win, a plain step every `plain_every` steps keeps
    the plain rate current. The first `learn` tree steps verify the whole draft (no fit
    yet). adaptive=False verifies every node the budget took (for comparisons).
    """

    def __init__(self, adaptive: bool = True, window: int = 48, calibration_window: int = 16,
                 prior_tokens: float = 2.0, rate_window: int = 16, min_samples: int = 4, margin: float = 0.05,
                 gain_margin: float = 0.03, patience: int = 3,
                 hold: int = 4, max_hold: int = 256, plain_every: int = 16, learn: int = 2,
                 hold_above: float = 0.5, bound_gain_margin: float = 0.1) -> None:
        self.adaptive = adaptive
        self.learn = learn  # tree steps verified whole at the start, to measure what they cost and yield
        self.cost = StepCostModel(window)
        # calibration: accepted draft tokens / the sum of the verified nodes' scores, over recent tree steps,
        # starting from `prior_tokens` of agreement so a few unlucky steps do not switch speculation off;
        # a short window: acceptance drifts (a path's first tokens repeat the prompt far more than later ones)
        self.accepted: deque[tuple[int, float]] = deque(maxlen=calibration_window)
        self.prior = prior_tokens
        # (tokens emitted, seconds) of the recent plain and tree steps: a rate is a ratio of sums, since
        # one tree step's yield varies from 1 token to its whole depth and a mean of per-step rates is noisy
        self.recent: dict[bool, deque[tuple[int, float]]] = {False: deque(maxlen=rate_window),
                                                             True: deque(maxlen=rate_window)}
        self.since: dict[bool, int] = {False: 0, True: 0}                # steps since the last plain, tree step
        self.samples = {False: 0, True: 0}                               # steps measured of each kind
        self.min_samples, self.margin = min_samples, margin
        self.gain_margin, self.patience, self.plain_every = gain_margin, patience, plain_every
        self.hold_above, self.bound_gain_margin = hold_above, bound_gain_margin
        self.hold_base, self.hold_next, self.max_hold = hold, hold, max_hold
        self.held = 0        # plain steps without drafting left before the next probe
        self.probe = False   # this step ends a hold
        self.probing = False  # this step verifies a tree although the net holds trees off
        self.idle = 0        # drafted steps in a row on which no tree paid
        self.holds = 0       # holds started (stats)

    @property
    def calibration(self) -> float:
        acc = sum(a for a, _ in self.accepted) + self.prior
        pred = sum(p for _, p in self.accepted) + self.prior
        return acc / pred

    @property
    def losing(self) -> bool:
        """The safety net: measured tree steps not at least `margin` faster (tokens/s) than plain steps."""
        plain, tree = self.rate(False), self.rate(True)
        return (len(self.recent[True]) >= self.min_samples and plain is not None and tree is not None
                and tree < (1 + self.margin) * plain)

    def rate(self, tree: bool) -> float | None:
        """Measured tokens/s of the recent tree (or plain) steps; None before any."""
        steps = self.recent[tree]
        return sum(e for e, _ in steps) / max(sum(s for _, s in steps), 1e-9) if steps else None

    def drafting(self) -> bool:
        """Whether this step drafts at all (call once per step): not while speculation is held off."""
        if not self.adaptive or self.held == 0:
            return True
        self.held -= 1
        self.probe = self.held == 0  # the step after the hold drafts and probes
        return False

    def model_choice(self, batch: int, scores: list[float]) -> tuple[int, float]:
        """(k, gain): the k that maximizes the cost model's expected tokens/s and its predicted
        gain over a plain step (0.05 = 5% faster); all of them, gain inf, while there is no fit."""
        fit = self.cost.fit()
        if fit is None:
            return len(scores), float("inf")  # probe: measure a tree step
        a, o, b = fit
        c = self.calibration
        plain_rate = batch / (a + b * batch)
        best_k, best_rate, gain = 0, plain_rate, 0.0
        for k, p in enumerate(scores, 1):
            gain += min(1.0, c * p)
            rate = (batch + gain) / (a + o + b * (batch + k))
            if rate > best_rate:
                best_k, best_rate = k, rate
        return best_k, best_rate / plain_rate - 1

    def choose(self, batch: int, scores: list[float]) -> int:
        """How many of the ranked nodes (scores best first) to verify with `batch` paths."""
        if not self.adaptive:
            return len(scores)
        if not scores:
            return 0  # nothing to verify (a pending probe waits for a step with drafts)
        probe, self.probe = self.probe, False
        k, gain = self.model_choice(batch, scores)
        if self.samples[True] < self.learn:
            return k  # still learning what a tree step costs and yields
        if not self.recent[False]:
            return 0  # the net needs a plain step to compare with
        if self.losing:
            if probe:  # re-measure trees under the net
                self.probing = True
                return k or len(scores)
            self._hold()
            return 0
        if self.since[False] >= self.plain_every:
            return 0  # keep the plain rate current: the cost model may favour trees wrongly
        bound = self.compute_bound(batch)
        # compute-bound, a tree step's fixed cost (sampling every tree row, emitting, metadata) is
        # the part of `o` the fit sees least often, so its predicted gain is least reliable
        if k and gain >= (self.bound_gain_margin if bound else self.gain_margin):
            self.idle = 0
            return k
        self.idle += 1
        if (probe or self.idle >= self.patience) and bound:
            self._hold()
        return 0

    def compute_bound(self, batch: int) -> bool:
        """Whether a draft node must be accepted with probability >= `hold_above` just to pay for its
        own token, b*B / (a + b*B) by the cost model: there, steps on which nothing pays mean trees
        rarely will, and skipping the drafting is worth it. Below (small batches), drafting costs
        next to nothing and a repetition may start any step, so speculation is not held off on idle."""
        fit = self.cost.fit()
        if fit is None:
            return False
        a, _, b = fit
        return b * batch / (a + b * batch) >= self.hold_above

    def _hold(self) -> None:
        self.held, self.idle = self.hold_next, 0
        self.hold_next = min(2 * self.hold_next, self.max_hold)
        self.holds += 1

    def observe(self, tokens_fed: int, seconds: float, emitted: int, predicted: float = 0.0, accepted: int = 0,
                tree: bool = False) -> None:
        """One finished step: its size, time and tokens emitted; for a tree step, the verified
        nodes' summed scores and the draft tokens verification accepted."""
        self.cost.observe(tokens_fed, seconds, tree)
        if tree:
            self.accepted.append((accepted, predicted))
        self.samples[tree] += 1
        if tree and self.probing:
            self.probing = False
            plain = self.rate(False)
            if plain is not None and emitted / max(seconds, 1e-9) >= (1 + self.margin) * plain:
                # a probe under the net that wins starts a fresh measurement: the tree steps that
                # tripped the net are stale (drafts repeat more now, or a burst of load has passed)
                self.recent[True].clear()
        self.recent[tree].append((emitted, seconds))
        self.since[tree] = 0
        self.since[not tree] += 1
        if tree and not self.losing:
            self.hold_next = self.hold_base  # trees win again: a later hold starts short
