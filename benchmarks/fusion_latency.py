"""Re-parameterisation on a device: fused-vs-train-time output error, and the latency that fusion buys.

    python benchmarks/fusion_latency.py [--imgsz 640] [--batch 1] [--iters 50] [--device auto]

Error: every BatchNorm randomised, float32, TF32 off, ||a-b||/||a|| of the decoded predictions.
Latency: train-time (multi-branch) and fused seed model in eval mode, interleaved rounds, median and p90 per form;
CUDA events, fp16 and channels_last on GPU; time.perf_counter on CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pruning.reparam import fuse_model, fusion_error
from space.builder import build_model
from space.cost import model_cost
from space.searchspace import seed_arch


@torch.no_grad()
def _time(model, x, iters: int) -> list[float]:
    times = []
    for _ in range(iters):
        if x.is_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            model(x)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            model(x)
            times.append((time.perf_counter() - t) * 1000)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    model = build_model(seed_arch().to_yaml(80))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.25, 1.75)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.3)
    model = model.to(device).eval()
    fused = fuse_model(model)
    x = torch.randn(2, 3, 256, 320, device=device)
    err = fusion_error(model, fused, x)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    cost = model_cost(model, args.imgsz)
    print(f"# {name}, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"fusion error (fp32, TF32 off, randomised BN, 256x320 input): {err:.2e}")

    half = device.type == "cuda"
    forms = {"train-time": model, "fused": fused}
    x = torch.randn(args.batch, 3, args.imgsz, args.imgsz, device=device)
    if half:
        torch.backends.cudnn.benchmark = True
        x = x.half().contiguous(memory_format=torch.channels_last)
        forms = {k: v.half().to(memory_format=torch.channels_last) for k, v in forms.items()}
    samples: dict[str, list[float]] = {k: [] for k in forms}
    for m in forms.values():
        _time(m, x, 10)  # warm-up
    for _ in range(args.rounds):  # interleaved, so drift hits both forms alike
        for k, m in forms.items():
            samples[k] += _time(m, x, args.iters)
    print(f"latency at {args.imgsz}x{args.imgsz}, batch {args.batch}, {'fp16 channels_last' if half else 'fp32'}:")
    print(f"{'form':<11} {'GFLOPs':>7} {'median_ms':>10} {'p90_ms':>8}")
    for k, ts in samples.items():
        g = cost.gflops if k == "train-time" else cost.gflops_deploy
        p90 = statistics.quantiles(ts, n=10)[-1]
        print(f"{k:<11} {g:>7.1f} {statistics.median(ts):>10.3f} {p90:>8.3f}")
    ratio = statistics.median(samples["fused"]) / statistics.median(samples["train-time"])
    print(f"fused / train-time median latency: {ratio:.3f}")


if __name__ == "__main__":
    main()
