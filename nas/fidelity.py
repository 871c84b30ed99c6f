"""How far a proxy's ranking can be trusted: rank correlations between two rankings of the same candidates, with
bootstrap intervals, top-k overlap and seed-to-seed agreement. Used by `repnas confirm` and
`benchmarks/proxy_fidelity.py`.

Kendall's τ-b (ties in either ranking corrected for: Kendall 1945, "The treatment of ties in ranking problems") and
Spearman's ρ come from scipy.stats. The bootstrap resamples candidates with replacement, paired across the rankings
(Efron & Tibshirani 1993, ch. 13, percentile interval). It is written here, not taken from
`scipy.stats.bootstrap`, because at the small n of a NAS population many resamples hold one value in a ranking
(τ undefined); scipy turns the whole interval into NaN, while this skips those resamples and says how many it
skipped.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats

MIN_N = 5  # below this many candidates no τ or ρ is reported
CONFIDENCE = 0.90
RESAMPLES = 2000


def _pair(x: ArrayLike, y: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"two rankings of the same candidates must be 1-D of one length, got {a.shape} and {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("rankings must be finite (drop the candidates without a value first)")
    return a, b


def kendall_tau_b(x: ArrayLike, y: ArrayLike) -> float:
    """Kendall's τ-b between two scores of the same N candidates ((N,) each); NaN when either is constant."""
    a, b = _pair(x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns on constant input and returns NaN, which is the answer here
        return float(stats.kendalltau(a, b, variant="b").statistic) if len(a) >= 2 else math.nan


def spearman_rho(x: ArrayLike, y: ArrayLike) -> float:
    """Spearman's ρ (average ranks for ties) between two scores ((N,) each); NaN when either is constant."""
    a, b = _pair(x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(stats.spearmanr(a, b).statistic) if len(a) >= 2 else math.nan


@dataclass(frozen=True)
class Interval:
    """A bootstrap percentile interval; `used` of `resamples` resamples had a defined statistic."""

    low: float
    high: float
    used: int
    resamples: int


def bootstrap_interval(statistic, arrays: Sequence[ArrayLike], *, confidence: float = CONFIDENCE,
                       resamples: int = RESAMPLES, seed: int = 0) -> Interval:
    """Percentile interval of `statistic(*arrays)` over `resamples` paired resamples of the N candidates.

    arrays: (N,) each, element i of every array belongs to candidate i. Resamples where the statistic is NaN
    (e.g. all values tied) are skipped; the interval is NaN when fewer than half remain.
    """
    cols = [np.asarray(a, dtype=float) for a in arrays]
    n = len(cols[0])
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        idx = rng.integers(0, n, n)
        values.append(statistic(*(c[idx] for c in cols)))
    values = np.asarray(values, dtype=float)
    ok = values[np.isfinite(values)]
    if len(ok) < resamples / 2:
        return Interval(math.nan, math.nan, len(ok), resamples)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(ok, [tail, 100 - tail])
    return Interval(float(low), float(high), len(ok), resamples)


@dataclass(frozen=True)
class Agreement:
    """Rank agreement between two scores of `n` candidates. `tau_b`/`rho` are None below MIN_N, with `why_not`."""

    n: int
    tau_b: float | None = None
    tau_interval: Interval | None = None
    rho: float | None = None
    rho_interval: Interval | None = None
    why_not: str = ""

    def line(self) -> str:
        """One printed line: τ-b and ρ with their intervals, or why there are none."""
        if self.tau_b is None:
            return f"Kendall τ-b: not computed ({self.why_not})"

        def ci(i: Interval) -> str:
            return "[n/a]" if math.isnan(i.low) else f"[{i.low:.2f}, {i.high:.2f}]"

        return (f"Kendall τ-b {self.tau_b:.3f} {ci(self.tau_interval)}, Spearman ρ {self.rho:.3f} "
                f"{ci(self.rho_interval)} ({CONFIDENCE:.0%} bootstrap intervals over candidates, n={self.n})")

    def to_dict(self) -> dict:
        def ci(i: Interval | None):
            return None if i is None or math.isnan(i.low) else [i.low, i.high]

        return {"n": self.n, "tau_b": self.tau_b, "tau_b_ci90": ci(self.tau_interval), "rho": self.rho,
                "rho_ci90": ci(self.rho_interval), "why_not": self.why_not}


def agreement(x: ArrayLike, y: ArrayLike, *, min_n: int = MIN_N, seed: int = 0) -> Agreement:
    """Kendall τ-b and Spearman ρ between two scores of the same candidates ((N,) each), with 90% intervals.

    Below `min_n` candidates nothing is computed: with 4 candidates one swapped pair moves τ by 1/3 and a
    bootstrap interval spans most of [-1, 1], so a number would mislead more than inform.
    """
    a, b = _pair(x, y)
    n = len(a)
    if n < min_n:
        return Agreement(n, why_not=f"n={n} < {min_n}: with so few candidates one swapped pair moves τ by "
                                    f"{2 / max(n * (n - 1) / 2, 1):.2f}; confirm more trials")
    tau, rho = kendall_tau_b(a, b), spearman_rho(a, b)
    if math.isnan(tau):
        return Agreement(n, why_not="one of the rankings has every candidate tied")
    return Agreement(n, tau, bootstrap_interval(kendall_tau_b, (a, b), seed=seed), rho,
                     bootstrap_interval(spearman_rho, (a, b), seed=seed))


def paired_difference(x1: ArrayLike, x2: ArrayLike, reference: ArrayLike, *, statistic=kendall_tau_b,
                      seed: int = 0) -> tuple[float, Interval]:
    """statistic(x1, reference) - statistic(x2, reference) and its paired-bootstrap 90% interval (the same
    resampled candidates for both): proxy 1 beats proxy 2 only when the interval excludes 0. (N,) each."""
    a1, ref = _pair(x1, reference)
    a2, _ = _pair(x2, reference)

    def diff(p, q, r):
        return statistic(p, r) - statistic(q, r)

    return diff(a1, a2, ref), bootstrap_interval(diff, (a1, a2, ref), seed=seed)


def top_k_overlap(x: ArrayLike, y: ArrayLike, k: int) -> int:
    """How many of the k best candidates by `x` are among the k best by `y` (higher is better; ties broken by
    candidate order). (N,) each; k is clipped to N."""
    a, b = _pair(x, y)
    k = max(0, min(k, len(a)))
    top = (set(np.argsort(-v, kind="stable")[:k].tolist()) for v in (a, b))
    return len(next(top) & next(top))


def seed_to_seed_tau(scores: ArrayLike) -> float:
    """Mean Kendall τ-b over every pair of seeds; `scores` is (N candidates, S >= 2 seeds). NaN when S < 2."""
    m = np.asarray(scores, dtype=float)
    if m.ndim != 2 or m.shape[1] < 2:
        return math.nan
    taus = [kendall_tau_b(m[:, i], m[:, j]) for i, j in combinations(range(m.shape[1]), 2)]
    return float(np.nanmean(taus)) if np.isfinite(taus).any() else math.nan
