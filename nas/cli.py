"""The `repnas` command, Optuna's CLI pattern: one small class per subcommand, its `add_arguments(parser)` beside its
`take_action(args)` (a library call plus printing); `make_parser` builds the subcommands from the `COMMANDS` table.
Help shows defaults read where they live (`nas.study.settings`, `ProxyConfig`...); nas/cli_args.py holds the argparse
pieces several commands share. A user error prints one line on stderr and exits 2."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from nas import cli_args as arg
from space.errors import RepnasError


class Command:
    """A subcommand `repnas NAME`: `help` is its line in `repnas --help`, its docstring the description `repnas NAME
    --help` shows. A group (`space`, `data`) lists its actions in `subcommands` instead of taking one itself."""

    name: str
    help: str
    subcommands: tuple[type[Command], ...] = ()

    def __init_subclass__(cls, *, name: str, help: str, subcommands: tuple[type[Command], ...] = (), **kwargs):
        super().__init_subclass__(**kwargs)
        cls.name, cls.help, cls.subcommands = name, help, subcommands

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        pass

    def take_action(self, args: argparse.Namespace) -> int:
        raise NotImplementedError


MODEL_HELP = "model YAML (YOLOv5's or YOLOv7's dialect), or `seed`: the seed design (space.searchspace.seed_arch)"


class Build(Command, name="build", help="build a model YAML and print its layers, params and GFLOPs"):
    """Build a model YAML and print YOLOv5's per-layer table with params and GFLOPs (as built and deployed)."""

    def add_arguments(self, p):
        p.add_argument("model", metavar="MODEL.yaml", help=MODEL_HELP)
        p.add_argument("--nc", type=arg.positive_int, help="override the number of classes")
        p.add_argument("--imgsz", type=arg.imgsz, default=640, help="input size for GFLOPs (default %(default)s)")

    def take_action(self, args):
        from space.builder import build_model
        from space.cost import model_cost
        from space.errors import ModelConfigError
        from space.searchspace import model_yaml_source

        model = build_model(model_yaml_source(args.model), nc=args.nc, device="meta")
        try:
            cost = model_cost(model, args.imgsz)
        except ModelConfigError as err:  # builds at the probe size, but not at --imgsz
            raise ModelConfigError(f"{args.model}: --imgsz {args.imgsz}: {err}") from None
        print(f"{'':>3}{'from':>18}{'n':>4}{'params':>11}  {'module':<14}arguments")
        for info in model.layer_info:
            src = list(info.from_) if isinstance(info.from_, tuple) else info.from_
            print(f"{info.index:>3}{src!s:>18}{info.number:>4}{info.params:>11,}  {info.module:<14}{list(info.args)}")
        print(f"{args.model}: {len(model.layer_info)} layers, {cost.params:,} parameters, {cost.gflops:.1f} GFLOPs as "
              f"built; deployed (fused) {cost.params_deploy:,} parameters, {cost.gflops_deploy:.1f} GFLOPs "
              f"(at {args.imgsz}x{args.imgsz}, nc={model.nc})")
        return 0


class SpaceSample(Command, name="sample", help="write K model YAMLs sampled from a space"):
    """Write K model YAMLs sampled at random (seeded) from a space, with their deploy cost."""

    def add_arguments(self, p):
        p.add_argument("--space", default="default", help="space YAML, or a built-in space by name: default, small, "
                                                           "yolov7 (YOLOv7 head)")
        p.add_argument("--n", type=arg.count, default=5, help=f"how many, 1..{arg.MAX_COUNT} (default %(default)s)")
        p.add_argument("--seed", type=int, default=0, help="random seed (default %(default)s)")
        p.add_argument("--nc", type=arg.positive_int, help="classes in the written YAMLs (default: the space's)")
        p.add_argument("--out", required=True, help="folder to write the YAMLs into")

    def take_action(self, args):
        import optuna

        from nas.files import write_text_atomic
        from space.searchspace import arch_cost, load_space, sample_arch

        space = load_space(args.space)
        nc, out = args.nc or space.nc, Path(args.out)
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


class SpaceGroup(Command, name="space", help="work with search spaces", subcommands=(SpaceSample,)):
    """Work with search spaces."""


