"""Pruning to a measured latency target (`repnas prune --target-latency`): time to reach it and an independent check.

    python benchmarks/prune_latency.py [--sizes 320 640] [--target 0.6] [--threads 2] [--repeats 3] [--device cpu]
                                      [--backend torch|onnxruntime|cudagraph]

For each input size: the seed model (../shared/reference/seed_model.yaml, nc=80, random weights: latency does
not depend on them) fused, then `nas.prune.prune_job(..., target_latency="0.6x")` as the CLI runs it without data
(l2 importance computed once, no evaluation, no fine-tuning): the FLOPs fraction is searched on measurements, each
candidate timed interleaved with the unpruned model (`nas.latency.measure_latency`, the device's default
LatencyConfig), then an independent re-measurement (median of 3 interleaved runs) is checked against ±3% of the
target. Printed per size and repeat: timed candidates, the FLOPs fraction chosen, the search's ratio, the check's
three ratios and median, whether it is within ±3%, and the seconds from the start of the job to the end of the
check (the issue's bar: at 320 px on this CPU within ±3% in <= 60 s; 640 px reported without a bar). The final
`measure` timing of prune_job (a fourth comparison) is off: the check is the measurement.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from nas.device import resolve_device
from nas.latency import LatencyConfig, device_info
from nas.prune import prune_job
from pruning.reparam import fuse_model
from space.builder import build_model

SEED = Path(__file__).resolve().parents[2] / "shared" / "reference" / "seed_model.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(SEED))
    parser.add_argument("--sizes", type=int, nargs="+", default=[320, 640])
    parser.add_argument("--target", type=float, default=0.6)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for pruning and timing")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backend", help="latency backend (default: the device's, LatencyConfig.for_device)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dev = resolve_device(args.device)
    torch.manual_seed(0)
    model = fuse_model(build_model(args.model, nc=80)).eval()
    info = device_info(dev, args.threads if dev.type == "cpu" else None)
    cfg = LatencyConfig.for_device(dev, **({"backend": args.backend} if args.backend else {}))
    print(f"device {info.get('name')} ({dev}), {args.threads} threads; target {args.target}x; backend {cfg.backend}; "
          f"torch {torch.__version__}")
    print(f"{'imgsz':>5} {'rep':>3} {'cands':>5} {'FLOPs':>6} {'search':>7} {'check (3 runs)':>22} {'median':>7} "
          f"{'error':>7} {'within':>6} {'seconds':>8}")
    for imgsz in args.sizes:
        seconds, within = [], []
        for rep in range(args.repeats):
            start = time.perf_counter()
            report = prune_job(model, None, None, target_latency=f"{args.target}x", imgsz=imgsz, importance="l2",
                               device=str(dev), evaluate_before=False, measure=False, latency=cfg,
                               progress=lambda line: None)
            took = time.perf_counter() - start
            lt = report.latency_target
            seconds.append(took)
            within.append(lt["within"])
            check = " ".join(f"{r:.3f}" for r in lt["check_ratios"])
            print(f"{imgsz:>5} {rep:>3} {len(lt['evaluations']):>5} {lt['fraction']:>6.3f} "
                  f"{lt['search_ratio']:>7.3f} {check:>22} {lt['check_median']:>7.3f} {lt['check_error']:>+7.1%} "
                  f"{lt['within']!s:>6} {took:>8.1f}", flush=True)
        print(f"{imgsz:>5} median {statistics.median(seconds):.1f} s, within ±3% in {sum(within)}/{len(within)}")


if __name__ == "__main__":
    main()
