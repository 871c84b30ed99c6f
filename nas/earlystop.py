"""Early stopping for a two-objective study (Optuna's `report`/`should_prune` refuse multi-objective studies).

The rule, applied at every validation epoch k of a trial's proxy training:

    stop at epoch k (k >= min_epoch_fraction x epochs, and at least `min_finished` finished trials exist)
    when some finished trial that costs no more, latency_j <= (1 + latency_slack) x latency,
    had at epoch k a clearly higher mAP50-95 than this trial's best so far:
        mAP_j(k) >= best(k) + max(margin, rel_margin x mAP_j(k), noise_factor x noise)
    where best(k) is this trial's highest validated mAP50-95 up to epoch k, and noise is the study's own
    validation noise: the median change of mAP50-95 between consecutive validations of the finished trials.

It respects the trade-off: only a trial that is at least as fast and clearly better *at the same point of
training* can stop another one, so a cheap model with a low mAP is never stopped by a slower, better one (it may
belong on the front). "Clearly" scales with how noisy the study's validation is (a small val split makes mAP jump
between epochs), and the candidate is credited with its best value so far, so one bad validation does not stop it.
`replay` measures the rule on recorded studies (benchmarks/early_stop_replay.py). The per-epoch mAP of every trial
is kept in its user attrs ("curve": [[epoch, mAP50-95, mAP50], ...]).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class EarlyStopConfig:
    """Parameters of the rule in the module docstring; `enabled=False` switches it off."""

    enabled: bool = True
    min_finished: int = 3  # finished (COMPLETE) trials needed before the rule acts
    min_epoch_fraction: float = 0.3  # never stop before this share of the proxy's epochs
    margin: float = 0.02  # absolute mAP50-95 margin ...
    rel_margin: float = 0.2  # ... or this share of the leader's mAP at the same epoch, whichever is larger
    latency_slack: float = 0.0  # "costs no more": latency_j <= (1 + slack) x latency
    noise_factor: float = 2.0  # ... or this many times the study's validation noise

    def __post_init__(self):
        if self.min_finished < 1 or not 0 <= self.min_epoch_fraction <= 1 or self.margin < 0 or self.rel_margin < 0 \
                or self.latency_slack < 0 or self.noise_factor < 0:
            raise ValueError(f"EarlyStopConfig: need min_finished >= 1, 0 <= min_epoch_fraction <= 1 and "
                             f"non-negative margins and slack, got {self}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Finished:
    """What the rule needs of a finished trial: its latency objective and its per-epoch mAP50-95."""

    number: int
    latency_ms: float
    curve: dict[int, float]  # epoch -> mAP50-95 at that epoch's validation


def curve_from_attr(value: object) -> dict[int, float]:
    """The "curve" user attr ([[epoch, mAP50-95, mAP50], ...]) as {epoch: mAP50-95}; {} when absent or malformed."""
    out: dict[int, float] = {}
    if isinstance(value, list):
        for row in value:
            if isinstance(row, (list, tuple)) and len(row) >= 2 and row[1] is not None:
                out[int(row[0])] = float(row[1])
    return out


def validation_noise(finished: Sequence[Finished]) -> float:
    """The median absolute change of mAP50-95 between consecutive validations of the finished trials (0 if none)."""
    import statistics

    changes = []
    for f in finished:
        epochs = sorted(f.curve)
        changes += [abs(f.curve[b] - f.curve[a]) for a, b in itertools.pairwise(epochs)]
    return statistics.median(changes) if changes else 0.0


def should_stop(epoch: int, map50_95: float, latency_ms: float, epochs: int, finished: Sequence[Finished],
                cfg: EarlyStopConfig, noise: float | None = None) -> str | None:
    """Why the trial should stop at `epoch` (a one-line reason naming the trial that beats it), or None.

    `map50_95` is the trial's best validated mAP50-95 so far; `noise` the study's validation noise (default:
    computed from `finished`, see `validation_noise`).
    """
    too_early = epoch < cfg.min_epoch_fraction * epochs
    if not cfg.enabled or len(finished) < cfg.min_finished or epoch >= epochs or too_early:
        return None
    noise = validation_noise(finished) if noise is None else noise
    best: tuple[float, Finished] | None = None
    for f in finished:
        if f.latency_ms > (1 + cfg.latency_slack) * latency_ms or epoch not in f.curve:
            continue
        other = f.curve[epoch]
        margin = max(cfg.margin, cfg.rel_margin * other, cfg.noise_factor * noise)
        if other >= map50_95 + margin and (best is None or other > best[0]):
            best = other, f
    if best is None:
        return None
    other, f = best
    return (f"early stop at epoch {epoch}: trial {f.number} (latency {f.latency_ms:.3f} <= {latency_ms:.3f} ms) had "
            f"mAP50-95 {other:.4f} at this epoch vs {map50_95:.4f} (best so far)")


def replay(trials: Iterable[dict], epochs: int, cfg: EarlyStopConfig = EarlyStopConfig()) -> dict[int, str]:
    """Replay a recorded study in trial order; return {trial number: reason} for the trials the rule stops.

    Each trial is {"number", "latency_ms", "curve": {epoch: mAP50-95}}. As in a live study, a trial is compared
    with the earlier trials that finished (those the rule did not stop).
    """
    finished: list[Finished] = []
    stopped: dict[int, str] = {}
    for t in sorted(trials, key=lambda t: t["number"]):
        curve = {int(k): float(v) for k, v in t["curve"].items()}
        best = float("-inf")
        for epoch in sorted(curve):
            best = max(best, curve[epoch])
            reason = should_stop(epoch, best, t["latency_ms"], epochs, finished, cfg)
            if reason:
                stopped[t["number"]] = reason
                break
        else:
            finished.append(Finished(t["number"], t["latency_ms"], curve))
    return stopped
