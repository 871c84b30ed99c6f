"""Sampler quality on a tabular replay (issue 12, item 5b): an enumerable space whose every Arch was trained once
at one proxy, searched by the study's TPE sampler and by random sampling, k trainings each, over many sampler seeds.

    python benchmarks/sampler_replay.py enumerate                 # the tabular space's Archs -> tabular/archs.yaml
    python benchmarks/sampler_replay.py train --proxy e15-160     # train every Arch once at that proxy (resumable)
    python benchmarks/sampler_replay.py replay --proxy e15-160 [--seeds 20] [--k 4 6 8 12]

The tabular space (`TABULAR`) is the small space (space/spaces/small.yaml) with five binary dimensions left free
(P2, P3 and P4 depth, P4 width, head width) and the others fixed at the proxy-fidelity seed's values: 32 Archs, the
seed among them. `train` runs them through the product's own `repnas search --enqueue` exactly as
benchmarks/proxy_fidelity.py runs a proxy, and records each run in tabular/runs.jsonl (committed).

`replay` runs an Optuna study per (k, sampler, sampler seed) whose objective is a table lookup: the trial's Arch is
sampled by the product's own `space.searchspace.sample_arch`, its (mAP50-95, latency) read from the table. As in
a study, the seed Arch is trained first, an Arch already trained is not trained again (the trial is pruned and does
not count), and k counts trainings. TPE is configured as `nas.study.storage.make_sampler` configures it for a
k-trial study (multivariate, grouped, n_startup_trials = max(3, k // 4)). The hypervolume (nas.pareto.hypervolume,
reference point (0, 2 x the seed's latency), as in a study) after k trainings is reported as the median and the
interquartile range over sampler seeds, and as a fraction of the table's whole-space hypervolume.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import yaml

HERE = Path(__file__).resolve().parent / "proxy_fidelity"
TAB = HERE / "tabular"
ARCHS = TAB / "archs.yaml"
RUNS = TAB / "runs.jsonl"
WORK = HERE / "work"

FREE = ("P2_depth", "P3_depth", "P4_depth", "P4_width", "head_width")  # the tabular space's free dimensions


def _proxy_fidelity():
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import proxy_fidelity

    return proxy_fidelity


def tabular_space_dict() -> dict:
    """The small space with only FREE left to choose (the rest fixed at the proxy-fidelity seed)."""
    from space.searchspace import builtin_space_path

    pf = _proxy_fidelity()
    data = yaml.safe_load(builtin_space_path("small").read_text())
    for stage, spec in data["stages"].items():
        for key in ("depth", "width", "se"):
            if f"{stage}_{key}" not in FREE:
                spec[key] = pf.SEED[f"{stage}_{key}"] if key != "se" else bool(pf.SEED[f"{stage}_se"])
    data["head"] = {"width": data["head"]["width"], "depth": [pf.SEED["head_depth"]]}
    return data


def tabular_space():
    from space.searchspace import parse_space

    return parse_space(tabular_space_dict(), "benchmarks/sampler_replay.py TABULAR")


def enumerate_archs() -> list[dict]:
    """Every Arch of the tabular space as Optuna params (the product of FREE's choices)."""
    from space.searchspace import Arch

    space = tabular_space()
    data = tabular_space_dict()
    choices = []
    for name in FREE:
        if name.startswith("head"):
            choices.append(data["head"]["width"])
        else:
            stage, key = name.split("_")
            choices.append(data["stages"][stage][key])
    pf = _proxy_fidelity()
    out = []
    for values in itertools.product(*choices):
        params = pf.SEED | dict(zip(FREE, values))
        out.append(Arch.from_params(params, space).to_params())
    return out


def cmd_enumerate() -> None:
    from space.searchspace import Arch, arch_cost

    space = tabular_space()
    archs = enumerate_archs()
    out = {"space": "small", "free": list(FREE), "how": "the product of FREE's choices; the rest at the seed's",
           "archs": {}}
    for i, params in enumerate(archs):
        out["archs"][f"t{i:02d}"] = {"gflops_640": round(arch_cost(Arch.from_params(params, space), 640, 80)[1], 3),
                                     "params": params}
    TAB.mkdir(parents=True, exist_ok=True)
    ARCHS.write_text(yaml.safe_dump(out, sort_keys=False))
    print(f"wrote {ARCHS}: {len(archs)} Archs")


def load_table(proxy: str, dataset: str = "synth") -> dict[str, tuple[float, float]]:
    """arch_key -> (mAP50-95 mean over recorded seeds, latency_ms median over recorded runs) for every tabular Arch
    trained at `proxy` (tabular/runs.jsonl, and proxy_fidelity/runs.jsonl for Archs that coincide)."""
    pf = _proxy_fidelity()
    names = {n: a["params"] for n, a in yaml.safe_load(ARCHS.read_text())["archs"].items()}
    pf_names = {n: p for n, p in pf.load_archs().items()}
    rows = [json.loads(x) for x in RUNS.read_text().splitlines() if x.strip()] if RUNS.is_file() else []
    rows = [(names[r["arch"]], r) for r in rows if r["dataset"] == dataset and r["proxy"] == proxy]
    rows += [(pf_names[r["arch"]], r) for r in pf.load_runs()
             if r["dataset"] == dataset and r["proxy"] == proxy and r["arch"] in pf_names]
    maps: dict[str, list[float]] = {}
    lats: dict[str, list[float]] = {}
    for params, r in rows:
        key = pf.arch_key(params)
        maps.setdefault(key, []).append(r["map50_95"])
        if r.get("latency_ms"):
            lats.setdefault(key, []).append(r["latency_ms"])
    wanted = {pf.arch_key(p) for p in names.values()}
    return {k: (float(np.mean(maps[k])), float(np.median(lats[k]))) for k in maps if k in wanted and k in lats}


def cmd_train(proxy: str, dataset: str, workers: int = 1) -> None:
    """Train the tabular Archs missing from the table at `proxy`, through one product study per run of this
    command (`repnas search --enqueue`, as proxy_fidelity.run_proxy does), and record them."""
    pf = _proxy_fidelity()
    archs = {n: a["params"] for n, a in yaml.safe_load(ARCHS.read_text())["archs"].items()}
    have = set(load_table(proxy, dataset))
    missing = [n for n, p in archs.items() if pf.arch_key(p) not in have]
    if not missing:
        print("every tabular Arch is trained at", proxy)
        return
    name = f"tab-{dataset}-{proxy}-s0"
    log = WORK / f"tabular-{dataset}.log"
    WORK.mkdir(parents=True, exist_ok=True)
    folder = WORK / "tabular-archs"
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for n in missing:
        (folder / f"{n}.yaml").write_text(yaml.safe_dump(archs[n]))
        files.append(str(folder / f"{n}.yaml"))
    if (WORK / name / "study.log").is_file():
        args = ["resume", name, "--results", str(WORK), "--quiet", "--workers", str(workers)]
    else:
        args = ["search", "--study", name, "--results", str(WORK), "--data", pf.data_yaml(dataset), "--space",
                pf.SPACE, "--trials", str(len(files)), "--sampler", "random", "--baseline", files[0],
                "--no-early-stop", "--device", "cpu", "--quiet", "--workers", str(workers),
                *pf._with_seed(pf.PROXIES[proxy], 0)]
        if len(files) > 1:
            args += ["--enqueue", *files[1:]]
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with log.open("a") as f:
        f.write(f"\n$ repnas {' '.join(args)}  # {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        code = subprocess.call([sys.executable, "-m", "nas.cli", *args], stdout=f, stderr=subprocess.STDOUT, env=env)
    print(f"{name}: {_harvest(name, proxy, dataset, archs)} runs recorded (exit {code})")


def _harvest(name: str, proxy: str, dataset: str, archs: dict[str, dict]) -> int:
    from optuna.trial import TrialState

    from nas.study import load_study

    pf = _proxy_fidelity()
    by_key = {pf.arch_key(p): n for n, p in archs.items()}
    done = set(load_table(proxy, dataset))
    rows = []
    for t in load_study(name, results=str(WORK)).get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        key = pf.arch_key(t.user_attrs.get("arch", {}))
        if key in by_key and key not in done:
            done.add(key)
            rows.append({"dataset": dataset, "proxy": proxy, "seed": 0, "arch": by_key[key],
                         "map50_95": t.values[0], "latency_ms": t.user_attrs.get("latency_ms"),
                         "train_seconds": (t.user_attrs.get("seconds") or {}).get("train"), "study": name,
                         "trial": t.number})
    with RUNS.open("a") as f:
        for r in rows:
            f.write(json.dumps(r, sort_keys=True) + "\n")
    return len(rows)


def replay_once(table: dict[str, tuple[float, float]], sampler_name: str, seed: int, k: int) -> float:
    """Hypervolume after k trainings of one replayed k-trial study (sampler `tpe` or `random`, sampler seed
    `seed`)."""
    import optuna

    from nas.pareto import hypervolume
    from nas.study.storage import make_sampler
    from space.searchspace import Arch, sample_arch

    pf = _proxy_fidelity()
    space = tabular_space()
    seed_key = pf.arch_key(Arch.from_params(pf.SEED, space).to_params())
    reference = (0.0, 2.0 * table[seed_key][1])
    sampler = make_sampler(SimpleNamespace(trials=k, seed=seed, sampler=sampler_name))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
    study.enqueue_trial(Arch.from_params(pf.SEED, space).to_params())
    trained: list[tuple[float, float]] = []
    seen: set[str] = set()
    asks = 0
    while len(trained) < min(k, len(table)) and asks < 200 * k:
        asks += 1
        trial = study.ask()
        key = pf.arch_key(sample_arch(trial, space).to_params())
        if key in seen:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)  # an Arch already trained does not count
            continue
        seen.add(key)
        value = table[key]
        study.tell(trial, list(value))
        trained.append(value)
    m, lat = zip(*trained)
    return hypervolume(m, lat, reference)


def cmd_replay(proxy: str, dataset: str, seeds: int, ks: list[int]) -> None:
    """Print (and save to tabular/replay-DATASET-PROXY.json) the median [IQR] hypervolume fraction after each k of
    `ks` trainings for TPE and random over `seeds` sampler seeds, P(TPE > random) over seed pairs and the two-sided
    Mann-Whitney U test's p-value (scipy.stats.mannwhitneyu; the samplers' seeds are independent draws)."""
    from scipy.stats import mannwhitneyu

    from nas.pareto import hypervolume

    table = load_table(proxy, dataset)
    n = len(yaml.safe_load(ARCHS.read_text())["archs"])
    if len(table) < n:
        print(f"only {len(table)} of {n} tabular Archs are trained at {proxy}: run `train --proxy {proxy}` first")
        return
    pf = _proxy_fidelity()
    from space.searchspace import Arch

    seed_key = pf.arch_key(Arch.from_params(pf.SEED, tabular_space()).to_params())
    m, lat = zip(*table.values())
    full = hypervolume(m, lat, (0.0, 2.0 * table[seed_key][1]))
    print(f"tabular replay on {dataset} at proxy {proxy}: {n} Archs, whole-space hypervolume {full:.4f}; "
          f"{seeds} sampler seeds; median [IQR] of hypervolume / whole-space hypervolume after k trainings")
    print(f"{'k':>3} {'TPE':>22} {'random':>22} {'P(TPE > random)':>16} {'Mann-Whitney p':>14}")
    # one replayed study per (k, sampler, seed): TPE is configured for a k-trial study, as `repnas search --trials k`
    finals = {(k, s): np.array([replay_once(table, s, seed, k) for seed in range(seeds)])
              for k in ks for s in ("tpe", "random")}
    saved = {"dataset": dataset, "proxy": proxy, "archs": n, "whole_space_hypervolume": full, "sampler_seeds": seeds,
             "rows": []}
    for k in ks:
        cells, row = [], {"k": k}
        for s in ("tpe", "random"):
            v = finals[k, s] / full
            q1, med, q3 = np.percentile(v, [25, 50, 75])
            cells.append(f"{med:.3f} [{q1:.3f}, {q3:.3f}]")
            row[s] = {"median": med, "q1": q1, "q3": q3}
        a, b = finals[k, "tpe"], finals[k, "random"]
        test = mannwhitneyu(a, b, alternative="two-sided")  # U / (n1 n2) = P(TPE > random) + P(tie) / 2
        win = float(test.statistic) / (len(a) * len(b))
        row["p_tpe_beats_random"], row["mann_whitney_p"] = win, float(test.pvalue)
        saved["rows"].append(row)
        print(f"{k:>3} {cells[0]:>22} {cells[1]:>22} {win:>16.2f} {test.pvalue:>14.3f}")
    out = TAB / f"replay-{dataset}-{proxy}.json"
    out.write_text(json.dumps(saved, indent=1, default=float) + "\n")
    print(f"saved {out.relative_to(HERE.parent.parent)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("enumerate")
    for name in ("train", "replay"):
        p = sub.add_parser(name)
        p.add_argument("--proxy", required=True, help="a proxy of benchmarks/proxy_fidelity.py PROXIES")
        p.add_argument("--dataset", default="synth", choices=("synth", "raccoon"))
        if name == "train":
            p.add_argument("--workers", type=int, default=1, help="single-threaded worker processes")
        if name == "replay":
            p.add_argument("--seeds", type=int, default=20, help="sampler seeds per sampler (default 20)")
            p.add_argument("--k", type=int, nargs="+", default=[4, 6, 8, 12], help="trainings (default 4 6 8 12)")
    args = parser.parse_args()
    if args.command == "enumerate":
        cmd_enumerate()
    elif args.command == "train":
        cmd_train(args.proxy, args.dataset, args.workers)
    else:
        cmd_replay(args.proxy, args.dataset, args.seeds, args.k)


if __name__ == "__main__":
    main()
