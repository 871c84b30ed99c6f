"""The `repnas` command: one function per subcommand. User errors print one line on stderr and exit 2."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from space.errors import RepnasError

EXIT_USAGE = 2


class UsageError(RepnasError):
    """A bad command-line value."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (and exit 2)."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_at_least(low: int):
    """An argparse type: an integer >= `low`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} must be >= {low}")
        return value

    return parse


_positive_int = _int_at_least(1)
_nonneg_int = _int_at_least(0)


def _count(text: str) -> int:
    value = _positive_int(text)
    if value > 10_000:
        raise argparse.ArgumentTypeError(f"{value} is over 10000; sample in batches")
    return value


def _imgsz(text: str) -> int:
    value = _positive_int(text)
    if value % 32 or value > 8192:
        raise argparse.ArgumentTypeError(f"{value} must be a multiple of 32 (the largest stride) up to 8192")
    return value


def _devices(text: str) -> list[str]:
    items = [x.strip() for x in text.split(",")]
    if not items or not all(x.isdigit() for x in items):
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of CUDA indices, e.g. 0,1,2,3")
    return items


def _fraction(text: str) -> float:
    try:
        value = float(text.rstrip("%")) / (100 if text.endswith("%") else 1)
    except ValueError:
        value = float("nan")
    if not 0.01 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a fraction in [0.01, 1] (e.g. 0.5 or 50%)")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return value


# ---------------------------------------------------------------------------------------------------------------


def cmd_build(args: argparse.Namespace) -> int:
    """Build a model YAML and print YOLOv5's per-layer table with params and GFLOPs (as built and deployed)."""
    from space.builder import build_model
    from space.cost import model_cost
    from space.errors import ModelConfigError

    model = build_model(args.model, nc=args.nc, device="meta")
    try:
        cost = model_cost(model, args.imgsz)
    except ModelConfigError as err:  # builds at the probe size, but not at --imgsz
        raise ModelConfigError(f"{args.model}: --imgsz {args.imgsz}: {err}") from None
    print(f"{'':>3}{'from':>18}{'n':>4}{'params':>11}  {'module':<14}arguments")
    for info in model.layer_info:
        src = list(info.from_) if isinstance(info.from_, tuple) else info.from_
        print(f"{info.index:>3}{src!s:>18}{info.number:>4}{info.params:>11,}  {info.module:<14}{list(info.args)}")
    print(
        f"{args.model}: {len(model.layer_info)} layers, {cost.params:,} parameters, {cost.gflops:.1f} GFLOPs as built; "
        f"deployed (fused) {cost.params_deploy:,} parameters, {cost.gflops_deploy:.1f} GFLOPs "
        f"(at {args.imgsz}x{args.imgsz}, nc={model.nc})"
    )
    return 0


def cmd_space_sample(args: argparse.Namespace) -> int:
    """Write K model YAMLs sampled at random (seeded) from a space, with their deploy cost."""
    import optuna

    from nas.files import write_text_atomic
    from space.searchspace import arch_cost, load_space, sample_arch

    space = load_space(args.space)
    nc = args.nc or space.nc
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=args.seed))
    print(f"{'file':<16}{'params':>12}{'GFLOPs':>9}  arch (deploy figures at {space.imgsz}px, nc={nc})")
    for k in range(args.n):
        arch = sample_arch(study.ask(), space)
        params, gflops = arch_cost(arch, space.imgsz, nc)
        name = f"arch_{k:03d}.yaml"
        write_text_atomic(out / name, arch.to_yaml_text(nc))
        stages = " ".join(f"{s.depth}x{s.width}{'se' if s.se else ''}" for s in arch.stages)
        print(f"{name:<16}{params:>12,}{gflops:>9.2f}  {stages} head x{arch.head_width:g} d{arch.head_depth}")
    print(f"wrote {args.n} model YAMLs to {out}")
    return 0


def _setup_logging(quiet: bool = False) -> None:
    import logging

    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s", stream=sys.stderr)


