"""Pruning quality bar (issue 5): the seed model trained, pruned to 50% of its deploy FLOPs, fine-tuned; recovered
share of the unpruned mAP50, against random channel selection at the same FLOPs and fine-tuning budget.

    python benchmarks/prune_quality.py --data ../shared/data/raccoon/data.yaml --epochs 30 --finetune-epochs 10
    python benchmarks/prune_quality.py --weights trained_seed.pt ...     # reuse a trained seed (state_dict)

Prints one row per importance: mAP50-95 / mAP50 right after pruning and after fine-tuning, the share of the
unpruned mAP50 recovered, achieved FLOPs. Bar: l2 (and taylor) recover >= 90% and beat random.
"""

from __future__ import annotations

import argparse
import logging
import time

from nas.data import load_data_config
from nas.device import resolve_device
from nas.evaluate import evaluate
from nas.files import state_dict_bytes, write_bytes_atomic
from nas.prune import prune_job
from nas.source import load_weights, read_state
from nas.synth import default_dataset
from nas.train import ProxyConfig, fit
from pruning.reparam import fuse_model
from space.builder import build_model
from space.searchspace import seed_arch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="synthetic")
    parser.add_argument("--epochs", type=int, default=30, help="training epochs of the seed (the proxy's recipe)")
    parser.add_argument("--imgsz", type=int, default=160, help="training / evaluation size")
    parser.add_argument("--target", default="50%")
    parser.add_argument("--finetune-epochs", type=int, default=10)
    parser.add_argument("--importance", nargs="+", default=["l2", "taylor", "random"])
    parser.add_argument("--weights", help="a trained seed state_dict (skips training)")
    parser.add_argument("--save", help="write the trained seed's state_dict here")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    device = resolve_device(args.device)
    data = load_data_config(default_dataset() if args.data == "synthetic" else args.data)
    yaml = seed_arch().to_yaml(data.nc)
    start = time.perf_counter()
    if args.weights:
        model = load_weights(yaml, read_state(args.weights))
    else:
        model = build_model(yaml)
        fit(model, data, ProxyConfig(epochs=args.epochs, imgsz=args.imgsz, device=str(device), quiet=True))
        if args.save:
            write_bytes_atomic(args.save, state_dict_bytes(model))
    fused = fuse_model(model.cpu().eval())
    base = evaluate(fused, data, args.imgsz, device=device)
    print(f"# seed on {data.source}: trained {args.epochs} epochs at {args.imgsz}px ({time.perf_counter() - start:.0f}"
          f" s); unpruned fused mAP50-95 {base.map50_95:.4f} mAP50 {base.map50:.4f}; target {args.target} of deploy "
          f"GFLOPs at 640; fine-tuning {args.finetune_epochs} epochs (ProxyConfig.finetune); device {device}")
    print(f"{'importance':<10} {'GFLOPs':>8} {'pruned mAP50-95':>16} {'pruned mAP50':>13} {'tuned mAP50-95':>15} "
          f"{'tuned mAP50':>12} {'recovered':>10} {'seconds':>8}")
    for importance in args.importance:
        t0 = time.perf_counter()
        report = prune_job(fused, data, args.target, imgsz=640, eval_imgsz=args.imgsz, importance=importance,
                           finetune_epochs=args.finetune_epochs, device=str(device), evaluate_before=False,
                           measure=False)
        (p95, p50), (t95, t50) = report.map_pruned, report.map_finetuned or report.map_pruned
        print(f"{importance:<10} {report.result.gflops_after:>8.2f} {p95:>16.4f} {p50:>13.4f} {t95:>15.4f} "
              f"{t50:>12.4f} {t50 / base.map50:>10.1%} {time.perf_counter() - t0:>8.0f}", flush=True)


if __name__ == "__main__":
    main()