class Train(Command, name="train", help="train and evaluate a model YAML (proxy settings)"):
    """Train a model YAML on a dataset (proxy settings), evaluate it, and write weights and metrics."""

    def add_arguments(self, p):
        from nas.train import ProxyConfig

        proxy = ProxyConfig()
        p.add_argument("model", metavar="MODEL.yaml", help=MODEL_HELP)
        p.add_argument("--data", help=arg.DATA_HELP)
        p.add_argument("--epochs", type=arg.positive_int, help=f"epochs (default {proxy.epochs})")
        p.add_argument("--imgsz", type=arg.imgsz, help=f"training and validation size (default {proxy.imgsz})")
        p.add_argument("--batch", type=arg.positive_int, help=f"batch size (default {proxy.batch})")
        p.add_argument("--device", help=f"auto, cpu, cuda or cuda:N (default {proxy.device})")
        p.add_argument("--loader-workers", type=arg.nonneg_int, metavar="N",
                       help="data-loader processes (default: 0 on CPU, up to 8 on CUDA)")
        p.add_argument("--workers", dest="loader_workers", type=arg.nonneg_int, action=arg.DeprecatedAlias,
                       use="--loader-workers", help=argparse.SUPPRESS)
        p.add_argument("--out", help="output folder (default: results/train/MODEL[-N])")
        p.add_argument("--quiet", action="store_true", help=arg.QUIET_HELP)

    def take_action(self, args):
        from nas.train import ProxyConfig, train_job
        from space.searchspace import model_yaml_source

        arg.setup_logging(args.quiet)
        data = arg.data_path(args.data)
        given = {"epochs": args.epochs, "imgsz": args.imgsz, "batch": args.batch, "device": args.device,
                 "workers": args.loader_workers}
        cfg = arg.make_config(ProxyConfig, quiet=args.quiet, **{k: v for k, v in given.items() if v is not None})
        out = Path(args.out) if args.out else arg.default_out(Path("results") / "train", args.model)
        m = train_job(model_yaml_source(args.model), data, cfg, out).metrics
        print(f"{'epochs':>6} {'imgsz':>5} {'params':>12} {'GFLOPs':>7} {'mAP50':>7} {'mAP50-95':>9} {'seconds':>8}")
        print(f"{m['epochs']:>6} {m['imgsz']:>5} {m['params']:>12,} {m['gflops_deploy']:>7.2f} {m['map50']:>7.4f} "
              f"{m['map50_95']:>9.4f} {m['train_seconds']:>8.1f}")
        from nas.files import folder_bytes, format_bytes

        print(f"wrote {out}/weights.pt, model.yaml, epochs.csv, metrics.json (GFLOPs: deploy, at {m['imgsz']}px; "
              f"{format_bytes(folder_bytes(out))} on disk)")
        return 0


class Val(Command, name="val", help="evaluate a trained model on a val split"):
    """Evaluate a trained model (its fused form) on a dataset's val split: COCO mAP50-95 and mAP50, at the size
    it was trained at when its study or run recorded it."""

    def add_arguments(self, p):
        from nas.train import ProxyConfig

        arg.add_source(p)
        p.add_argument("--data", help="data.yaml (default: the model's training data, else the built-in synthetic set)")
        p.add_argument("--imgsz", type=arg.imgsz, help="input size (default: the size it was trained at, else "
                                                       f"{ProxyConfig().imgsz})")
        p.add_argument("--batch", type=arg.positive_int, default=32, help="batch size (default %(default)s)")
        p.add_argument("--device", default="auto", help=arg.DEVICE_HELP)
        arg.add_study_location(p)
        p.add_argument("--quiet", action="store_true", help=arg.QUIET_HELP)

    def take_action(self, args):
        import logging

        from nas.device import resolve_device
        from nas.evaluate import evaluate
        from nas.source import load_source, resolve_data, source_size
        from nas.train import ProxyConfig

        arg.setup_logging(args.quiet)
        log = logging.getLogger("repnas.val")
        source = load_source(args.source, args.weights, results=args.results, storage=args.storage)
        data = resolve_data(args.data, source, args.source)
        imgsz, said = source_size(args.imgsz, source.train_imgsz, ProxyConfig().imgsz, "--imgsz",
                                  "the size it was trained at")
        device = resolve_device(args.device)
        log.info("val: %s on the val split of %s at %s, batch %d, %s", source.description, data.source, said,
                 args.batch, device)
        m = evaluate(source.model.to(device), data, imgsz, batch=args.batch, device=device)
        log.info("val: %d images in %.1f s (%.1f images/s)", m.images, m.seconds, m.images / max(m.seconds, 1e-9))
        print(f"{'images':>6} {'boxes':>6} {'mAP50':>7} {'mAP50-95':>9} {'imgsz':>5}")
        print(f"{m.images:>6} {m.boxes:>6} {m.map50:>7.4f} {m.map50_95:>9.4f} {imgsz:>5}")
        print(f"evaluated at {said} on the val split of {data.source}")
        return 0


