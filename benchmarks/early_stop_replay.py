"""Replay the early-stopping rule on a recorded study (one run with --no-early-stop and frequent validation).

    python benchmarks/early_stop_replay.py --study NAME [--results DIR] [--storage URL] [--save trials.json]

Prints how many trials the rule (nas.earlystop, default parameters) would have stopped, at which epoch, and
whether any of them ends on the study's final Pareto front. `--save` writes the recorded curves as the JSON that
tests/nas/test_earlystop.py replays.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from optuna.trial import TrialState

from nas.earlystop import EarlyStopConfig, curve_from_attr, replay
from nas.pareto import pareto_mask
from nas.study import load_study


def recorded_trials(study) -> tuple[list[dict], int]:
    trials, epochs = [], 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        a = t.user_attrs
        if a.get("curve") and a.get("latency_ms") is not None:
            trials.append({"number": t.number, "latency_ms": a["latency_ms"], "map50_95": t.values[0],
                           "curve": {str(k): v for k, v in curve_from_attr(a["curve"]).items()}})
            epochs = max(epochs, int(a.get("proxy", {}).get("epochs", 0)))
    return trials, epochs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", required=True)
    parser.add_argument("--results", default="results")
    parser.add_argument("--storage")
    parser.add_argument("--save", help="write the recorded trials (JSON) here")
    args = parser.parse_args()
    trials, epochs = recorded_trials(load_study(args.study, storage=args.storage, results=args.results))
    if args.save:
        Path(args.save).write_text(json.dumps({"epochs": epochs, "trials": trials}, indent=1) + "\n")
    front = pareto_mask([t["map50_95"] for t in trials], [t["latency_ms"] for t in trials])
    on_front = {t["number"] for t, f in zip(trials, front) if f}
    stopped = replay(trials, epochs, EarlyStopConfig())
    print(f"# {len(trials)} recorded trials, {epochs} epochs, final front {sorted(on_front)}")
    for number, reason in stopped.items():
        print(f"trial {number:>3}: {reason}")
    saved = sum(epochs - int(r.split("epoch ")[1].split(":")[0]) for r in stopped.values())
    print(f"stopped {len(stopped)}/{len(trials)} ({len(stopped) / max(len(trials), 1):.0%}); on the final front: "
          f"{len(on_front & set(stopped))}; epochs saved {saved} of {epochs * len(trials)}")


if __name__ == "__main__":
    main()
