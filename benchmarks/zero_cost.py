"""Training-free scores (nas/zerocost.py) of the proxy-fidelity Archs, for the τ-b table of issue #12 item 2.

    python benchmarks/zero_cost.py --dataset synth|raccoon [--imgsz 160] [--seeds 0 1]

Scores every Arch of proxy_fidelity/archs.yaml (space "small") with each seed and replaces that dataset's rows of
proxy_fidelity/zero_cost.jsonl (one JSON line per (dataset, arch, seed): the scores and their milliseconds), then
prints a table. Torch runs on one thread (run it with OMP_NUM_THREADS=1 too), to run beside other work on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml
from scipy.stats import kendalltau

HERE = Path(__file__).resolve().parent / "proxy_fidelity"
ARCHS = HERE / "archs.yaml"
OUT = HERE / "zero_cost.jsonl"
SPACE = "small"
SCORES = ("params", "gflops_deploy", "entropy", "synflow", "grad_norm")
TIMED = ("cost", "build", "batch", "entropy", "synflow", "grad_norm")


def data_yaml(dataset: str) -> Path:
    if dataset == "synth":
        from nas.synth import default_dataset

        return default_dataset()
    shared = Path(os.environ.get("REPNAS_SHARED", Path(__file__).resolve().parents[2] / "shared"))
    return shared / "data" / "raccoon" / "data.yaml"


def run(dataset: str, imgsz: int, seeds: list[int]) -> list[dict]:
    from nas.zerocost import score_arch
    from space.searchspace import load_space

    space = load_space(SPACE)
    archs = yaml.safe_load(ARCHS.read_text())["archs"]
    data = data_yaml(dataset)
    rows = []
    for name, entry in archs.items():
        for seed in seeds:
            scores = score_arch(entry["params"], space, data, imgsz=imgsz, seed=seed)
            rows.append({"dataset": dataset, "arch": name, "seed": seed, "imgsz": imgsz, **scores})
            print(f"  {name} seed {seed}: " + ", ".join(f"{k} {scores[k]:.4g}" for k in SCORES), file=sys.stderr)
    return rows


def save(rows: list[dict], dataset: str) -> None:
    """Replace `dataset`'s rows of OUT by `rows`, keeping the other datasets' rows."""
    from nas.files import write_text_atomic

    kept = []
    if OUT.is_file():
        kept = [line for line in OUT.read_text().splitlines() if line and json.loads(line)["dataset"] != dataset]
    write_text_atomic(OUT, "".join(f"{line}\n" for line in kept + [json.dumps(r, sort_keys=True) for r in rows]))


def report(rows: list[dict]) -> None:
    seeds = sorted({r["seed"] for r in rows})
    by = {(r["arch"], r["seed"]): r for r in rows}
    names = sorted({r["arch"] for r in rows}, key=lambda n: by[(n, seeds[0])]["gflops_deploy"])
    print(f"{'arch':6} {'params':>9} {'GFLOPs':>7}  " + "  ".join(
        f"{'entropy s' + str(s):>11} {'log10 syn s' + str(s):>13} {'grad_norm s' + str(s):>13}" for s in seeds))
    for n in names:
        first = by[(n, seeds[0])]
        cells = "  ".join(f"{by[(n, s)]['entropy']:11.2f} {_log10(by[(n, s)]['synflow']):13.2f} "
                          f"{by[(n, s)]['grad_norm']:13.3f}" for s in seeds)
        print(f"{n:6} {first['params']:9,d} {first['gflops_deploy']:7.2f}  {cells}")
    print("\nms per Arch (median, max over Archs and seeds): " + ", ".join(
        f"{k} {statistics.median(r['ms'][k] for r in rows):.0f} ({max(r['ms'][k] for r in rows):.0f})"
        for k in TIMED))
    print("\nKendall τ-b over Archs (seed 0), each score against params; and seed 0 against seed 1:")
    for k in SCORES[1:]:
        tau_params, _ = kendalltau([by[(n, seeds[0])]["params"] for n in names],
                                   [by[(n, seeds[0])][k] for n in names])
        line = f"  {k:13} vs params {tau_params:+.3f}"
        if len(seeds) > 1:
            tau_seed, _ = kendalltau([by[(n, seeds[0])][k] for n in names], [by[(n, seeds[1])][k] for n in names])
            line += f"   seed {seeds[0]} vs {seeds[1]} {tau_seed:+.3f}"
        print(line)


def _log10(x: float) -> float:
    import math

    return math.log10(x) if x > 0 else float("-inf")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=("synth", "raccoon"), required=True)
    parser.add_argument("--imgsz", type=int, default=160)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    rows = run(args.dataset, args.imgsz, args.seeds)
    save(rows, args.dataset)
    print(f"{args.dataset}: {len(rows)} rows -> {OUT} ({time.perf_counter() - start:.0f} s)\n")
    report(rows)


if __name__ == "__main__":
    main()