class Latency(Command, name="latency", help="measure a model's latency (fused by default)"):
    """Measure the latency of a model YAML (fused by default; weights optional: latency does not need them)."""

    def add_arguments(self, p):
        import torch

        from nas.latency import LatencyConfig

        cuda, cpu = (LatencyConfig.for_device(torch.device(kind)) for kind in ("cuda", "cpu"))
        p.add_argument("model", metavar="MODEL", help=MODEL_HELP + "; or any trained SOURCE as `repnas val` takes it "
                       "(STUDY:TRIAL, a trial, train or pruned-model folder), timed in its deploy form")
        p.add_argument("--weights", help="state_dict to load first (optional)")
        arg.add_study_location(p)
        p.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True,
                       help="time the deploy (fused) form (default) or the model as built (--no-fused)")
        p.add_argument("--imgsz", type=arg.imgsz,
                       help="input size (default: the size a trained SOURCE was timed at, else 640)")
        p.add_argument("--batch", type=arg.positive_int, default=1, help="batch size (default %(default)s)")
        p.add_argument("--device", default="auto", help=arg.DEVICE_HELP)
        p.add_argument("--iters", type=arg.positive_int,
                       help=f"timed iterations (default {cuda.iters} on CUDA, {cpu.iters} on CPU)")
        p.add_argument("--threads", type=arg.positive_int, help="CPU threads while timing (default: torch's)")
        p.add_argument("--fp32", action="store_true", help="on CUDA, time in float32 instead of fp16")
        arg.add_latency_backend(p)
        p.add_argument("--cuda-graph", dest="latency_backend", action=arg.DeprecatedAlias, nargs=0,
                       const="cudagraph", use="--latency-backend cudagraph", help=argparse.SUPPRESS)
        p.add_argument("--reference", metavar="REF.yaml", help="also time this model (fused), interleaved: the ratio")

    def take_action(self, args):
        from pathlib import Path

        from nas.device import device_label, resolve_device
        from nas.latency import LatencyConfig, measure_latency, noise_warning
        from nas.source import load_source, load_weights, read_state
        from pruning.reparam import fuse_model
        from space.builder import build_model
        from space.searchspace import is_seed_source, model_yaml_source

        device = resolve_device(args.device)
        imgsz = args.imgsz
        if is_seed_source(args.model) or Path(args.model).suffix.lower() in (".yaml", ".yml"):
            source = model_yaml_source(args.model)
            model = (load_weights(source, read_state(args.weights), source=f"--weights {args.weights}")
                     if args.weights else build_model(source))
            model = fuse_model(model) if args.fused else model
        else:  # a trained source, as val/prune/export-model take it: its deploy network
            if not args.fused:
                raise arg.UsageError(f"{args.model}: a trained SOURCE is timed in its deploy form; --no-fused needs "
                                     "a MODEL.yaml (with --weights)")
            loaded = load_source(args.model, args.weights, results=args.results, storage=args.storage)
            model = loaded.model
            if imgsz is None and loaded.cost_imgsz:
                imgsz = loaded.cost_imgsz
                print(f"latency: {loaded.description} at {imgsz} px, the size it was timed at (--imgsz changes it)",
                      file=sys.stderr)
        imgsz = imgsz or 640
        reference = fuse_model(build_model(model_yaml_source(args.reference))) if args.reference else None
        defaults = LatencyConfig.for_device(device)
        iters = args.iters or defaults.iters
        cfg = arg.make_config(LatencyConfig, warmup=defaults.warmup, iters=iters, rounds=min(defaults.rounds, iters),
                              half=not args.fp32, backend=args.latency_backend or defaults.backend,
                              threads=args.threads)
        lat = measure_latency(model, imgsz, args.batch, device, cfg, reference=reference)
        info = lat.device
        where = device_label(info) + ("" if "threads" in info else
                                      f", CUDA {info['cuda']}, cuDNN {info['cudnn']}, driver {info['driver']}")
        print(f"{'form':<9}{'imgsz':>10}{'batch':>6}{'dtype':>9}{'median_ms':>11}{'p90_ms':>9}{'mean_ms':>9}"
              f"{'std_ms':>8}{'iters':>6}{'ratio':>7}")
        ratio = f"{lat.latency_ratio:.3f}" if lat.latency_ratio else "-"
        print(f"{'fused' if args.fused else 'as built':<9}{f'{lat.imgsz[0]}x{lat.imgsz[1]}':>10}{lat.batch:>6}"
              f"{lat.dtype:>9}{lat.median_ms:>11.3f}{lat.p90_ms:>9.3f}{lat.mean_ms:>9.3f}{lat.std_ms:>8.3f}"
              f"{lat.iterations:>6}{ratio:>7}")
        if lat.reference_median_ms:
            print(f"reference {args.reference} (fused): median {lat.reference_median_ms:.3f} ms, measured interleaved")
        print(f"device: {where}; torch {info['torch']}; backend {lat.backend}")
        warning = noise_warning(lat)
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
        return 0


