"""Channel pruning of the fused seed model: time to prune, FLOPs reached, and whether latency follows the FLOPs.

    python benchmarks/prune.py [--sizes 320 640] [--targets 0.75 0.5 0.25] [--round-to 8 16] [--device auto]
                               [--threads 1] [--importance l2] [--iters N]

For each input size: the seed model (../shared/reference/seed_model.yaml, nc=80, random weights: FLOPs and
latency do not depend on them) fused, then pruned to each fraction of its deploy GFLOPs by
`pruning.channel.prune_to_flops`. Latency: `nas.latency.measure_latency` of the pruned network with the unpruned
one as the interleaved reference (CUDA events, fp16, channels_last on a GPU; perf_counter fp32 on a CPU), so the
latency ratio survives a noisy machine. Bars (issue): <= 10 s to prune to 50%; achieved GFLOPs within ±2% of the
target; on a CPU |latency ratio - FLOPs ratio| <= 0.15. `--round-to` takes several values: on an AVX-512 CPU
oneDNN computes in 16-channel blocks, so counts that are multiples of 8 but not of 16 run slower per FLOP.
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import torch

from nas.device import resolve_device
from nas.latency import LatencyConfig, device_info, measure_latency
from pruning.channel import prune_to_flops
from pruning.reparam import fuse_model
from space.builder import build_model

SEED = Path(__file__).resolve().parents[2] / "shared" / "reference" / "seed_model.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(SEED))
    parser.add_argument("--sizes", type=int, nargs="+", default=[320, 640])
    parser.add_argument("--targets", type=float, nargs="+", default=[0.75, 0.5, 0.25])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for pruning and timing")
    parser.add_argument("--round-to", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--importance", default="l2")
    parser.add_argument("--iters", type=int, default=None, help="timed iterations per model (default: per device)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    changes = {"threads": args.threads} if device.type == "cpu" else {}
    if args.iters:
        changes |= {"iters": args.iters, "rounds": min(5, args.iters)}
    cfg = LatencyConfig.for_device(device, **changes)
    torch.manual_seed(0)
    fused = fuse_model(build_model(args.model, nc=80)).eval()
    info = device_info(device, torch.get_num_threads())
    print(f"# {args.model}, {info.get('name', device.type)}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s), {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"# importance {args.importance}; latency: batch 1, {cfg.iters} iterations per model in {cfg.rounds} "
          "interleaved rounds, median")
    header = ("| imgsz | round_to | target | prune s | GFLOPs | error vs target | params | latency ms (unpruned) | "
              "latency ratio | FLOPs ratio | abs(lat - FLOPs ratio) | ms/GFLOP (unpruned) |")
    print(header)
    print("| --- " * (header.count("|") - 1) + "|")
    for imgsz, round_to, fraction in itertools.product(args.sizes, args.round_to, args.targets):
        start = time.perf_counter()
        result = prune_to_flops(fused, fraction, imgsz, importance=args.importance, round_to=round_to)
        seconds = time.perf_counter() - start
        latency = measure_latency(result.model.eval(), imgsz, device=device, cfg=cfg, reference=fused)
        lat_ratio = latency.latency_ratio
        print(f"| {imgsz} | {round_to} | {fraction:.0%} | {seconds:.2f} | {result.gflops_after:.3f} of "
              f"{result.gflops_before:.3f} | {result.error:+.2%} | {result.params_after / 1e6:.2f}M of "
              f"{result.params_before / 1e6:.2f}M | {latency.median_ms:.1f} ({latency.reference_median_ms:.1f}) | "
              f"{lat_ratio:.3f} | {result.flops_ratio:.3f} | {abs(lat_ratio - result.flops_ratio):.3f} | "
              f"{latency.median_ms / result.gflops_after:.2f} "
              f"({latency.reference_median_ms / result.gflops_before:.2f}) |", flush=True)


if __name__ == "__main__":
    main()
