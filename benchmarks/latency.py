"""Latency measurement quality: repeatability (CV of repeated measurements) and what fusion buys.

    python benchmarks/latency.py [--device auto] [--sizes 320 640] [--batches 1 16] [--repeats 5] [--iters N]

For each (imgsz, batch): the seed model as built and fused, timed by `nas.latency.measure_latency` with the
other as the interleaved reference, `--repeats` times. Prints per configuration the median of the medians, the
coefficient of variation (std / mean) of the repeated medians for each form, and the fused / as-built ratio.
Bar (issue 4): CV <= 3% on CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from nas.device import resolve_device
from nas.latency import LatencyConfig, device_info, measure_latency
from pruning.reparam import fuse_model
from space.builder import build_model
from space.searchspace import seed_arch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--sizes", type=int, nargs="+", default=[320, 640])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--iters", type=int, default=None, help="timed iterations per measurement")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    iters = args.iters or (100 if cuda else 10)
    cfg = LatencyConfig(warmup=10 if cuda else 2, iters=iters, rounds=min(5, iters), threads=args.threads)
    torch.manual_seed(0)
    built = build_model(seed_arch().to_yaml(80)).eval()
    fused = fuse_model(built)
    info = device_info(device, args.threads)
    print(f"# seed model on {info['name']} ({'fp16 channels_last' if cuda else 'fp32'}), torch {info['torch']}, "
          f"{iters} iterations x {args.repeats} repeats, {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"{'imgsz':>5}{'batch':>6}{'built_ms':>10}{'CV_built':>9}{'fused_ms':>10}{'CV_fused':>9}"
          f"{'fused/built':>12}{'CV_ratio':>9}")
    for imgsz in args.sizes:
        for batch in args.batches:
            medians_fused, medians_built, ratios = [], [], []
            for _ in range(args.repeats):
                lat = measure_latency(fused, imgsz, batch, device, cfg, reference=built)
                medians_fused.append(lat.median_ms)
                medians_built.append(lat.reference_median_ms)
                ratios.append(lat.latency_ratio)

            def cv(values: list[float]) -> float:
                return statistics.pstdev(values) / statistics.fmean(values)

            print(f"{imgsz:>5}{batch:>6}{statistics.median(medians_built):>10.2f}{cv(medians_built):>9.1%}"
                  f"{statistics.median(medians_fused):>10.2f}{cv(medians_fused):>9.1%}"
                  f"{statistics.median(ratios):>12.3f}{cv(ratios):>9.1%}", flush=True)


if __name__ == "__main__":
    main()
