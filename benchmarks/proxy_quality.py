"""Proxy quality: mAP50 and mAP50-95 per epoch against wall time, for chosen models, datasets and settings.

    python benchmarks/proxy_quality.py                                  # seed + ~4x cheaper point, synthetic
    python benchmarks/proxy_quality.py --data synthetic ../shared/data/raccoon/data.yaml --epochs 30
    python benchmarks/proxy_quality.py --models cheap4 --set optimizer=AdamW lr0=0.002 --set lr0=0.01

Each `--set` group is one variant of the default ProxyConfig (key=value pairs, values parsed as JSON; `aug.KEY`
sets an AugmentConfig field, `loss.KEY` a LossHyp gain). Prints one row per evaluated epoch, then a summary per run.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from dataclasses import replace

import torch

from nas.data import load_data_config
from nas.device import resolve_device
from nas.synth import default_dataset
from nas.train import ProxyConfig, fit
from space.builder import build_model
from space.cost import model_cost
from space.searchspace import Arch, Stage, seed_arch

MODELS = {
    "seed": seed_arch(),  # the hand design, 43.2 deploy GFLOPs at 640
    "cheap4": Arch((Stage(1, 32), Stage(1, 48), Stage(2, 96), Stage(4, 192), Stage(1, 384)), 0.5, 1),  # 8.5
    "mid": Arch((Stage(1, 32), Stage(2, 64), Stage(2, 128), Stage(8, 192), Stage(1, 384)), 0.75, 1),  # 18.1
    "cheapest": Arch((Stage(1, 16), Stage(1, 32), Stage(2, 64), Stage(4, 128), Stage(1, 256)), 0.25, 1),  # 3.5
}


def _variant(pairs: list[str]) -> dict:
    out: dict = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _config(base: ProxyConfig, changes: dict) -> ProxyConfig:
    aug = {k[4:]: v for k, v in changes.items() if k.startswith("aug.")}
    loss = {k[5:]: v for k, v in changes.items() if k.startswith("loss.")}
    rest = {k: v for k, v in changes.items() if not k.startswith(("aug.", "loss."))}
    return replace(base, augment=replace(base.augment, **aug), loss=replace(base.loss, **loss), **rest)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["seed", "cheap4"], help=f"{list(MODELS)} or YAML paths")
    parser.add_argument("--data", nargs="+", default=["synthetic"], help="'synthetic' or data.yaml paths")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--imgsz", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--val-every", type=int, default=None)
    parser.add_argument("--set", nargs="+", action="append", default=None, metavar="KEY=VALUE",
                        help="one ProxyConfig variant per --set group")
    parser.add_argument("--json", help="also write all rows to this JSON file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    base = ProxyConfig(quiet=True, device=args.device)
    for key in ("epochs", "imgsz", "batch", "val_every"):
        if getattr(args, key) is not None:
            base = replace(base, **{key: getattr(args, key)})
    variants = [_variant(group) for group in (args.set or [[]])]
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU {platform.processor() or ''}"
    print(f"# device: {name}; torch {torch.__version__}; threads {torch.get_num_threads()}; "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    rows, summary = [], []
    for data_name in args.data:
        data = load_data_config(default_dataset() if data_name == "synthetic" else data_name)
        for model_name in args.models:
            arch = MODELS.get(model_name)
            for changes in variants:
                cfg = _config(base, changes)
                torch.manual_seed(cfg.seed)
                model = build_model(arch.to_yaml(data.nc) if arch else model_name, nc=data.nc)
                gflops = model_cost(model, cfg.imgsz).gflops_deploy
                label = f"{model_name} {data_name.split('/')[-2] if '/' in data_name else data_name} {changes or ''}"
                print(f"\n## {label}: deploy {gflops:.2f} GFLOPs at {cfg.imgsz}px, batch {cfg.batch}, "
                      f"{cfg.epochs} epochs, {cfg.optimizer} lr0 {cfg.lr0}")
                print(f"{'epoch':>5} {'wall_s':>8} {'mAP50':>7} {'mAP50-95':>9}")
                t0 = time.perf_counter()

                def on_epoch(epoch, losses, map50_95, map50, t0=t0):
                    print(f"{epoch:>5} {time.perf_counter() - t0:>8.1f} {map50:>7.4f} {map50_95:>9.4f}", flush=True)

                result = fit(model, data, cfg, callbacks=[on_epoch])
                train_s = sum(h["train_seconds"] for h in result.history)
                for h in result.history:
                    rows.append({"run": label, **{k: h[k] for k in ("epoch", "train_seconds", "map50", "map50_95")}})
                summary.append((label, train_s, time.perf_counter() - t0, result.metrics.map50,
                                result.metrics.map50_95))
    print(f"\n{'run':<60} {'train_s':>8} {'total_s':>8} {'mAP50':>7} {'mAP50-95':>9}")
    for label, train_s, total_s, m50, m in summary:
        print(f"{label:<60} {train_s:>8.1f} {total_s:>8.1f} {m50:>7.4f} {m:>9.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