def _data_path(data: str | None) -> Path:
    from nas.synth import default_dataset

    if data:
        return Path(data)
    path = default_dataset()
    print(f"no --data: using the built-in synthetic dataset {path}", file=sys.stderr)
    return path


def _safe_stem(path: str) -> str:
    """A file's stem as one plain folder name (never '', '.' or '..'): default output folders are named after it."""
    stem = Path(path).stem.strip(". ")
    return stem or "model"


def _fresh_dir(base: Path) -> Path:
    out, k = base, 2
    while out.exists():
        out = base.with_name(f"{base.name}-{k}")
        k += 1
    return out


def cmd_train(args: argparse.Namespace) -> int:
    """Train a model YAML on a dataset (proxy settings), evaluate it, and write weights and metrics."""
    import json

    from nas.data import check_dataset, load_data_config
    from nas.files import state_dict_bytes, write_bytes_atomic, write_text_atomic
    from nas.train import ProxyConfig, epochs_csv, fit
    from space.builder import build_model
    from space.cost import model_cost
    from space.yamlio import format_model_yaml

    _setup_logging(args.quiet)
    data = load_data_config(_data_path(args.data))
    check_dataset(data)  # a dataset with nothing usable fails here, before the output folder is made
    changes = {k: v for k, v in (("epochs", args.epochs), ("imgsz", args.imgsz), ("batch", args.batch),
                                   ("device", args.device), ("workers", args.workers)) if v is not None}
    try:
        cfg = ProxyConfig(quiet=args.quiet, **changes)
    except ValueError as err:
        raise UsageError(str(err)) from None
    model = build_model(args.model, nc=data.nc)
    cost = model_cost(model, cfg.imgsz)
    out = Path(args.out) if args.out else _fresh_dir(Path("results") / "train" / _safe_stem(args.model))
    out.mkdir(parents=True, exist_ok=True)
    result = fit(model, data, cfg)
    write_bytes_atomic(out / "weights.pt", state_dict_bytes(model))
    write_text_atomic(out / "model.yaml", format_model_yaml(model.yaml | {"nc": data.nc},
                                                            header=f"trained by repnas on {data.source}"))
    write_text_atomic(out / "epochs.csv", epochs_csv(result.history))
    metrics = {
        "map50_95": result.metrics.map50_95, "map50": result.metrics.map50, "params": cost.params,
        "gflops": cost.gflops, "params_deploy": cost.params_deploy, "gflops_deploy": cost.gflops_deploy,
        "epochs": len(result.history), "imgsz": cfg.imgsz, "train_seconds": result.seconds,
        "data": str(data.source), "device": str(next(model.parameters()).device), "proxy": cfg.to_dict(),
    }
    write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=2, default=str))
    print(f"{'epochs':>6} {'imgsz':>5} {'params':>12} {'GFLOPs':>7} {'mAP50':>7} {'mAP50-95':>9} {'seconds':>8}")
    print(f"{len(result.history):>6} {cfg.imgsz:>5} {cost.params:>12,} {cost.gflops_deploy:>7.2f} "
          f"{result.metrics.map50:>7.4f} {result.metrics.map50_95:>9.4f} {result.seconds:>8.1f}")
    print(f"wrote {out}/weights.pt, model.yaml, epochs.csv, metrics.json (GFLOPs: deploy, at {cfg.imgsz}px)")
    return 0


def read_state(weights: str | Path) -> dict:
    """A weights-only state_dict from `weights` (see nas.source.read_state)."""
    from nas.source import read_state as read

    return read(weights)


def load_weights(model_yaml: str | Path, state: dict, nc: int | None = None, source: str = "weights"):
    """Build MODEL.yaml (its deploy form when `state` is fused) and load `state` into it."""
    from nas.source import load_weights as load

    return load(model_yaml, state, nc, source)


