"""Eager PyTorch vs ONNX Runtime on a CPU: do they rank the same Archs the same way? (issue 15, the CPU default)

    python benchmarks/latency_backends.py [--imgsz 640] [--threads N] [--iters 30] [--repeats 1] [--quick]

Builds the 12 committed Archs of benchmarks/proxy_fidelity/archs.yaml (the small space, stratified by deploy
GFLOPs) and its seed, fused, and times each Arch with the `torch` and the `onnxruntime` backends of
`nas.latency.measure_latency` (the same decoded graph, no NMS), each interleaved with the fused seed as its reference,
exactly as a study times a trial; the two backends take turns on every Arch (which goes first alternates). Prints
per Arch the medians and ratios to the seed under each backend and their ranks, then:
  - Kendall tau-b (scipy.stats.kendalltau) between the two latency-ratio orders of the 12 Archs;
  - the Pareto front (mAP50-95 up, latency ratio down; `nas.pareto.pareto_mask`) under each backend, with a quality
    axis from benchmarks/proxy_fidelity/runs.jsonl: the 120-epoch reference mAP where it covers every Arch, else the
    first proxy row that does (named in the output), averaged over training seeds; with none, only orders compare;
  - the decision issue 15 states: tau-b < 0.9 or any front member changing makes `onnxruntime` the CPU default.
`--quick`: 4 Archs at 64 px, 4 iterations, 1 thread: a smoke check of the script in well under a minute (its
figures mean nothing). Run it on a quiet machine; record the output in benchmarks/RESULTS.md with the machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import yaml
from scipy.stats import kendalltau

from nas.latency import LatencyConfig, device_info, measure_latency
from nas.pareto import pareto_mask
from nas.synth import SynthConfig
from pruning.reparam import fuse_model
from space.builder import build_model
from space.cost import count_gflops
from space.searchspace import Arch, load_space

HERE = Path(__file__).resolve().parent / "proxy_fidelity"
BACKENDS = ("torch", "onnxruntime")
TAU_BAR = 0.9  # issue 15: below it (or a changed front) the CPU default becomes onnxruntime
QUALITY_ROWS = ("reference", "e1-160")  # runs.jsonl proxies, in order of preference for the quality axis
QUICK_ARCHS = ("a00", "a03", "a07", "a11")


def load_archs() -> dict[str, Arch]:
    """The seed and the 12 committed Archs (benchmarks/proxy_fidelity/archs.yaml), as Archs of its space."""
    data = yaml.safe_load((HERE / "archs.yaml").read_text())
    space = load_space(data["space"])
    return {name: Arch.from_params(a["params"], space) for name, a in data["archs"].items()}


def quality_axis(names: list[str], dataset: str = "synth") -> tuple[str | None, dict[str, float]]:
    """(which runs.jsonl row, {arch: mAP50-95 averaged over training seeds}) for the first QUALITY_ROWS proxy that
    has every Arch of `names`; (None, {}) when none does."""
    path = HERE / "runs.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    for proxy in QUALITY_ROWS:
        found: dict[str, list[float]] = {}
        for row in rows:
            if row.get("proxy") == proxy and row.get("dataset") == dataset and row.get("map50_95") is not None:
                found.setdefault(row["arch"], []).append(float(row["map50_95"]))
        if all(name in found for name in names):
            return proxy, {name: statistics.fmean(found[name]) for name in names}
        print(f"quality axis: runs.jsonl proxy {proxy!r} covers {sum(n in found for n in names)} of {len(names)} "
              "Archs; not used")
    return None, {}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--imgsz", type=int, default=640, help="latency input size (default: the small space's 640)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="CPU threads while timing: torch's and ONNX Runtime's intra-op (default %(default)s)")
    parser.add_argument("--iters", type=int, default=30, help="timed passes per model and measurement")
    parser.add_argument("--repeats", type=int, default=1, help="measurements per Arch and backend (median kept)")
    parser.add_argument("--quick", action="store_true", help="4 Archs, 64 px, 4 iterations, 1 thread: a smoke check")
    args = parser.parse_args()
    if args.quick:
        args.imgsz, args.iters, args.threads, args.repeats = 64, 4, 1, 1
    archs = load_archs()
    seed = archs.pop("seed")
    if args.quick:
        archs = {name: archs[name] for name in QUICK_ARCHS}
    nc = SynthConfig().classes  # the synthetic set's classes, as the proxy-fidelity studies were built
    models = {name: fuse_model(build_model(a.to_yaml(nc))).eval() for name, a in {"seed": seed, **archs}.items()}
    cfg = {b: LatencyConfig.for_device(torch.device("cpu"), backend=b, iters=args.iters, threads=args.threads,
                                       rounds=min(5, args.iters), warmup=1 if args.quick else 3) for b in BACKENDS}
    info = device_info(torch.device("cpu"), args.threads)
    print(f"CPU {info['name']}, {args.threads} thread(s) of {info['cores']} cores; torch {info['torch']}; "
          f"{args.imgsz}x{args.imgsz} px, batch 1, {args.iters} timed passes x {args.repeats} repeat(s), "
          f"interleaved with the fused seed")

    timed: dict[str, dict[str, list]] = {name: {b: [] for b in BACKENDS} for name in models}
    for repeat in range(args.repeats):
        for k, name in enumerate(models):
            order = BACKENDS if (k + repeat) % 2 == 0 else BACKENDS[::-1]
            for backend in order:
                lat = measure_latency(models[name], args.imgsz, 1, "cpu", cfg[backend], reference=models["seed"])
                timed[name][backend].append(lat)
                if lat.noisy:
                    print(f"  note: {name} {backend}: p90/median {lat.spread:.2f} (a busy machine)", file=sys.stderr)
    ort_version = timed["seed"]["onnxruntime"][0].device.get("onnxruntime")
    ratio = {b: {n: statistics.median(t.latency_ratio for t in timed[n][b]) for n in models} for b in BACKENDS}
    median = {b: {n: statistics.median(t.median_ms for t in timed[n][b]) for n in models} for b in BACKENDS}
    names = list(archs)  # the ranked Archs (the seed is every ratio's reference: 1 by construction)
    ranks = {b: {n: r + 1 for r, n in enumerate(sorted(names, key=lambda n: ratio[b][n]))} for b in BACKENDS}

    print(f"\n{'arch':<6}{'GFLOPs':>8}{'torch ms':>10}{'ratio':>8}{'rank':>6}{'ORT ms':>10}{'ratio':>8}{'rank':>6}")
    for name in ["seed", *names]:
        gflops = count_gflops(models[name], args.imgsz)
        cells = "".join(f"{median[b][name]:>10.3f}{ratio[b][name]:>8.3f}{ranks[b].get(name, '-')!s:>6}"
                        for b in BACKENDS)
        print(f"{name:<6}{gflops:>8.3f}{cells}")
    print(f"(ORT: onnxruntime {ort_version}, CPU execution provider, {args.threads} intra-op thread(s), inter-op 1)")

    tau = kendalltau([ratio["torch"][n] for n in names], [ratio["onnxruntime"][n] for n in names], variant="b")
    print(f"\nKendall tau-b between the torch and onnxruntime latency-ratio orders of {len(names)} Archs: "
          f"{tau.statistic:.3f} (p = {tau.pvalue:.2g})")
    proxy, quality = quality_axis(["seed", *names])
    changed = None
    if proxy is None:
        print("fronts: no runs.jsonl row has a mAP for every Arch: latency-ratio orders compared only")
    else:
        everyone = ["seed", *names]
        maps = [quality[n] for n in everyone]
        fronts = {b: {n for n, on in zip(everyone, pareto_mask(maps, [ratio[b][n] for n in everyone])) if on}
                  for b in BACKENDS}
        changed = fronts["torch"] ^ fronts["onnxruntime"]
        print(f"fronts (mAP50-95 of runs.jsonl proxy {proxy!r}, mean over seeds, vs latency ratio): torch "
              f"{sorted(fronts['torch'])}; onnxruntime {sorted(fronts['onnxruntime'])}; "
              + (f"members that change: {sorted(changed)}" if changed else "no member changes"))
    switch = tau.statistic < TAU_BAR or bool(changed)
    print(f"decision (issue 15: tau-b < {TAU_BAR} or a changed front member -> onnxruntime): the CPU default for new "
          f"studies {'becomes onnxruntime' if switch else 'stays torch'}"
          + (" (orders only: no quality axis)" if proxy is None else ""))
    if args.quick:
        print("(--quick: a smoke check; these figures decide nothing)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