class DataSynth(Command, name="synth", help="write the synthetic shapes dataset"):
    """Write the deterministic synthetic shapes dataset (YOLO format) into OUT."""

    def add_arguments(self, p):
        from nas.synth import SHAPES, SynthConfig

        synth = SynthConfig()
        p.add_argument("out", metavar="OUT", help="folder to write into")
        p.add_argument("--images", type=int, default=synth.images, help="number of images (default %(default)s)")
        p.add_argument("--classes", type=int, default=synth.classes,
                       help=f"number of shape classes, 1..{len(SHAPES)} (default %(default)s)")
        p.add_argument("--imgsz", type=int, default=synth.imgsz, help="image size (default %(default)s)")
        p.add_argument("--seed", type=int, default=synth.seed, help="random seed (default %(default)s)")
        p.add_argument("--sizes", type=float, nargs=2, default=synth.sizes, metavar=("MIN", "MAX"),
                       help="object side as a share of the image side, log-uniform in MIN..MAX (default "
                            f"{synth.sizes[0]} {synth.sizes[1]})")
        p.add_argument("--max-objects", type=int, default=synth.max_objects,
                       help="1..N objects per image (default %(default)s)")
        p.add_argument("--no-clutter", action="store_true", help="a plain background: no blobs, lines or dots")

    def take_action(self, args):
        from nas.synth import SynthConfig, make_synthetic

        cfg = arg.make_config(SynthConfig, images=args.images, classes=args.classes, imgsz=args.imgsz,
                              seed=args.seed, sizes=tuple(args.sizes), max_objects=args.max_objects,
                              clutter=not args.no_clutter)
        path = make_synthetic(args.out, cfg)
        print(f"wrote {cfg.images} images ({cfg.classes} classes, {cfg.imgsz}px) and {path}")
        return 0


class DataGroup(Command, name="data", help="datasets", subcommands=(DataSynth,)):
    """Datasets."""


class Search(Command, name="search", help="run or continue a search study"):
    """Run a search study (or continue it: the same --study resumes with its stored settings). The defaults shown
    are a new study's; a new study without --data is the demo (the synthetic demo set, nas.study.settings.DEMO)."""

    resume = False  # the study must exist already

    def add_arguments(self, p):
        p.add_argument("--study", default="default", help="study name: results/NAME (default %(default)r)")
        arg.add_search_options(p)

    def take_action(self, args):
        import torch

        from nas.study import load_study, run_search, summary_line

        arg.setup_logging(args.quiet)
        settings = arg.study_settings(args)
        if self.resume:
            load_study(settings.name, storage=settings.storage, results=settings.results)
        if args.devices and not torch.cuda.is_available():
            raise arg.UsageError(f"--devices {','.join(args.devices)}: no CUDA device is available here; drop "
                                 "--devices")
        study = run_search(settings, report=lambda line: print(line, flush=True), workers=args.workers,
                           devices=args.devices or (), force=args.force, enqueue=args.enqueue or ())
        print(summary_line(study))
        print(f"Pareto files: {settings.folder}/pareto.{{md,csv,html,json,png}}")
        print(_trial_files_line(study, settings))
        return 0


def _trial_files_line(study, settings) -> str:
    """How much disk the study's trial folders take (weights mostly) and how to free it."""
    from nas.files import folder_bytes, format_bytes
    from nas.study import stored_settings
    from nas.study.run import location_options

    root = stored_settings(study, settings.name, settings.storage, settings.results).trials_root  # --artifacts too
    folders = [f for f in root.iterdir() if f.is_dir() and f.name.isdigit()] if root.is_dir() else []
    total = sum(folder_bytes(f) for f in folders)
    n = len(folders)
    each = f", {format_bytes(total // n)} each" if n > 1 else ""
    return (f"trial files: {format_bytes(total)} in {root} ({n} trial{'s' * (n != 1)}{each}); free the weights off "
            f"the Pareto front with `repnas clean {settings.name} --keep-weights K{location_options(settings)}` (K: "
            "also keep the top-K by mAP50-95)")


class _ResumeHelp(argparse.HelpFormatter):
    """`repnas resume --help`: a study setting left out keeps the study's stored value, so that is its default."""

    OWN = ("help", "study", "storage", "results", "devices", "enqueue", "force", "quiet")  # not study settings

    def _get_help_string(self, action):
        text = super()._get_help_string(action) or ""
        if action.dest in self.OWN:
            return text
        return re.sub(r" ?\(default[^)]*\)", "", text) + " (default: the study's stored value)"


class Resume(Search, name="resume", help="continue a study (search --study NAME)"):
    """Continue study NAME (the same as `repnas search --study NAME`) until it holds --trials counted trials.
    Every setting left out keeps the study's stored value; one given changes it for this and later runs, and a
    change that makes trials incomparable (data, space, proxy or latency settings, device, baseline, artifacts,
    pruning) is refused with each difference named unless --force. Trials left RUNNING by a dead worker are failed
    as stale and their Archs run again; finished trials are never re-run."""

    resume = True

    def add_arguments(self, p):
        p.formatter_class = _ResumeHelp
        p.add_argument("study", metavar="NAME", help="the study to continue: results/NAME (DIR/NAME with --results "
                                                     "DIR), or study NAME in --storage URL")
        arg.add_search_options(p)