def cmd_val(args: argparse.Namespace) -> int:
    """Evaluate weights on a dataset's val split (COCO mAP50-95 and mAP50)."""
    from nas.data import load_data_config
    from nas.evaluate import evaluate
    from nas.train import resolve_device

    _setup_logging(args.quiet)
    state = read_state(args.weights)
    data = load_data_config(_data_path(args.data))
    model = load_weights(args.model, state, nc=data.nc, source=f"--weights {args.weights}")
    device = resolve_device(args.device)
    model.to(device)
    metrics = evaluate(model, data, args.imgsz, batch=args.batch, device=device)
    print(f"{'images':>6} {'boxes':>6} {'mAP50':>7} {'mAP50-95':>9}")
    print(f"{metrics.images:>6} {metrics.boxes:>6} {metrics.map50:>7.4f} {metrics.map50_95:>9.4f}")
    return 0


def cmd_data_synth(args: argparse.Namespace) -> int:
    """Write the deterministic synthetic shapes dataset (YOLO format) into OUT."""
    from nas.synth import SynthConfig, make_synthetic

    try:
        cfg = SynthConfig(images=args.images, classes=args.classes, imgsz=args.imgsz, seed=args.seed,
                          sizes=tuple(args.sizes), max_objects=args.max_objects, clutter=not args.no_clutter)
    except ValueError as err:
        raise UsageError(str(err)) from None
    path = make_synthetic(args.out, cfg)
    print(f"wrote {cfg.images} images ({cfg.classes} classes, {cfg.imgsz}px) and {path}")
    return 0


def cmd_latency(args: argparse.Namespace) -> int:
    """Measure the latency of a model YAML (fused by default; weights optional: latency does not need them)."""
    from nas.latency import LatencyConfig, measure_latency
    from nas.train import resolve_device
    from pruning.reparam import fuse_model
    from space.builder import build_model

    device = resolve_device(args.device)
    if args.weights:
        model = load_weights(args.model, read_state(args.weights), source=f"--weights {args.weights}")
    else:
        model = build_model(args.model)
    if args.fused:
        model = fuse_model(model)
    reference = fuse_model(build_model(args.reference)) if args.reference else None
    defaults = LatencyConfig.for_device(device)
    try:
        cfg = LatencyConfig(warmup=defaults.warmup, iters=args.iters or defaults.iters,
                            rounds=min(defaults.rounds, args.iters or defaults.iters), half=not args.fp32,
                            cuda_graph=args.cuda_graph, threads=args.threads)
    except ValueError as err:
        raise UsageError(str(err)) from None
    lat = measure_latency(model, args.imgsz, args.batch, device, cfg, reference=reference)
    info = lat.device
    where = f"{info['name']}" + (f", {info['threads']} threads" if "threads" in info else
                                 f", CUDA {info['cuda']}, cuDNN {info['cudnn']}, driver {info['driver']}")
    print(f"{'form':<9}{'imgsz':>10}{'batch':>6}{'dtype':>9}{'median_ms':>11}{'p90_ms':>9}{'mean_ms':>9}"
          f"{'std_ms':>8}{'iters':>6}{'ratio':>7}")
    ratio = f"{lat.latency_ratio:.3f}" if lat.latency_ratio else "-"
    print(f"{'fused' if args.fused else 'as built':<9}{f'{lat.imgsz[0]}x{lat.imgsz[1]}':>10}{lat.batch:>6}"
          f"{lat.dtype:>9}{lat.median_ms:>11.3f}{lat.p90_ms:>9.3f}{lat.mean_ms:>9.3f}{lat.std_ms:>8.3f}"
          f"{lat.iterations:>6}{ratio:>7}")
    if lat.reference_median_ms:
        print(f"reference {args.reference} (fused): median {lat.reference_median_ms:.3f} ms, measured interleaved")
    print(f"device: {where}; torch {info['torch']}")
    return 0


