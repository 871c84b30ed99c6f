"""End to end (issue 12, item 5a): does one TPE study at a proxy find an Arch that beats the seed at the reference
budget, at <= 0.7x the seed's latency?

    python benchmarks/efficacy.py run --proxy e15-160 [--workers 2]   # the study, then the confirmation (resumable)
    python benchmarks/efficacy.py report --proxy e15-160

The study is the product's own `repnas search` on the default synthetic set over the small space: TPE (sampler seed
0), the proxy-fidelity seed (benchmarks/proxy_fidelity.py SEED) as the baseline, early stopping on (the product's
default), the proxy's options from benchmarks/proxy_fidelity.py PROXIES (training seed 0). Its budget is a total
training time of at most BUDGET_SEEDS trainings of the seed at that proxy, the seed's own training (trial 0, timed in
the same study) the unit; every training counts, the seed's and early-stopped ones included. The study starts with
BUDGET_SEEDS trials and is grown with `repnas resume --trials N` while the training seconds spent plus the longest
training so far still fit in the budget.

The winner is the trial with the best proxy mAP50-95 among those measured at <= MAX_RATIO x the seed's latency (the
study's `latency_ratio`, timed interleaved with the seed). `repnas confirm --trials W --epochs 120 --imgsz 160
--seeds 0 1` trains it and the seed (the baseline is always confirmed) at the reference budget of
benchmarks/proxy_fidelity.py. Bar: the winner's confirmed mAP50-95 (mean of the two seeds) >= the seed's, at
<= MAX_RATIO x its latency. `report` prints the figures and the verdict and writes them to efficacy.json (committed).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import proxy_fidelity as pf

BUDGET_SEEDS = 8  # total training time <= 8 trainings of the seed at the proxy (issue 12, item 5a)
MAX_RATIO = 0.7  # the winner's latency <= 0.7 x the seed's
RESULT = pf.HERE / "efficacy.json"


def study_name(proxy: str, dataset: str = "synth") -> str:
    return f"ef-{dataset}-{proxy}"


def _load(name: str):
    from nas.study import load_study

    return load_study(name, results=str(pf.WORK))


def spending(study) -> dict:
    """Training seconds of the study: the seed's (trial 0), all trainings', the longest; trials that count."""
    from optuna.trial import TrialState

    seconds = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        train = (t.user_attrs.get("seconds") or {}).get("train")
        if train is not None:
            seconds[t.number] = float(train)
    return {"seed": seconds.get(0), "spent": sum(seconds.values()), "longest": max(seconds.values(), default=0.0),
            "trainings": len(seconds)}


def run_study(proxy: str, workers: int, log: Path) -> None:
    """Start or grow the study until one more training of the longest kind would not fit in the budget."""
    name = study_name(proxy)
    if not (pf.WORK / name / "study.log").is_file():
        folder = pf.WORK / "archs"
        folder.mkdir(parents=True, exist_ok=True)
        seed_file = folder / "seed.yaml"
        seed_file.write_text(yaml.safe_dump(pf.load_archs()["seed"]))
        args = ["search", "--study", name, "--results", str(pf.WORK), "--data", pf.data_yaml("synth"), "--space",
                pf.SPACE, "--trials", str(BUDGET_SEEDS), "--sampler", "tpe", "--seed", "0", "--baseline",
                str(seed_file), "--device", "cpu", "--quiet", "--workers", str(workers),
                *pf._with_seed(pf.PROXIES[proxy], 0)]
        code = pf._repnas(args, log)
        print(f"{name}: search exit {code}", flush=True)
    from nas.study.attrs import counts

    while True:
        study = _load(name)
        s = spending(study)
        if s["seed"] is None:
            print(f"{name}: the seed's trial has no training time yet; run again", flush=True)
            return
        budget = BUDGET_SEEDS * s["seed"]
        counted = sum(counts(t) for t in study.get_trials(deepcopy=False))
        room = budget - s["spent"]
        more = int(room // s["longest"]) if s["longest"] > 0 else 0
        print(f"{name}: {s['trainings']} trainings, {s['spent']:.0f} s of a {budget:.0f} s budget "
              f"({BUDGET_SEEDS} x the seed's {s['seed']:.0f} s); room for {more} more of the longest "
              f"({s['longest']:.0f} s)", flush=True)
        if more < 1:
            return
        target = counted + more
        code = pf._repnas(["resume", name, "--results", str(pf.WORK), "--trials", str(target), "--quiet",
                           "--workers", str(workers)], log)
        if code != 0:
            print(f"{name}: resume exit {code}; stopping here", flush=True)
            return


def winner(study) -> tuple[object | None, object]:
    """(the best proxy mAP50-95 at <= MAX_RATIO x the seed's latency, or None; the baseline trial)."""
    from optuna.trial import TrialState

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    base = next(t for t in done if t.number == 0)
    fast = [t for t in done if t.number != 0 and t.user_attrs.get("latency_ratio", math.inf) <= MAX_RATIO]
    return (max(fast, key=lambda t: (t.values[0], -t.number)) if fast else None), base


def run_confirm(proxy: str, workers: int, log: Path) -> None:
    study = _load(study_name(proxy))
    best, _ = winner(study)
    if best is None:
        print(f"no trial of {study_name(proxy)} measures <= {MAX_RATIO}x the seed's latency: nothing to confirm")
        return
    ref = pf.REFERENCE
    code = pf._repnas(["confirm", study_name(proxy), "--results", str(pf.WORK), "--trials", str(best.number),
                       "--epochs", str(ref["epochs"]), "--imgsz", str(ref["imgsz"]), "--seeds",
                       *map(str, ref["seeds"]), "--quiet", "--workers", str(workers)], log)
    print(f"{study_name(proxy)}: confirm trial {best.number} and the seed: exit {code}", flush=True)


def report(proxy: str) -> dict | None:
    from nas.study.confirm import confirmed_runs

    name = study_name(proxy)
    if not (pf.WORK / name / "study.log").is_file():
        if RESULT.is_file():
            saved = json.loads(RESULT.read_text()).get(proxy)
            if saved:
                print(json.dumps(saved, indent=2))
                return saved
        print(f"{name}: no study yet (run `python benchmarks/efficacy.py run --proxy {proxy}`)")
        return None
    study = _load(name)
    s = spending(study)
    best, base = winner(study)
    budget = BUDGET_SEEDS * s["seed"]
    out = {"study": name, "proxy": proxy, "proxy_args": pf.PROXIES[proxy], "trainings": s["trainings"],
           "train_seconds": round(s["spent"], 1), "budget_seconds": round(budget, 1),
           "budget_used": round(s["spent"] / budget, 3), "seed_trial": {"latency_ms": base.user_attrs["latency_ms"],
                                                                        "proxy_map50_95": base.values[0]}}
    print(f"{name}: {s['trainings']} trainings in {s['spent']:.0f} s = {s['spent'] / budget:.2f} of the budget "
          f"({BUDGET_SEEDS} x the seed's {s['seed']:.0f} s at {proxy})")
    if best is None:
        out["verdict"] = f"no trial at <= {MAX_RATIO}x the seed's latency"
        print(out["verdict"])
        return _save(proxy, out)
    out["winner"] = {"trial": best.number, "arch": best.user_attrs.get("arch"),
                     "latency_ratio": best.user_attrs["latency_ratio"], "latency_ms": best.user_attrs["latency_ms"],
                     "proxy_map50_95": best.values[0], "gflops_deploy": best.user_attrs.get("gflops_deploy")}
    print(f"winner: trial {best.number}, latency {best.user_attrs['latency_ratio']:.3f}x the seed's, proxy "
          f"mAP50-95 {best.values[0]:.4f} (the seed: {base.values[0]:.4f})")
    budget_key = f"epochs={pf.REFERENCE['epochs']},imgsz={pf.REFERENCE['imgsz']}"
    runs = confirmed_runs(study, budget_key)
    confirmed = {}
    for label, number in (("seed", 0), ("winner", best.number)):
        per_seed = {int(k): v["map50_95"] for k, v in runs.get(number, {}).items()}
        values = np.array(list(per_seed.values()), dtype=float)
        confirmed[label] = {"per_seed": per_seed, "mean": float(values.mean()) if len(values) else None,
                            "std": float(values.std(ddof=1)) if len(values) > 1 else None}
        print(f"  {label:<6} trial {number:>3} at {budget_key}: " + (
            ", ".join(f"seed {k} {v:.4f}" for k, v in sorted(per_seed.items())) or "not confirmed yet"))
    out["confirmed"] = confirmed
    complete = all(len(confirmed[k]["per_seed"]) == len(pf.REFERENCE["seeds"]) for k in confirmed)
    if not complete:
        out["verdict"] = "confirmation incomplete"
    else:
        w, b = confirmed["winner"]["mean"], confirmed["seed"]["mean"]
        ratio = best.user_attrs["latency_ratio"]
        met = w >= b and ratio <= MAX_RATIO
        out["verdict"] = (f"bar {'MET' if met else 'NOT met'}: winner {w:.4f} vs seed {b:.4f} confirmed mAP50-95 "
                          f"(mean of {len(pf.REFERENCE['seeds'])} seeds) at {ratio:.3f}x its latency")
    print(out["verdict"])
    return _save(proxy, out)


def _save(proxy: str, out: dict) -> dict:
    saved = json.loads(RESULT.read_text()) if RESULT.is_file() else {}
    saved[proxy] = out
    RESULT.write_text(json.dumps(saved, indent=2, sort_keys=True, default=str) + "\n")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "report"):
        p = sub.add_parser(name)
        p.add_argument("--proxy", required=True, choices=tuple(pf.PROXIES),
                       help="a proxy of benchmarks/proxy_fidelity.py PROXIES (the one item 3 chose)")
        if name == "run":
            p.add_argument("--workers", type=int, default=1, help="single-threaded worker processes")
            p.add_argument("--no-confirm", action="store_true", help="the study only")
    args = parser.parse_args()
    if args.command == "run":
        import torch

        torch.set_num_threads(1)
        pf.WORK.mkdir(parents=True, exist_ok=True)
        log = pf.WORK / "efficacy.log"
        run_study(args.proxy, args.workers, log)
        if not args.no_confirm:
            run_confirm(args.proxy, args.workers, log)
        report(args.proxy)
    else:
        report(args.proxy)


if __name__ == "__main__":
    main()
