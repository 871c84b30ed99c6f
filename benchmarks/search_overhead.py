"""Search overhead: the share of each trial's wall time spent outside proxy training, for a study's trials.

    python benchmarks/search_overhead.py                 # the zero-option study results/default
    python benchmarks/search_overhead.py --study NAME [--storage URL] [--results DIR]
    python benchmarks/search_overhead.py --run           # first run `repnas search` (zero options) from scratch

A trial's wall time is its Optuna start-to-complete span: sampling, building, cost counting, the latency phase,
training, fusing with its equivalence check, evaluation, writing files and telling the storage. "Outside
training" is that span minus the train phase (fit, including its validations). The Pareto export after each
trial runs between trials and is timed separately (the gap to the next trial's start). Bar (issue 4): <= 10%.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

from optuna.trial import TrialState

from nas.study import load_study


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", default="default")
    parser.add_argument("--storage")
    parser.add_argument("--results", default="results")
    parser.add_argument("--run", action="store_true", help="run the zero-option `repnas search` first")
    args = parser.parse_args()
    if args.run:
        subprocess.run([sys.executable, "-m", "nas.cli", "search", "--quiet"], check=True)
    study = load_study(args.study, storage=args.storage, results=args.results)
    trials = [t for t in study.get_trials(deepcopy=False)
              if t.state in (TrialState.COMPLETE, TrialState.PRUNED) and t.datetime_complete and "train" in
              (t.user_attrs.get("seconds") or {})]
    print(f"# study {args.study}: {len(trials)} trained trials (complete or stopped early)")
    print(f"{'trial':>5} {'state':<8} {'wall_s':>8} {'train_s':>8} {'latency_s':>9} {'other_s':>8} {'outside':>8}")
    shares, walls, trains, gaps = [], 0.0, 0.0, []
    ordered = sorted(study.get_trials(deepcopy=False), key=lambda t: t.datetime_start or t.datetime_complete or 0)
    starts = [t.datetime_start for t in ordered if t.datetime_start]
    for t in trials:
        wall = (t.datetime_complete - t.datetime_start).total_seconds()
        phases = t.user_attrs["seconds"]
        train = phases["train"]
        share = (wall - train) / wall
        shares.append(share)
        walls += wall
        trains += train
        later = [s for s in starts if s > t.datetime_complete]
        if later:
            gaps.append((min(later) - t.datetime_complete).total_seconds())
        print(f"{t.number:>5} {t.state.name:<8} {wall:>8.1f} {train:>8.1f} {phases.get('latency', 0):>9.1f} "
              f"{wall - train - phases.get('latency', 0):>8.1f} {share:>8.1%}")
    if not trials:
        sys.exit("no trained trials in this study")
    print(f"median share outside training: {statistics.median(shares):.1%}; over all trials "
          f"{(walls - trains) / walls:.1%} of {walls:.0f} s")
    if gaps:
        total = walls + sum(gaps)
        print(f"between trials (Pareto export, claim): median {statistics.median(gaps):.2f} s; counting it, "
              f"{(total - trains) / total:.1%} of the study's wall time is outside training")


if __name__ == "__main__":
    main()