def _study_settings(args: argparse.Namespace):
    from nas.study import StudySettings

    given = (("epochs", args.epochs), ("imgsz", args.imgsz), ("batch", args.batch), ("val_every", args.val_every))
    proxy = {k: v for k, v in given if v is not None}
    return StudySettings(
        name=args.study, storage=args.storage, data=args.data, space=args.space, trials=args.trials, seed=args.seed,
        sampler=args.sampler, proxy=proxy or None, imgsz=args.latency_imgsz, device=args.device,
        baseline=args.baseline, max_failures=args.max_failures, max_latency_ms=args.max_latency_ms,
        max_latency_ratio=args.max_latency_ratio, early_stop=None if args.early_stop is None else
        {"enabled": args.early_stop}, keep_weights=args.keep_weights, artifacts=args.artifacts,
        stale_after=args.stale_after, prune_to=args.prune_to, prune_finetune_epochs=args.prune_finetune_epochs,
        results=args.results, quiet=args.quiet,
    )


def cmd_search(args: argparse.Namespace) -> int:
    """Run a search study (or continue it: the same --study resumes with its stored settings)."""
    from nas.study import InvalidStudyName, run_search, summary_line

    _setup_logging(args.quiet)
    try:
        settings = _study_settings(args)
    except InvalidStudyName as err:
        raise UsageError(str(err)) from None
    if args.command == "resume":
        from nas.study import load_study

        load_study(settings.name, storage=settings.storage, results=settings.results)  # resume: it must exist
    import torch

    if args.devices and not torch.cuda.is_available():
        raise UsageError(f"--devices {','.join(args.devices)}: no CUDA device is available here; drop --devices")
    study = run_search(settings, report=lambda line: print(line, flush=True), workers=args.workers,
                       devices=args.devices or (), force=args.force, enqueue=args.enqueue or ())
    print(summary_line(study))
    print(f"Pareto files: {settings.folder}/pareto.{{md,csv,html,json,png}}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    """One screen about a study: settings, trials by state and failure reason, the front, time left."""
    from nas.study import check_study_name, show_study

    check_study_name(args.name)
    print(show_study(args.name, storage=args.storage, results=args.results))
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    """Prune a trained model's fused network to a FLOPs target, optionally fine-tune it, and report before/after."""
    import json

    from nas.data import load_data_config
    from nas.files import write_text_atomic
    from nas.prune import prune_job
    from nas.source import load_source, recorded_data
    from pruning.channel import parse_target
    from pruning.portable import save_pruned
    from space.cost import count_gflops

    _setup_logging(args.quiet)
    source = load_source(args.source, args.weights, results=args.results, storage=args.storage)
    parse_target(args.target_flops, count_gflops(source.model, args.imgsz))  # a bad target fails before any work
    needs_data = args.finetune_epochs > 0 or args.importance == "taylor"
    data_path = args.data
    if data_path is None and (needs_data or not args.no_eval):  # the data the model was trained on, else the demo's
        data_path = recorded_data(source.data, args.source) or str(_data_path(None))
    data = load_data_config(data_path) if data_path and (needs_data or not args.no_eval) else None
    if data is not None and data.nc != source.nc:
        raise UsageError(f"--data {data.source}: {data.nc} classes, but {args.source} detects {source.nc}; give the "
                         "dataset the model was trained on")
    eval_imgsz = args.eval_imgsz or source.train_imgsz or 160
    report = prune_job(source.model, data, args.target_flops, imgsz=args.imgsz, eval_imgsz=eval_imgsz,
                       importance=args.importance, round_to=args.round_to, finetune_epochs=args.finetune_epochs,
                       device=args.device, evaluate_before=not args.no_eval)
    label = args.source.replace(":", "-").replace("/", "_").strip("._-") or "model"
    out = Path(args.out) if args.out else _fresh_dir(Path(args.results) / "prune" / _safe_stem(label))
    info = {"source": source.description, "data": str(data.source) if data else None, "train_imgsz": eval_imgsz,
            "target": str(args.target_flops), "imgsz": args.imgsz}
    save_pruned(report.model, out, report.result.plan, info=info)
    summary = {"source": source.description, "target": str(args.target_flops)} | report.to_dict()
    write_text_atomic(out / "prune.json", json.dumps(summary, indent=2, default=str) + "\n")
    width = max(len(r[0]) for r in report.rows())
    print(f"{'':<{width}}  {'before':>14}  {'after':>14}")
    for name, before, after in report.rows():
        print(f"{name:<{width}}  {before:>14}  {after:>14}")
    r = report.result
    print(f"target {r.target_gflops:.3f} GFLOPs, achieved {r.gflops_after:.3f} ({r.error:+.2%}); "
          f"{r.importance} importance, channels rounded to {r.round_to}; {r.seconds:.1f} s to prune")
    print(f"wrote {out}/channels.json, weights.pt (load with pruning.portable.load_pruned) and prune.json")
    return 0


def cmd_export_model(args: argparse.Namespace) -> int:
    """Export a fused or pruned model to ONNX and check it against PyTorch with onnxruntime."""
    from nas.onnx_export import export_onnx
    from nas.source import load_source

    source = load_source(args.source, args.weights, results=args.results, storage=args.storage)
    report = export_onnx(source.model, args.onnx, args.imgsz)
    print(f"wrote {report['path']} (opset {report['opset']}, input images (B, 3, {args.imgsz}, {args.imgsz}), "
          f"output {report['shape'][1:]} per image); onnxruntime vs PyTorch: max abs diff "
          f"{report['max_abs_diff']:.2e} (boxes normalised {report['max_abs_diff_normalised']:.2e})")
    return 0


def cmd_clean(args: argparse.Namespace) -> int:
    """Delete the weight files of trials that are neither on the Pareto front nor in the top-K by mAP50-95."""
    from nas.study import check_study_name, clean_study

    check_study_name(args.name)
    if args.keep_weights is not None and args.keep_weights < 0:
        raise UsageError(f"--keep-weights {args.keep_weights} must be >= 0")
    removed, kept = clean_study(args.name, args.keep_weights, storage=args.storage, results=args.results)
    print(f"removed {len(removed)} weight files; kept weights of trials {sorted(kept)}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Write a study's Pareto table (md, csv, html, json; pareto.png always) into results/NAME or --out."""
    from nas.study import check_study_name, export_study

    check_study_name(args.name)
    paths = export_study(args.name, args.out, args.format, storage=args.storage, results=args.results)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


# ---------------------------------------------------------------------------------------------------------------


def make_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="repnas", description="Search, fuse, prune and rank RepVGG-YOLO detectors.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("build", help="build a model YAML and print its layers, params and GFLOPs",
                       description=cmd_build.__doc__)
    p.add_argument("model", metavar="MODEL.yaml", help="YOLOv5-format model YAML")
    p.add_argument("--nc", type=_positive_int, default=None, help="override the number of classes")
    p.add_argument("--imgsz", type=_imgsz, default=640, help="input size for GFLOPs (default 640)")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("space", help="work with search spaces", description="Work with search spaces.")
    space_sub = p.add_subparsers(dest="space_command", metavar="ACTION", parser_class=_Parser)
    space_sub.required = True
    s = space_sub.add_parser("sample", help="write K model YAMLs sampled from a space",
                             description=cmd_space_sample.__doc__)
    s.add_argument("--space", default="default", help="space YAML (default: the built-in default space)")
    s.add_argument("--n", type=_count, default=5, help="how many to sample, 1..10000 (default 5)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    s.add_argument("--nc", type=_positive_int, default=None, help="classes in the written YAMLs (default: space's)")
    s.add_argument("--out", required=True, help="folder to write the YAMLs into")
    s.set_defaults(func=cmd_space_sample)

    p = sub.add_parser("train", help="train and evaluate a model YAML (proxy settings)", description=cmd_train.__doc__)
    p.add_argument("model", metavar="MODEL.yaml", help="YOLOv5-format model YAML")
    p.add_argument("--data", help="data.yaml (default: the built-in synthetic dataset)")
    p.add_argument("--epochs", type=_positive_int, help="epochs (default: the proxy's)")
    p.add_argument("--imgsz", type=_imgsz, help="training and validation size (default: the proxy's)")
    p.add_argument("--batch", type=_positive_int, help="batch size (default: the proxy's)")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--workers", type=int, help="data loader workers (default: 0 on CPU, up to 8 on CUDA)")
    p.add_argument("--out", help="output folder (default: results/train/MODEL[-N])")
    p.add_argument("--quiet", action="store_true", help="no progress bars or info lines")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("val", help="evaluate weights on a val split", description=cmd_val.__doc__)
    p.add_argument("model", metavar="MODEL.yaml", help="YOLOv5-format model YAML the weights belong to")
    p.add_argument("--weights", required=True, help="state_dict file (train-time or fused)")
    p.add_argument("--data", help="data.yaml (default: the built-in synthetic dataset)")
    p.add_argument("--imgsz", type=_imgsz, default=160, help="input size (default 160)")
    p.add_argument("--batch", type=_positive_int, default=32, help="batch size (default 32)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_val)

    p = sub.add_parser("latency", help="measure a model's latency (fused by default)", description=cmd_latency.__doc__)
    p.add_argument("model", metavar="MODEL.yaml", help="YOLOv5-format model YAML")
    p.add_argument("--weights", help="state_dict to load first (optional)")
    p.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True,
                   help="time the deploy (fused) form (default) or the model as built (--no-fused)")
    p.add_argument("--imgsz", type=_imgsz, default=640, help="input size (default 640)")
    p.add_argument("--batch", type=_positive_int, default=1, help="batch size (default 1)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--iters", type=_positive_int, help="timed iterations (default 100 on CUDA, 30 on CPU)")
    p.add_argument("--threads", type=_positive_int, help="CPU threads while timing (default: torch's)")
    p.add_argument("--fp32", action="store_true", help="on CUDA, time in float32 instead of fp16")
    p.add_argument("--cuda-graph", action="store_true", help="on CUDA, replay a captured CUDA graph")
    p.add_argument("--reference", metavar="REF.yaml", help="also time this model (fused), interleaved: the ratio")
    p.set_defaults(func=cmd_latency)

    p = sub.add_parser("data", help="datasets", description="Datasets.")
    data_sub = p.add_subparsers(dest="data_command", metavar="ACTION", parser_class=_Parser)
    data_sub.required = True
    s = data_sub.add_parser("synth", help="write the synthetic shapes dataset", description=cmd_data_synth.__doc__)
    s.add_argument("out", metavar="OUT", help="folder to write into")
    s.add_argument("--images", type=int, default=400, help="number of images (default 400)")
    s.add_argument("--classes", type=int, default=4, help="number of shape classes, 1..8 (default 4)")
    s.add_argument("--imgsz", type=int, default=160, help="image size (default 160)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    s.add_argument("--sizes", type=float, nargs=2, default=(0.04, 0.5), metavar=("MIN", "MAX"),
                   help="object side as a share of the image side, log-uniform in MIN..MAX (default 0.04 0.5)")
    s.add_argument("--max-objects", type=int, default=5, help="1..N objects per image (default 5)")
    s.add_argument("--no-clutter", action="store_true", help="a plain background: no blobs, lines or dots")
    s.set_defaults(func=cmd_data_synth)

    def search_options(p: argparse.ArgumentParser, with_study: bool) -> None:
        if with_study:
            p.add_argument("--study", default="default", help="study name: results/NAME (default 'default')")
        p.add_argument("--data", help="data.yaml (default: the built-in synthetic dataset)")
        p.add_argument("--space", help="space YAML (default: the built-in default space)")
        p.add_argument("--trials", type=_count, help="trials that count, in all (default 20; rejected ones do not)")
        p.add_argument("--storage", help="Optuna storage URL (default: results/NAME/study.log, a journal file)")
        p.add_argument("--results", default="results", metavar="DIR",
                       help="root folder of study folders (default ./results)")
        p.add_argument("--seed", type=int, help="sampler seed (default 0)")
        p.add_argument("--sampler", choices=("tpe", "nsga2", "random"), help="sampler (default tpe)")
        p.add_argument("--epochs", type=_positive_int, help="proxy training epochs (default: the proxy's)")
        p.add_argument("--imgsz", type=_imgsz, help="proxy training and validation size (default: the proxy's)")
        p.add_argument("--val-every", type=_positive_int,
                       help="validate every K epochs: the early-stopping rule acts at these epochs (default 5)")
        p.add_argument("--latency-imgsz", type=_imgsz, help="latency and GFLOPs input size (default: the space's)")
        p.add_argument("--batch", type=_positive_int, help="proxy training batch size (default: the proxy's)")
        p.add_argument("--device", help="auto, cpu, cuda or cuda:N (default auto)")
        p.add_argument("--baseline", help="baseline: a YAML of Arch params or a model YAML (default: the seed)")
        p.add_argument("--max-failures", type=_positive_int, help="stop after this many failed trials (default 5)")
        p.add_argument("--max-latency-ms", type=_positive_float,
                       help="reject Archs slower than this (ms, the study's latency objective) before training")
        p.add_argument("--max-latency-ratio", type=_positive_float,
                       help="reject Archs slower than this ratio to the baseline before training")
        p.add_argument("--early-stop", action=argparse.BooleanOptionalAction, default=None,
                       help="stop a trial's training when a no-slower finished trial was clearly better at the "
                            "same epoch (default on; see nas/earlystop.py)")
        p.add_argument("--keep-weights", type=int, metavar="K",
                       help="keep weights only for the Pareto front and the top-K by mAP (default: keep all)")
        p.add_argument("--artifacts", metavar="DIR",
                       help="shared folder for trial folders, DIR/NAME/N (default results/NAME/trials/N)")
        p.add_argument("--stale-after", type=_positive_float, metavar="SECONDS",
                       help="a RUNNING trial without a heartbeat this long is taken for dead (default 600)")
        p.add_argument("--prune-to", type=_fraction, metavar="FRACTION",
                       help="prune each candidate's fused model to this share of its deploy FLOPs, fine-tune it and "
                            "rank the pruned model (a space's `prune_fraction` extra makes it a search dimension)")
        p.add_argument("--prune-finetune-epochs", type=_nonneg_int, metavar="K",
                       help="fine-tuning epochs after pruning in the search (default: proxy epochs / 5)")
        p.add_argument("--workers", type=_positive_int, default=None,
                       help="worker processes on this machine against the one storage (default 1; the demo, a new "
                            "study without --data, on a CPU: one single-threaded worker per core, up to 2)")
        p.add_argument("--devices", type=_devices, metavar="0,1,..",
                       help="CUDA devices: worker i uses device i mod len (sets --workers to at least len)")
        p.add_argument("--enqueue", nargs="+", metavar="A.yaml",
                       help="known candidates to try first: YAMLs of Arch params or model YAMLs")
        p.add_argument("--force", action="store_true",
                       help="on resume, accept changed settings that make trials incomparable")
        p.add_argument("--quiet", action="store_true", help="no progress bars or info lines")

    p = sub.add_parser("search", help="run or continue a search study", description=cmd_search.__doc__)
    search_options(p, with_study=True)
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("resume", help="continue a study (search --study NAME)", description=cmd_search.__doc__)
    p.add_argument("study", metavar="NAME", help="study name")
    search_options(p, with_study=False)
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("prune", help="prune a trained model to a FLOPs target (and fine-tune it)",
                       description=cmd_prune.__doc__)
    p.add_argument("source", metavar="SOURCE", help="STUDY:TRIAL, a trial folder, a pruned-model folder, or "
                                                     "MODEL.yaml with --weights")
    p.add_argument("--weights", help="state_dict for a MODEL.yaml source (train-time or fused)")
    p.add_argument("--target-flops", required=True, help="'50%%' or 0.5 of the deploy GFLOPs, or absolute '2.5G'")
    p.add_argument("--importance", choices=("taylor", "l2", "l1", "random"), default="taylor",
                   help="channel importance: first-order Taylor on training batches (default; see RESULTS.md), "
                        "weight magnitude (l2, l1), or random")
    p.add_argument("--round-to", type=_positive_int, default=8, help="keep channel counts multiples of this (8)")
    p.add_argument("--finetune-epochs", type=_nonneg_int, default=0, help="fine-tuning epochs after pruning (0)")
    p.add_argument("--data", help="data.yaml (default: the study's data, else the built-in synthetic dataset)")
    p.add_argument("--imgsz", type=_imgsz, default=640, help="input size for GFLOPs and latency (default 640)")
    p.add_argument("--eval-imgsz", type=_imgsz, help="evaluation and fine-tuning size (default: the proxy's)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--no-eval", action="store_true", help="skip the mAP before pruning")
    p.add_argument("--out", help="output folder (default: results/prune/SOURCE[-N])")
    p.add_argument("--storage", help="Optuna storage URL of the study (for STUDY:TRIAL)")
    p.add_argument("--results", default="results", metavar="DIR", help="root folder of study folders")
    p.add_argument("--quiet", action="store_true", help="no progress bars or info lines")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("export-model", help="export a fused or pruned model to ONNX (checked with onnxruntime)",
                       description=cmd_export_model.__doc__)
    p.add_argument("source", metavar="SOURCE", help="STUDY:TRIAL, a trial or pruned-model folder, or MODEL.yaml")
    p.add_argument("--weights", help="state_dict for a MODEL.yaml source")
    p.add_argument("--onnx", required=True, metavar="OUT.onnx", help="where to write the ONNX file")
    p.add_argument("--imgsz", type=_imgsz, default=640, help="input size (default 640; the batch axis is dynamic)")
    p.add_argument("--storage", help="Optuna storage URL of the study (for STUDY:TRIAL)")
    p.add_argument("--results", default="results", metavar="DIR", help="root folder of study folders")
    p.set_defaults(func=cmd_export_model)

    p = sub.add_parser("clean", help="delete weights off the front and the top-k", description=cmd_clean.__doc__)
    p.add_argument("name", metavar="NAME", help="study name")
    p.add_argument("--storage", help="Optuna storage URL (default: results/NAME/study.log)")
    p.add_argument("--results", default="results", metavar="DIR",
                   help="root folder of study folders (default ./results)")
    p.add_argument("--keep-weights", type=int, metavar="K",
                   help="also keep the top-K by mAP50-95 (default: the study's --keep-weights, else 0)")
    p.set_defaults(func=cmd_clean)

    p = sub.add_parser("show", help="one screen about a study", description=cmd_show.__doc__)
    p.add_argument("name", metavar="NAME", help="study name")
    p.add_argument("--storage", help="Optuna storage URL (default: results/NAME/study.log)")
    p.add_argument("--results", default="results", metavar="DIR",
                   help="root folder of study folders (default ./results)")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("export", help="write a study's Pareto files", description=cmd_export.__doc__)
    p.add_argument("name", metavar="NAME", help="study name")
    p.add_argument("--storage", help="Optuna storage URL (default: results/NAME/study.log)")
    p.add_argument("--results", default="results", metavar="DIR",
                   help="root folder of study folders (default ./results)")
    p.add_argument("--format", default="md,csv,html,json", help="comma-separated: md,csv,html,json (png always)")
    p.add_argument("--out", help="output folder (default: results/NAME)")
    p.set_defaults(func=cmd_export)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        return args.func(args)
    except RepnasError as err:
        message = " ".join(str(err).split())  # one line, whatever the message held
        print(f"repnas {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("repnas: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