class Prune(Command, name="prune", help="prune a trained model to a FLOPs or latency target (and fine-tune it)"):
    """Prune a trained model's fused network to a FLOPs target or a measured latency target, optionally fine-tune
    it, and report before/after. A latency target searches the FLOPs fraction on measurements (each candidate timed
    interleaved with the unpruned model on --device at --imgsz, batch 1) and checks the result independently."""

    def add_arguments(self, p):
        from nas.train import ProxyConfig
        from pruning.channel import IMPORTANCES

        arg.add_source(p)
        target = p.add_mutually_exclusive_group(required=True)
        target.add_argument("--target-flops", help="'50%%' or 0.5 of the deploy GFLOPs, or absolute '2.5G'")
        target.add_argument("--target-latency", help="'0.6x' of the unpruned model's measured latency, or '35ms' (on "
                                                     "this device, at --imgsz, batch 1)")
        p.add_argument("--importance", choices=IMPORTANCES, default="taylor",
                       help="channel importance: first-order Taylor on training batches (default; see RESULTS.md), "
                            "weight magnitude (l2, l1), or random")
        p.add_argument("--round-to", type=arg.positive_int, default=8,
                       help="keep channel counts multiples of this (%(default)s)")
        p.add_argument("--finetune-epochs", type=arg.nonneg_int, default=0,
                       help="fine-tuning epochs after pruning (%(default)s)")
        p.add_argument("--data", help="data.yaml (default: the model's training data, else the built-in synthetic set)")
        p.add_argument("--imgsz", type=arg.imgsz, help="GFLOPs and latency input size (default: the size the "
                                                       "source's study timed it at, else 640)")
        p.add_argument("--eval-imgsz", type=arg.imgsz, help="evaluation and fine-tuning size (default: the size it "
                                                             f"was trained at, else {ProxyConfig().imgsz})")
        p.add_argument("--device", default="auto", help=arg.DEVICE_HELP)
        p.add_argument("--no-eval", action="store_true", help="skip the mAP before pruning")
        p.add_argument("--out", help="output folder (default: DIR/prune/SOURCE[-N], DIR of --results)")
        arg.add_study_location(p)
        p.add_argument("--quiet", action="store_true", help=arg.QUIET_HELP)

    def take_action(self, args):
        import logging

        from nas.prune import LatencyTarget, prune_job, resolve_prune_data, save_prune_report
        from nas.source import load_source, source_size
        from nas.train import ProxyConfig
        from pruning.channel import parse_target
        from space.cost import count_gflops

        arg.setup_logging(args.quiet)
        source = load_source(args.source, args.weights, results=args.results, storage=args.storage)
        imgsz, cost_said = source_size(args.imgsz, source.cost_imgsz, 640, "--imgsz", "the size its GFLOPs and "
                                       "latency were recorded at")
        eval_imgsz, eval_said = source_size(args.eval_imgsz, source.train_imgsz, ProxyConfig().imgsz, "--eval-imgsz",
                                            "the size it was trained at")
        if args.target_latency is not None:  # a bad target fails before any work
            target_latency = LatencyTarget.parse(args.target_latency)
        else:
            target_latency = None
            parse_target(args.target_flops, count_gflops(source.model, imgsz))
        data = resolve_prune_data(args.data, source, args.source, importance=args.importance,
                                  finetune_epochs=args.finetune_epochs, evaluate_before=not args.no_eval)
        logging.getLogger("repnas.prune").info("prune: %s; GFLOPs and latency at %s; mAP and fine-tuning at %s",
                                               source.description, cost_said, eval_said)
        report = prune_job(source.model, data, args.target_flops, imgsz=imgsz, eval_imgsz=eval_imgsz,
                           importance=args.importance, round_to=args.round_to, finetune_epochs=args.finetune_epochs,
                           device=args.device, evaluate_before=not args.no_eval, target_latency=target_latency)
        label = args.source.replace(":", "-").replace("/", "_").strip("._-") or "model"
        out = Path(args.out) if args.out else arg.default_out(Path(args.results) / "prune", label)
        save_prune_report(report, out, source=source.description, data=data,
                          target=args.target_flops if target_latency is None else target_latency.text)
        print(report.table())
        print(f"wrote {out}/channels.json, weights.pt (load with pruning.portable.load_pruned) and prune.json")
        return 0


