"""How far a proxy ranks architectures as a longer training does: every proxy trains the same committed Archs
(stratified by deploy GFLOPs over `space/spaces/small.yaml`), the reference retrains them at 120 epochs, 160 px.

    python benchmarks/proxy_fidelity.py pick                  # once: choose the Archs -> proxy_fidelity/archs.yaml
    python benchmarks/proxy_fidelity.py pilot [--dataset synth]   # 1-epoch host study: projected CPU-hours
    python benchmarks/proxy_fidelity.py run --dataset synth [--only NAME ...] [--seeds S ...] [--hours H] [--workers W]
    python benchmarks/proxy_fidelity.py report [--dataset synth] [--markdown]   # τ-b tables, paired bootstrap, terciles

Built on the product's commands: a proxy is a study (`repnas search --space small --enqueue A1.yaml ..
--no-early-stop --proxy seed=S ...`, one per training seed, the seed Arch as its baseline); the reference and
the 60-epoch default row are `repnas confirm` runs on the 1-epoch host study (`--epochs 120 --seeds 0 1`).
Every finished (dataset, proxy, seed, Arch) run is appended to proxy_fidelity/runs.jsonl (committed), so a
session that stops loses at most the runs in flight: `run` resumes the studies in proxy_fidelity/work/ (not
committed) and, if that folder is gone, starts studies for the missing runs only. Each command runs
single-threaded (OMP_NUM_THREADS=1, torch 1 thread) so that it can run beside other work on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

HERE = Path(__file__).resolve().parent / "proxy_fidelity"
ARCHS = HERE / "archs.yaml"
RUNS = HERE / "runs.jsonl"
WORK = HERE / "work"
SPACE = "small"
N_ARCHS = 12
LAST_K = 3  # "mean of the last k validations"
WORKERS = 1  # worker processes per command, each single-threaded (`run --workers`)

# The seed of the small space: the hand design's shape (depths 1-2-4-x-1, no SE) at the space's widest widths, P4
# at its deepest (8: the hand design's 14 is outside the small space), the wider head.
SEED = {"P1_depth": 1, "P1_width": 16, "P1_se": False, "P2_depth": 2, "P2_width": 24, "P2_se": False,
        "P3_depth": 4, "P3_width": 48, "P3_se": False, "P4_depth": 8, "P4_width": 96, "P4_se": False,
        "P5_depth": 1, "P5_width": 192, "P5_se": False, "head_width": 0.5, "head_depth": 1}

# Reference and confirm budgets on the host study (the default --data proxy otherwise: lr0, loss, val_every 5).
REFERENCE = {"epochs": 120, "imgsz": 160, "seeds": (0, 1)}
PRODUCT_METRIC = "last"  # what a study ranks on today: the last validation's mAP50-95
REFERENCE_BAR = 0.8  # the reference's own seed-to-seed τ-b must reach this (issue 12, item 2)
# default60 (today's --data default, half the reference's cost) with one seed: the whole evidence is capped at about
# 12 CPU-hours and its second seed would cost ~1.8 of them (pilot projection)
CONFIRM_ROWS = {"reference": REFERENCE, "default60": {"epochs": 60, "imgsz": 160, "seeds": (0,)}}
# The host study: 1 epoch at 160 px (also the pilot, and a row of its own); validated every 5 epochs as the synthetic
# host was (ProxyConfig's default; a CPU's --data default is now 3, nas.study.settings.DEVICE_PROXY), so the confirm
# runs record the same curve epochs on both datasets
HOST = {"epochs": 1, "imgsz": 160, "val_every": 5}

# Proxies: `repnas search` proxy options. Cost relative to the reference ~ epochs x imgsz^2 x fraction / (120 x 160^2).
PROXIES: dict[str, list[str]] = {
    "demo": ["--epochs", "10", "--imgsz", "64", "--val-every", "2", "--proxy", "lr0=0.004", "loss.obj=6.25"],
    "e15-160": ["--epochs", "15", "--imgsz", "160", "--val-every", "3"],
    "e30-96": ["--epochs", "30", "--imgsz", "96", "--val-every", "5"],
    "e30-96-obj160": ["--epochs", "30", "--imgsz", "96", "--val-every", "5", "--proxy", "obj_ref_imgsz=160"],
    "e20-128": ["--epochs", "20", "--imgsz", "128", "--val-every", "4"],
    "e20-128-obj160": ["--epochs", "20", "--imgsz", "128", "--val-every", "4", "--proxy", "obj_ref_imgsz=160"],
    "e30-160-frac50": ["--epochs", "30", "--imgsz", "160", "--val-every", "5", "--proxy", "fraction=0.5"],
    "e15-160-val50": ["--epochs", "15", "--imgsz", "160", "--val-every", "3", "--proxy", "val_fraction=0.5"],
}
SEEDS = {"synth": (0, 1), "raccoon": (0,)}


def data_yaml(dataset: str) -> str:
    if dataset == "synth":
        from nas.synth import default_dataset

        return str(default_dataset())
    shared = Path(os.environ.get("REPNAS_SHARED", Path(__file__).resolve().parents[2] / "shared"))
    return str(shared / "data" / "raccoon" / "data.yaml")


def arch_key(params: dict) -> str:
    return json.dumps({k: params[k] for k in sorted(params)}, sort_keys=True)


# ---------------------------------------------------------------------------------------------------------- pick
def pick(seed: int = 0, pool: int = 400) -> None:
    """Sample `pool` Archs of the small space, split deploy GFLOPs (640 px) into N_ARCHS equal-count strata and take
    the Arch nearest each stratum's median; write them with the seed Arch."""
    import optuna

    from space.searchspace import Arch, arch_cost, load_space, sample_arch

    space = load_space(SPACE)
    seed_arch = Arch.from_params(SEED, space)
    sampler = optuna.samplers.RandomSampler(seed=seed)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=sampler)
    seen, cands = {arch_key(SEED)}, []
    for _ in range(pool):
        trial = study.ask()
        arch = sample_arch(trial, space)
        key = arch_key(arch.to_params())
        if key not in seen:
            seen.add(key)
            cands.append((arch_cost(arch, 640, 80)[1], arch.to_params()))
        study.tell(trial, 0.0)
    cands.sort(key=lambda c: c[0])
    strata = np.array_split(np.arange(len(cands)), N_ARCHS)
    chosen = [cands[int(s[len(s) // 2])] for s in strata]
    out = {"space": SPACE, "how": f"{len(cands)} distinct random Archs (seed {seed}), {N_ARCHS} equal-count deploy-"
           "GFLOPs strata at 640 px, the median of each; plus the seed", "archs": {}}
    out["archs"]["seed"] = {"gflops_640": round(arch_cost(seed_arch, 640, 80)[1], 3), "params": SEED}
    for i, (gflops, params) in enumerate(chosen):
        out["archs"][f"a{i:02d}"] = {"gflops_640": round(gflops, 3), "params": params}
    HERE.mkdir(parents=True, exist_ok=True)
    ARCHS.write_text(yaml.safe_dump(out, sort_keys=False))
    print(f"wrote {ARCHS}: " + ", ".join(f"{n} {a['gflops_640']}" for n, a in out["archs"].items()))


def load_archs() -> dict[str, dict]:
    return {name: a["params"] for name, a in yaml.safe_load(ARCHS.read_text())["archs"].items()}


# ------------------------------------------------------------------------------------------------- runs.jsonl
def load_runs() -> list[dict]:
    if not RUNS.is_file():
        return []
    return [json.loads(line) for line in RUNS.read_text().splitlines() if line.strip()]


def _append(rows: list[dict]) -> None:
    if rows:
        with RUNS.open("a") as f:
            for row in rows:
                f.write(json.dumps(row, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _done(runs: list[dict], dataset: str, proxy: str, seed: int) -> set[str]:
    return {r["arch"] for r in runs if (r["dataset"], r["proxy"], r["seed"]) == (dataset, proxy, seed)}


def _repnas(args: list[str], log: Path) -> int:
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with log.open("a") as f:
        f.write(f"\n$ repnas {' '.join(args)}  # {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        return subprocess.call([sys.executable, "-m", "nas.cli", *args], stdout=f, stderr=subprocess.STDOUT, env=env)


def _harvest_study(dataset: str, proxy: str, seed: int, name: str) -> int:
    """Append the study's COMPLETE trials that runs.jsonl lacks; return how many."""
    from optuna.trial import TrialState

    from nas.study import load_study

    names = {arch_key(p): n for n, p in load_archs().items()}
    done = _done(load_runs(), dataset, proxy, seed)
    study = load_study(name, results=str(WORK))
    rows = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        a = t.user_attrs
        arch = names.get(arch_key(a.get("arch", {})))
        if arch is None or arch in done:
            continue
        done.add(arch)
        curve = [[int(e), m, m50] for e, m, m50 in (a.get("curve") or [])]
        epochs_csv = WORK / name / "trials" / str(t.number) / "epochs.csv"
        loss_sum = _loss_sum(epochs_csv)
        rows.append({"dataset": dataset, "proxy": proxy, "seed": seed, "arch": arch, "map50_95": t.values[0],
                     "map50": a.get("map50"), "curve": curve, "loss_sum": loss_sum,
                     "train_seconds": (a.get("seconds") or {}).get("train"), "latency_ms": a.get("latency_ms"),
                     "gflops_deploy": a.get("gflops_deploy"), "params": a.get("params"), "study": name,
                     "trial": t.number})
    _append(rows)
    return len(rows)


def _loss_sum(path: Path) -> float | None:
    import csv

    if not path.is_file():
        return None
    with path.open() as f:
        return float(sum(float(r["box"]) + float(r["obj"]) + float(r["cls"]) for r in csv.DictReader(f)))


def _harvest_confirm(dataset: str, name: str) -> int:
    """Append the host study's confirm runs (reference, default60) that runs.jsonl lacks."""
    from nas.study import load_study
    from nas.study.confirm import KIND, parse_key
    from nas.study.followups import followups

    study = load_study(name, results=str(WORK))
    names = {arch_key(p): n for n, p in load_archs().items()}
    by_budget = {(b["epochs"], b["imgsz"]): row for row, b in CONFIRM_ROWS.items()}
    runs = load_runs()
    rows = []
    for number, results in followups(study, KIND).items():
        t = study.trials[number]
        arch = names.get(arch_key(t.user_attrs.get("arch", {})))
        for key, r in results.items():
            k = parse_key(key)
            row = by_budget.get((k["epochs"], k["imgsz"]))
            if arch is None or row is None or arch in _done(runs, dataset, row, k["seed"]):
                continue
            runs.append({"dataset": dataset, "proxy": row, "seed": k["seed"], "arch": arch})
            rows.append({"dataset": dataset, "proxy": row, "seed": k["seed"], "arch": arch,
                         "map50_95": r["map50_95"], "map50": r["map50"], "curve": r["curve"],
                         "loss_sum": r["loss_sum"], "train_seconds": r["train_seconds"],
                         "latency_ms": t.user_attrs.get("latency_ms"),
                         "gflops_deploy": t.user_attrs.get("gflops_deploy"), "params": t.user_attrs.get("params"),
                         "study": name, "trial": number})
    _append(rows)
    return len(rows)


# ------------------------------------------------------------------------------------------------------ running
def _study_args(name: str, dataset: str, missing: list[str], extra: list[str]) -> list[str]:
    """`repnas search` for the missing Archs: the first is the baseline, the rest enqueued; nothing sampled."""
    archs = load_archs()
    files = []
    folder = WORK / "archs"
    folder.mkdir(parents=True, exist_ok=True)
    for arch in missing:
        path = folder / f"{arch}.yaml"
        path.write_text(yaml.safe_dump(archs[arch]))
        files.append(str(path))
    args = ["search", "--study", name, "--results", str(WORK), "--data", data_yaml(dataset), "--space", SPACE,
            "--trials", str(len(missing)), "--sampler", "random", "--baseline", files[0], "--no-early-stop",
            "--device", "cpu", "--quiet", "--workers", str(WORKERS), *extra]
    if len(files) > 1:
        args += ["--enqueue", *files[1:]]
    return args


def _with_seed(extra: list[str], seed: int) -> list[str]:
    if "--proxy" in extra:
        i = extra.index("--proxy")
        return [*extra[:i + 1], f"seed={seed}", *extra[i + 1:]]
    return [*extra, "--proxy", f"seed={seed}"]


def run_proxy(dataset: str, proxy: str, seed: int, extra: list[str], log: Path) -> None:
    """Train every Arch missing from runs.jsonl for (dataset, proxy, seed) through one study, and harvest it."""
    archs = list(load_archs())
    name = f"pf-{dataset}-{proxy}-s{seed}"
    if (WORK / name / "study.log").is_file():
        _harvest_study(dataset, proxy, seed, name)
        if _done(load_runs(), dataset, proxy, seed) >= set(archs):
            return
        code = _repnas(["resume", name, "--results", str(WORK), "--quiet", "--workers", str(WORKERS)], log)
    else:
        missing = [a for a in archs if a not in _done(load_runs(), dataset, proxy, seed)]
        if not missing:
            return
        code = _repnas(_study_args(name, dataset, missing, _with_seed(extra, seed)), log)
    added = _harvest_study(dataset, proxy, seed, name)
    print(f"{name}: {added} runs recorded (exit {code})", flush=True)


def host_name(dataset: str) -> str:
    """The 1-epoch host study holding every Arch: the pilot, the row 'e1-160', and where confirm runs live."""
    return f"pf-{dataset}-e1-160-s0"


def run_host(dataset: str, log: Path) -> None:
    run_proxy(dataset, "e1-160", 0, ["--epochs", str(HOST["epochs"]), "--imgsz", str(HOST["imgsz"]), "--val-every",
                                     str(HOST["val_every"])], log)


def run_confirm_row(dataset: str, row: str, log: Path) -> None:
    budget = CONFIRM_ROWS[row]
    seeds = [s for s in budget["seeds"] if s in SEEDS[dataset]]
    host = host_name(dataset)
    _harvest_confirm(dataset, host)  # runs a stopped session finished: recorded before anything else
    code = _repnas(["confirm", host, "--results", str(WORK), "--spread", "1000", "--epochs", str(budget["epochs"]),
                    "--imgsz", str(budget["imgsz"]), "--seeds", *map(str, seeds), "--quiet", "--workers",
                    str(WORKERS)], log)
    print(f"{host}: confirm {row}: {_harvest_confirm(dataset, host)} runs recorded (exit {code})", flush=True)


def order(dataset: str) -> list[tuple[str, int]]:
    """What `run` does: the host, the reference (the ceiling every row is read against), the proxies (seed 0, then
    seed 1), then the 60-epoch default."""
    steps = [("e1-160", 0), ("reference", -1)]
    for seed in SEEDS[dataset]:
        steps += [(p, seed) for p in PROXIES]
    return [*steps, ("default60", -1)]


def run(dataset: str, only: list[str] | None, hours: float | None, seeds: list[int] | None = None) -> None:
    import torch

    torch.set_num_threads(1)
    WORK.mkdir(parents=True, exist_ok=True)
    log = WORK / f"{dataset}.log"
    deadline = time.time() + hours * 3600 if hours else math.inf
    for proxy, seed in order(dataset):
        if only and proxy not in only:
            continue
        if seeds is not None and seed >= 0 and seed not in seeds:
            continue
        if time.time() > deadline:
            print("time is up; run again to go on", flush=True)
            return
        if proxy == "e1-160":
            run_host(dataset, log)
        elif seed < 0:
            run_confirm_row(dataset, proxy, log)
        else:
            run_proxy(dataset, proxy, seed, PROXIES[proxy], log)


# ------------------------------------------------------------------------------------------------------- pilot
def pilot(dataset: str) -> None:
    """Run (or read) the 1-epoch host study and project each row's CPU-hours from its per-Arch epoch times."""
    run_host(dataset, WORK / f"{dataset}.log")
    rows = [r for r in load_runs() if r["dataset"] == dataset and r["proxy"] == "e1-160"]
    per_epoch = sum(r["train_seconds"] for r in rows)  # one epoch of every Arch at 160 px, one seed
    print(f"pilot: one 160-px epoch of all {len(rows)} Archs on {dataset}: {per_epoch:.0f} s (1 thread)")
    total = 0.0
    for name, cfg, seeds in [*((n, _cost_args(PROXIES[n]), len(SEEDS[dataset])) for n in PROXIES),
                             *((n, (b["epochs"], b["imgsz"], 1.0), len(set(b["seeds"]) & set(SEEDS[dataset])))
                               for n, b in CONFIRM_ROWS.items())]:
        epochs, imgsz, fraction = cfg
        hours = per_epoch * epochs * (imgsz / 160) ** 2 * fraction * seeds / 3600
        total += hours
        print(f"  {name:<16} {epochs:>4} epochs {imgsz:>4} px fraction {fraction:<4} x {seeds} seeds: "
              f"~{hours:.2f} CPU-hours (relative cost {epochs * (imgsz / 160) ** 2 * fraction / 120:.3f})")
    print(f"projected total for {dataset}: ~{total:.1f} CPU-hours")


def _cost_args(args: list[str]) -> tuple[int, int, float]:
    epochs = int(args[args.index("--epochs") + 1])
    imgsz = int(args[args.index("--imgsz") + 1])
    fraction = next((float(a.split("=")[1]) for a in args if a.startswith("fraction=")), 1.0)
    return epochs, imgsz, fraction


# ------------------------------------------------------------------------------------------------------ report
def _metric(row: dict, metric: str) -> float:
    if metric == "last":
        return row["map50_95"]
    if metric == f"mean{LAST_K}":
        values = [m for _, m, _ in row["curve"][-LAST_K:]] or [row["map50_95"]]
        return float(np.mean(values))
    if metric == "loss":
        return -row["loss_sum"]  # a lower training loss ranks higher
    raise ValueError(metric)


def table(dataset: str) -> list[dict]:
    """One row per (proxy, metric): τ-b against the reference (mean over its seeds) with its 90% interval,
    seed-to-seed τ-b, τ-b within latency terciles, relative cost."""
    from nas.fidelity import agreement, kendall_tau_b, paired_difference, seed_to_seed_tau

    runs = [r for r in load_runs() if r["dataset"] == dataset]
    archs = list(load_archs())
    ref = {a: np.mean([r["map50_95"] for r in runs if r["proxy"] == "reference" and r["arch"] == a] or [np.nan])
           for a in archs}
    ref_seconds = {a: np.mean([r["train_seconds"] for r in runs if r["proxy"] == "reference" and r["arch"] == a]
                              or [np.nan]) for a in archs}
    full = [a for a in archs if np.isfinite(ref[a])]
    lat = {a: next((r["latency_ms"] for r in runs if r["arch"] == a and r["latency_ms"]), np.nan) for a in full}
    terciles = np.array_split(sorted(full, key=lambda a: lat[a]), 3)
    rows = []
    proxies = sorted({r["proxy"] for r in runs} - {"reference"})
    ref_vec = np.array([ref[a] for a in full])
    zero_cost = _zero_cost(dataset)
    baseline_vec = np.array([zero_cost["params"][0][a] for a in full], dtype=float) if zero_cost else \
        np.array([next(r["params"] for r in runs if r["arch"] == a) for a in full], dtype=float)
    for proxy in [*proxies, *zero_cost]:
        for metric in (("last", f"mean{LAST_K}", "loss") if proxy not in zero_cost else ("score",)):
            if proxy in zero_cost:
                seeds, cost = zero_cost[proxy], 0.0
            else:
                mine = [r for r in runs if r["proxy"] == proxy and r["arch"] in full]
                seeds = {}
                for r in mine:
                    seeds.setdefault(r["seed"], {})[r["arch"]] = _metric(r, metric)
                cost = _measured_cost(mine, ref_seconds)
            common = [a for a in full if all(a in s for s in seeds.values())]
            if len(common) < len(full) or not seeds:
                rows.append({"proxy": proxy, "metric": metric, "n": len(common), "incomplete": True})
                continue
            vec = np.mean([[s[a] for a in full] for s in seeds.values()], axis=0)
            agree = agreement(vec, ref_vec)
            if agree.tau_b is None:
                rows.append({"proxy": proxy, "metric": metric, "n": len(full), "incomplete": agree.why_not})
                continue
            s2s = seed_to_seed_tau(np.array([[s[a] for s in seeds.values()] for a in full])) if len(seeds) > 1 \
                else math.nan
            within = [kendall_tau_b([vec[full.index(a)] for a in t], [ref[a] for a in t]) for t in terciles]
            diff, interval = paired_difference(vec, baseline_vec, ref_vec)
            rows.append({"proxy": proxy, "metric": metric, "n": len(full), "tau_b": agree.tau_b,
                         "tau_ci": agree.to_dict()["tau_b_ci90"], "rho": agree.rho, "seed_tau": s2s,
                         "tercile_tau": within, "cost": cost, "nominal_cost": nominal_cost(proxy),
                         "vs_params": [diff, interval.low, interval.high], "scores": vec, "reference": ref_vec})
    return rows


def nominal_cost(proxy: str) -> float:
    """Training cost relative to the reference's from the settings: epochs x imgsz^2 x fraction (0 for zero-cost
    scores)."""
    if proxy in PROXIES:
        epochs, imgsz, fraction = _cost_args(PROXIES[proxy])
    elif proxy in CONFIRM_ROWS or proxy == "e1-160":
        budget = CONFIRM_ROWS.get(proxy, HOST)
        epochs, imgsz, fraction = budget["epochs"], budget["imgsz"], 1.0
    else:
        return 0.0
    return epochs * imgsz ** 2 * fraction / (REFERENCE["epochs"] * REFERENCE["imgsz"] ** 2)


def _measured_cost(mine: list[dict], ref_seconds: dict[str, float]) -> float:
    """Measured training cost relative to the reference's: the median over Archs of (this row's training seconds /
    the reference's, each a mean over its seeds). A per-Arch ratio and its median keep a run slowed by a busy
    machine (some reference runs shared the 2 cores with tests) from moving the figure."""
    by_arch: dict[str, list[float]] = {}
    for r in mine:
        by_arch.setdefault(r["arch"], []).append(r["train_seconds"])
    ratios = [np.mean(v) / ref_seconds[a] for a, v in by_arch.items() if np.isfinite(ref_seconds.get(a, np.nan))]
    return float(np.median(ratios)) if ratios else math.nan


MAX_COST = 0.25  # a proxy costs at most 1/4 of the reference (issue 12, item 2)
BARS = {"tau_b": 0.7, "seed_tau": 0.8}  # item 3: τ-b against the reference, seed-to-seed τ-b


def choose(rows: list[dict]) -> tuple[dict | None, str]:
    """Item 3's rule over `table` rows: the cheapest trained proxy (cost <= MAX_COST) meeting BARS; else the
    highest-τ one at that cost, with the shortfall said. Zero-cost scores and the confirm rows are not candidates."""
    cands = [r for r in rows if "tau_b" in r and r["metric"] != "score" and r["proxy"] not in CONFIRM_ROWS
             and math.isfinite(r["cost"]) and r["cost"] <= MAX_COST]
    if not cands:
        return None, "no proxy row is complete yet"
    meets = [r for r in cands if r["tau_b"] >= BARS["tau_b"] and r["seed_tau"] >= BARS["seed_tau"]]
    if meets:
        best = min(meets, key=lambda r: r["cost"])
        return best, (f"{best['proxy']} ({best['metric']}): the cheapest proxy meeting τ-b >= {BARS['tau_b']} and "
                      f"seed-to-seed τ-b >= {BARS['seed_tau']} at cost {best['cost']:.3f} <= {MAX_COST}")
    # each proxy ranks on the product's metric unless another of its metrics earns the switch (_metric_rule); the
    # highest τ-b among those rows wins (ties: the cheaper)
    finalists = [_metric_rule(max((r for r in cands if r["proxy"] == proxy),
                                  key=lambda r: (r["tau_b"], r["metric"] == PRODUCT_METRIC)), rows)
                 for proxy in dict.fromkeys(r["proxy"] for r in cands)]  # table order: ties settle the same way
    best, metric_note = max(finalists, key=lambda pair: (pair[0]["tau_b"], -pair[0]["cost"]))
    short = [f"τ-b {best['tau_b']:.3f} < {BARS['tau_b']}" if best["tau_b"] < BARS["tau_b"] else "",
             ("one training seed: seed-to-seed τ-b not measured" if math.isnan(best["seed_tau"]) else
              f"seed-to-seed τ-b {best['seed_tau']:.3f} < {BARS['seed_tau']}")
             if not best["seed_tau"] >= BARS["seed_tau"] else ""]
    return best, (f"{best['proxy']} ({best['metric']}): no proxy meets the bars; the highest τ-b at cost <= "
                  f"{MAX_COST} ({best['cost']:.3f}){metric_note}; shortfall: {', '.join(x for x in short if x)}")


def _metric_rule(best: dict, rows: list[dict]) -> tuple[dict, str]:
    """The ranking metric: the product's (PRODUCT_METRIC, the last validation's mAP50-95, what every table shows)
    unless another metric of the same proxy beats it by a paired-bootstrap interval that excludes 0 (the issue's
    rule for one row beating another). Returns the row chosen and what was said about the switch."""
    from nas.fidelity import paired_difference

    if best["metric"] == PRODUCT_METRIC:
        return best, ""
    product = next((r for r in rows if r["proxy"] == best["proxy"] and r["metric"] == PRODUCT_METRIC
                    and "tau_b" in r), None)
    if product is None:
        return best, ""
    diff, interval = paired_difference(best["scores"], product["scores"], best["reference"])
    low, high = interval.low, interval.high
    if low > 0:
        return best, f", and its {best['metric']} beats {PRODUCT_METRIC} by {diff:.3f} [{low:.2f}, {high:.2f}]"
    return product, (f"; its {best['metric']} ranks higher (τ-b {best['tau_b']:.3f}) but not by an interval that "
                     f"excludes 0 ({diff:+.3f} [{low:.2f}, {high:.2f}]), so the ranking metric stays {PRODUCT_METRIC}")


def versus(best: dict, rows: list[dict]) -> list[tuple[str, str, float, float, float]]:
    """τ-b(best) - τ-b(other) with its paired-bootstrap 90% interval over Archs, for every other complete row:
    `best` beats a row only when the interval excludes 0."""
    from nas.fidelity import paired_difference

    out = []
    for r in rows:
        if "tau_b" not in r or r is best:
            continue
        diff, interval = paired_difference(best["scores"], r["scores"], best["reference"])
        out.append((r["proxy"], r["metric"], diff, interval.low, interval.high))
    return out


ZERO_COST = HERE / "zero_cost.jsonl"  # benchmarks/zero_cost.py: training-free scores per (dataset, Arch, seed)
ZERO_COST_SCORES = ("params", "gflops_deploy", "entropy", "synflow", "grad_norm")


def _zero_cost(dataset: str) -> dict[str, dict[int, dict[str, float]]]:
    """score -> seed -> Arch -> value, from zero_cost.jsonl (params and GFLOPs: seed 0 only, they have no seed)."""
    out: dict[str, dict[int, dict[str, float]]] = {}
    if not ZERO_COST.is_file():
        return out
    for line in ZERO_COST.read_text().splitlines():
        r = json.loads(line)
        if r["dataset"] != dataset:
            continue
        for score in ZERO_COST_SCORES:
            if score in ("params", "gflops_deploy") and r["seed"] != 0:
                continue
            out.setdefault(score, {}).setdefault(r["seed"], {})[r["arch"]] = float(r[score])
    return out


def report(dataset: str, markdown: bool = False) -> None:
    runs = [r for r in load_runs() if r["dataset"] == dataset]
    ref = [r for r in runs if r["proxy"] == "reference"]
    print(f"{dataset}: {len(runs)} runs recorded; reference runs: {len(ref)}")
    if ref:
        from nas.fidelity import seed_to_seed_tau

        by_seed: dict[int, dict[str, float]] = {}
        for r in ref:
            by_seed.setdefault(r["seed"], {})[r["arch"]] = r["map50_95"]
        archs = [a for a in load_archs() if all(a in s for s in by_seed.values())]
        lat = {r["arch"]: r["latency_ms"] for r in ref}
        print("reference mAP50-95 per Arch (by latency; " + ", ".join(f"seed {k}" for k in sorted(by_seed)) + "): " +
              "; ".join(f"{a} " + "/".join(f"{by_seed[k][a]:.3f}" if a in by_seed[k] else "-" for k in sorted(by_seed))
                        for a in sorted(lat, key=lat.get)))
        if len(by_seed) > 1 and len(archs) >= 5:
            tau = seed_to_seed_tau(np.array([[s[a] for s in by_seed.values()] for a in archs]))
            print(f"reference seed-to-seed τ-b {tau:.3f} over {len(archs)} Archs: bar >= {REFERENCE_BAR} "
                  + ("met" if tau >= REFERENCE_BAR else "NOT met (the ceiling on every τ-b against it)"))
    head = ("proxy", "metric", "n", "τ-b", "90% CI", "ρ", "seed τ", "τ in latency terciles", "cost", "nominal",
            "τ - τ(params) [90% CI]")
    widths = (16, 6, 3, 6, 15, 6, 7, 22, 6, 7, 26)
    if markdown:
        print("| " + " | ".join(head) + " |\n|" + " --- |" * len(head))
    else:
        print(" ".join(f"{h:<{w}}" if i < 2 else f"{h:>{w}}" for i, (h, w) in enumerate(zip(head, widths))))
    rows = table(dataset)
    for row in rows:
        if row.get("incomplete"):
            why = row["incomplete"] if isinstance(row["incomplete"], str) else "runs missing"
            cells = [row["proxy"], row["metric"], str(row["n"]), f"(not computed: {why})"]
        else:
            ci = "" if row["tau_ci"] is None else f"[{row['tau_ci'][0]:.2f}, {row['tau_ci'][1]:.2f}]"
            d = row["vs_params"]
            cells = [row["proxy"], row["metric"], str(row["n"]), f"{row['tau_b']:.3f}", ci, f"{row['rho']:.3f}",
                     f"{row['seed_tau']:.3f}", " ".join("nan" if math.isnan(t) else f"{t:.2f}"
                                                         for t in row["tercile_tau"]),
                     f"{row['cost']:.3f}", f"{row['nominal_cost']:.3f}", f"{d[0]:.3f} [{d[1]:.2f}, {d[2]:.2f}]"]
        if markdown:
            print("| " + " | ".join(cells) + " |")
        else:
            print(" ".join(f"{c:<{w}}" if i < 2 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(cells, widths))))
    best, why = choose(rows)
    print(f"choice (item 3): {why}" if dataset == "synth" else
          f"item 3's rule on {dataset}, for comparison (the product's choice is made on synth): {why}")
    if best is not None:
        print(f"τ-b({best['proxy']}, {best['metric']}) - τ-b(row) [paired-bootstrap 90% CI]; it beats a row only "
              "when the interval excludes 0:")
        for proxy, metric, diff, low, high in versus(best, rows):
            mark = "beats" if low > 0 else ("loses to" if high < 0 else "no difference")
            print(f"  vs {proxy:<16} {metric:<6} {diff:>7.3f} [{low:.2f}, {high:.2f}]  {mark}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("pick")
    for name in ("pilot", "run", "report"):
        p = sub.add_parser(name)
        p.add_argument("--dataset", choices=tuple(SEEDS), default="synth")
        if name == "run":
            p.add_argument("--only", nargs="+", help="these rows only (proxy names, reference, default60)")
            p.add_argument("--seeds", type=int, nargs="+", help="these training seeds of the proxy rows only")
            p.add_argument("--hours", type=float, help="stop starting new studies after this many hours")
            p.add_argument("--workers", type=int, default=1, help="single-threaded worker processes per command")
        if name == "report":
            p.add_argument("--markdown", action="store_true", help="the table as Markdown (for RESULTS.md)")
    args = parser.parse_args()
    if args.command == "pick":
        pick()
    elif args.command == "pilot":
        pilot(args.dataset)
    elif args.command == "run":
        global WORKERS
        WORKERS = args.workers
        run(args.dataset, args.only, args.hours, args.seeds)
    else:
        report(args.dataset, args.markdown)


if __name__ == "__main__":
    main()
