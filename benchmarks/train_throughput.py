"""Training throughput: images/s of `nas.train.fit` against a bare loop on the same model and batch.

    python benchmarks/train_throughput.py [--imgsz 256] [--batch 16] [--images 64] [--rounds 3] [--data D]

Bare loop: random tensors, forward, sum of the outputs, backward, SGD step. `fit`: one epoch of the real
pipeline (cached images, augmentation, loss, EMA, LR schedule), timed by its own per-epoch train_seconds
(validation excluded). Same model (the seed), batch, image size and thread settings; the two alternate for
`--rounds` rounds after a warm-up, and the medians give the ratio. Bar: fit / bare >= 0.90.
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import time
from dataclasses import replace

import torch

from nas.data import load_data_config
from nas.synth import SynthConfig, default_dataset
from nas.train import ProxyConfig, fit
from space.builder import build_model
from space.searchspace import seed_arch


def bare_loop(model: torch.nn.Module, batch: int, imgsz: int, steps: int) -> float:
    """Images/s of forward + sum + backward + SGD step on random tensors (a tiny LR keeps the weights finite)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-9, momentum=0.9)
    model.train()
    x = torch.rand(batch, 3, imgsz, imgsz)
    start = time.perf_counter()
    for _ in range(steps):
        out = model(x)
        loss = sum(o.sum() for o in out)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return batch * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--imgsz", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--images", type=int, default=64, help="training images per fit epoch (multiple of batch)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--data", default=None, help="data.yaml (default: a synthetic set at --imgsz)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    data_yaml = args.data or default_dataset(SynthConfig(images=args.images + 16, imgsz=args.imgsz))
    data = load_data_config(data_yaml)
    fraction = min(1.0, args.images / len(data.train))
    steps = max(1, round(len(data.train) * fraction / args.batch))
    cfg = ProxyConfig(epochs=1, imgsz=args.imgsz, batch=args.batch, fraction=fraction, device="cpu", quiet=True,
                      val_every=1000)
    torch.manual_seed(0)
    model = build_model(seed_arch().to_yaml(data.nc))
    bare = copy.deepcopy(model)  # the same network and weights, trained apart
    print(f"# seed model, {args.imgsz}px, batch {args.batch}, {steps} steps per measurement, CPU threads "
          f"{torch.get_num_threads()}, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}")
    bare_loop(bare, args.batch, args.imgsz, 1)  # warm-up
    fit_rates, bare_rates = [], []
    for k in range(args.rounds):
        result = fit(model, data, replace(cfg, seed=k))  # the image cache is filled before the timed epoch
        fit_rates.append(steps * args.batch / result.history[0]["train_seconds"])
        bare_rates.append(bare_loop(bare, args.batch, args.imgsz, steps))
        print(f"round {k + 1}: fit {fit_rates[-1]:.2f} img/s, bare {bare_rates[-1]:.2f} img/s", flush=True)
    ratio = statistics.median(fit_rates) / statistics.median(bare_rates)
    print(f"{'':<5}{'fit img/s':>10}{'bare img/s':>11}{'ratio':>7}")
    print(f"{'median':<5}{statistics.median(fit_rates):>10.2f}{statistics.median(bare_rates):>11.2f}{ratio:>7.3f}"
          f"  (bar >= 0.90)")


if __name__ == "__main__":
    main()