class ExportModel(Command, name="export-model", help="export a fused or pruned model to ONNX, checked by onnxruntime"):
    """Export a fused or pruned model to ONNX and check it against PyTorch with onnxruntime (the file is written
    only when the check passes). Input `images` (batch, 3, S, S): RGB, float32 0..1. Output `output` (batch, N, 5 +
    nc), only the batch dynamic: per row x, y, w, h (box centre and size in input pixels), objectness and nc class
    scores (after the sigmoid); NMS is not included."""

    def add_arguments(self, p):
        arg.add_source(p)
        p.add_argument("--onnx", required=True, metavar="OUT.onnx", help="where to write the ONNX file")
        p.add_argument("--imgsz", type=arg.imgsz, default=640,
                       help="input size (default %(default)s; the batch axis is dynamic)")
        arg.add_study_location(p)

    def take_action(self, args):
        from nas.onnx_export import export_onnx
        from nas.source import load_source

        source = load_source(args.source, args.weights, results=args.results, storage=args.storage)
        report = export_onnx(source.model, args.onnx, args.imgsz)
        shape = ", ".join(map(str, report["output_shape"]))
        print(f"wrote {report['path']} (opset {report['opset']}, {report['exporter']})")
        print(f"input  `images` (batch, 3, {args.imgsz}, {args.imgsz}): RGB, float32 0..1, letterboxed")
        print(f"output `output` ({shape}): {report['layout']}")
        print(f"check: onnxruntime vs PyTorch on a seeded batch of 2: max abs diff {report['max_abs_diff']:.2e}, "
              f"{report['max_abs_diff_normalised']:.2e} with boxes divided by the input size (tolerance "
              f"{report['tolerance']:g}): {report['verdict']}")
        return 0


class YOLOv5Bridge(Command, name="yolov5-bridge", help="YOLOv5 checkpoints both ways: print the converter script, or "
                                                        "export a model for it"):
    """With no SOURCE: print the standalone converter (`repnas yolov5-bridge > bridge.py`) that runs in your YOLOv5
    environment: a bundle -> YOLOv5 checkpoints (train-time, or YOLOv5's fused form), a YOLOv5 checkpoint ->
    model.yaml + weights.pt that val, prune, latency and export-model read. With SOURCE: write its bundle into --out
    (model.yaml, the train-time and fused state_dicts, a check output, bridge.json and the script itself)."""

    def add_arguments(self, p):
        p.add_argument("source", metavar="SOURCE", nargs="?",
                       help="STUDY:TRIAL (e.g. default:3), a trial or `repnas train` folder, a pruned-model folder, or "
                            "MODEL.yaml with --weights; omit it to print the script")
        p.add_argument("--weights", help="state_dict for a MODEL.yaml source (train-time or fused)")
        p.add_argument("--out", metavar="DIR", help="the bundle folder to write (with SOURCE)")
        p.add_argument("--data", help="data.yaml for the class names (default: the data the model was trained on)")
        arg.add_study_location(p)

    def take_action(self, args):
        from nas.yolov5 import bridge_script, export_bundle

        if args.source is None:
            if args.out or args.weights or args.data:
                raise arg.UsageError("--out, --weights and --data go with a SOURCE to export; without one the command "
                                     "prints the bridge script (repnas yolov5-bridge > bridge.py)")
            sys.stdout.write(bridge_script())
            return 0
        if not args.out:
            raise arg.UsageError(f"{args.source}: give --out DIR, the bundle folder to write")
        bundle = export_bundle(args.source, args.out, weights=args.weights, data=args.data, results=args.results,
                               storage=args.storage)
        forms = ", ".join(f"{form} weights {name}" for form, name in bundle.forms.items() if name)
        print(f"wrote {bundle.folder}: {bundle.description}, nc={bundle.nc} ({', '.join(bundle.names[:5])}"
              f"{', ...' if bundle.nc > 5 else ''}); {forms}{'; pruned: explicit widths' if bundle.pruned else ''}")
        for note in bundle.notes:
            print(f"note: {note}", file=sys.stderr)
        steps = [f"python bridge.py to-yolov5 {bundle.folder} --deploy --out repnas-deploy.pt   # val/detect/export"]
        if bundle.forms["train"]:
            steps.insert(0, f"python bridge.py to-yolov5 {bundle.folder} --out repnas.pt   # train.py --weights")
        print("in your YOLOv5 checkout (bridge.py is in the bundle too):\n  " + "\n  ".join(steps))
        return 0


class Clean(Command, name="clean", help="delete weights off the front and the top-k"):
    """Delete the weight files of trials that are neither on the Pareto front nor in the top-K by mAP50-95."""

    def add_arguments(self, p):
        p.add_argument("name", metavar="NAME", help="study name")
        arg.add_study_location(p)
        p.add_argument("--keep-weights", type=arg.nonneg_int, metavar="K",
                       help="also keep the top-K by mAP50-95 (default: the study's --keep-weights, else 0)")

    def take_action(self, args):
        from nas.study import check_study_name, clean_study

        check_study_name(args.name)
        removed, kept = clean_study(args.name, args.keep_weights, storage=args.storage, results=args.results)
        print(f"removed {len(removed)} weight files; kept weights of trials {sorted(kept)}")
        return 0


class Confirm(Command, name="confirm", help="retrain chosen trials longer and measure how well the proxy ranked them"):
    """Retrain chosen trials of a study at a longer budget and/or other seeds (resumable; --workers, --devices,
    any storage), then print and store Kendall τ-b and Spearman ρ between proxy and confirmed mAP50-95 (n and 90%
    bootstrap intervals; none below 5 trials), top-k overlap, seed-to-seed τ-b and the confirmed Pareto front."""

    def add_arguments(self, p):
        arg.add_confirm_options(p)

    def take_action(self, args):
        from dataclasses import replace

        from nas.study import check_study_name, load_study, stored_settings
        from nas.study.confirm import check_device, make_plan, run_confirm, summary_lines

        arg.setup_logging(args.quiet)
        check_study_name(args.name)
        check_device(args.devices or ())
        study = load_study(args.name, storage=args.storage, results=args.results)
        settings = stored_settings(study, args.name, args.storage, args.results)
        if args.device:
            settings = replace(settings, device=args.device)
        plan = make_plan(study, settings, trials=args.trials, front=args.front, spread=args.spread,
                         epochs=args.epochs, factor=args.factor, imgsz=args.imgsz, seeds=args.seeds or ())
        summary = run_confirm(study, settings, plan, report=lambda line: print(line, flush=True),
                              workers=args.workers, devices=args.devices or ())
        print("\n".join(summary_lines(summary)))
        return 0


class Relatency(Command, name="relatency", help="re-time a finished study's trials on this machine (no retraining)"):
    """Re-time every complete trial of a study on this machine (its deploy network rebuilt from the trial folder: no
    weights needed, so trials whose weights `repnas clean` removed are timed too), interleaved with the baseline, and
    store the figures as a named latency profile; `repnas show/export NAME --profile PROFILE` rank on it. Resumable:
    run it again to time what a killed run left."""

    def add_arguments(self, p):
        p.add_argument("name", metavar="NAME", help="study name")
        arg.add_study_location(p)
        p.add_argument("--profile", help="profile name (default: made of the device, threads, backend, size, batch)")
        p.add_argument("--device", default="auto", help=arg.DEVICE_HELP)
        arg.add_latency_backend(p, what="; stored with the profile")
        p.add_argument("--latency-imgsz", type=arg.imgsz, help="latency input size (default: the study's)")
        p.add_argument("--latency-batch", type=arg.positive_int, help="latency input batch (default: the study's)")
        p.add_argument("--threads", type=arg.positive_int, help="CPU threads while timing (default: torch's)")
        p.add_argument("--quiet", action="store_true", help="print the summary only")

    def take_action(self, args):
        from nas.study import check_study_name, load_study, stored_settings
        from nas.study.relatency import make_profile, run_relatency, summary_lines

        check_study_name(args.name)
        study = load_study(args.name, storage=args.storage, results=args.results)
        settings = stored_settings(study, args.name, args.storage, args.results)
        profile = make_profile(settings, name=args.profile, device=args.device, backend=args.latency_backend,
                               imgsz=args.latency_imgsz, batch=args.latency_batch, threads=args.threads)
        say = (lambda line: None) if args.quiet else (lambda line: print(line, flush=True))
        print("\n".join(summary_lines(run_relatency(study, settings, profile, report=say))))
        return 0


class Show(Command, name="show", help="one screen about a study"):
    """One screen about a study: settings, trials by state and failure reason, the front, time left."""

    def add_arguments(self, p):
        p.add_argument("name", metavar="NAME", help="study name")
        arg.add_study_location(p)
        p.add_argument("--profile", help="rank on this latency profile (`repnas relatency`)")

    def take_action(self, args):
        from nas.study import check_study_name, show_study

        check_study_name(args.name)
        print(show_study(args.name, storage=args.storage, results=args.results, profile=args.profile))
        return 0


class Export(Command, name="export", help="write a study's Pareto files"):
    """Write a study's Pareto table (md, csv, html, json; pareto.png always) into results/NAME or --out."""

    def add_arguments(self, p):
        from nas.pareto import FORMATS

        p.add_argument("name", metavar="NAME", help="study name")
        arg.add_study_location(p)
        p.add_argument("--format", default=",".join(FORMATS), help="comma-separated: %(default)s (png always)")
        p.add_argument("--out", help="output folder (default: results/NAME, with --profile results/NAME/profiles/P)")
        p.add_argument("--profile", help="rank on this latency profile (`repnas relatency`)")

    def take_action(self, args):
        from nas.study import check_study_name, export_study

        check_study_name(args.name)
        paths = export_study(args.name, args.out, args.format, storage=args.storage, results=args.results,
                             profile=args.profile)
        print("wrote " + ", ".join(str(p) for p in paths.values()))
        return 0


class Dashboard(Command, name="dashboard", help="serve a study in optuna-dashboard (the `dashboard` extra)"):
    """Serve a study in optuna-dashboard (http://127.0.0.1:8080 by default) until Ctrl-C: the objectives named
    mAP50-95 and latency_ms, the Pareto front, repnas's hypervolume plot and every trial's user attrs. The dashboard
    gets the storage repnas opens for the study, so what it writes (notes, trial states) takes the study's lock as a
    worker's appends do; `optuna-dashboard results/NAME/study.log` would not. Needs `pip install -e ".[dashboard]"`."""

    def add_arguments(self, p):
        from nas.dashboard import DEFAULT_HOST, DEFAULT_PORT

        p.add_argument("name", metavar="NAME", help="study name")
        arg.add_study_location(p)
        p.add_argument("--host", default=DEFAULT_HOST,
                       help="address to listen on (default %(default)s: this machine only; the dashboard has no "
                            "login and can change the study)")
        p.add_argument("--port", type=arg.nonneg_int, default=DEFAULT_PORT,
                       help="port to listen on (default %(default)s; 0: any free port)")

    def take_action(self, args):
        from nas.dashboard import serve_dashboard
        from nas.study import check_study_name

        arg.setup_logging()
        check_study_name(args.name)
        serve_dashboard(args.name, storage=args.storage, results=args.results, host=args.host, port=args.port,
                        report=lambda line: print(line, flush=True))
        return 0


COMMANDS: tuple[type[Command], ...] = (Build, SpaceGroup, Train, Val, Latency, DataGroup, Search, Resume, Confirm,
                                       Relatency, Prune, ExportModel, YOLOv5Bridge, Clean, Show, Export, Dashboard)


def _add_commands(parser: arg.Parser, commands: Sequence[type[Command]], dest: str, metavar: str) -> None:
    sub = parser.add_subparsers(dest=dest, metavar=metavar, parser_class=arg.Parser)
    sub.required = True
    for command in (cls() for cls in commands):
        p = sub.add_parser(command.name, help=command.help, description=command.__doc__)
        if command.subcommands:
            _add_commands(p, command.subcommands, f"{command.name}_command", "ACTION")
        else:
            p.defer(command.add_arguments)
            p.set_defaults(func=command.take_action)


def version_line() -> str:
    """`repnas --version`: the installed version, the git commit of the checkout it runs from (when it runs from
    one: an editable install), and the versions of Python, torch and optuna, read without importing them."""
    import platform
    import subprocess
    from importlib import metadata

    def installed(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    line = f"repnas {installed('repnas')}"
    checkout = Path(__file__).resolve().parents[1]
    if (checkout / ".git").exists():
        def git(*argv: str) -> str:
            try:
                return subprocess.run(["git", "-C", str(checkout), *argv], capture_output=True, text=True,
                                      timeout=5).stdout.strip()
            except (OSError, subprocess.SubprocessError):
                return ""

        commit = git("rev-parse", "--short=12", "HEAD")
        if commit:
            changed = git("status", "--porcelain", "--untracked-files=no")
            line += f" (git {commit}{', with local changes' if changed else ''})"
    return (f"{line}; Python {platform.python_version()}, torch {installed('torch')}, "
            f"optuna {installed('optuna')}")


class _Version(argparse.Action):
    """--version: print `version_line()` and exit (computed only when asked: it runs git)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_line())
        parser.exit()


def make_parser() -> argparse.ArgumentParser:
    """The `repnas` parser, built from COMMANDS (a command's arguments are added when that command is parsed)."""
    parser = arg.Parser(prog="repnas", description="Search, fuse, prune and rank RepVGG-YOLO detectors.")
    parser.add_argument("--version", action=_Version, help="print the version (and git commit) and exit")
    _add_commands(parser, COMMANDS, "command", "COMMAND")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        return args.func(args)
    except RepnasError as err:
        message = " ".join(str(err).split())  # one line, whatever the message held
        print(f"repnas {args.command}: error: {message}", file=sys.stderr)
        return arg.EXIT_USAGE
    except KeyboardInterrupt:
        print("repnas: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a storage lost during a run (a database connection): one line, not a traceback
        from nas.study.storage import storage_failure

        failure = storage_failure(err, getattr(args, "storage", None))
        if failure is None:
            raise
        print(f"repnas {args.command}: error: {' '.join(str(failure).split())}", file=sys.stderr)
        return arg.EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
