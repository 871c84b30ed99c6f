"""The argparse pieces the `repnas` commands (nas/cli.py) share: the parser class (a usage error is one stderr line,
exit 2; a subcommand's arguments are added when it is used), the deprecated-alias action, the value types, the
option groups of several commands (--storage/--results; the options of `search` and `resume` and the StudySettings
they give) and the resolution of --quiet, a missing --data and a missing --out.

A value type parses one option's text or raises ArgumentTypeError with the rule it broke (argparse then names the
option: "argument --imgsz: 100 must be a multiple of 32 ...").
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path

from space.errors import RepnasError

EXIT_USAGE = 2
MAX_COUNT = 10_000  # the most model YAMLs one `space sample`, or trials one `search`, asks for
MAX_IMGSZ = 8192
STRIDE = 32  # the largest stride of every model here: an input side must be a multiple of it


class UsageError(RepnasError):
    """A bad command-line value."""


def make_config(cls, **fields):
    """`cls(**fields)` for a config dataclass whose __post_init__ raises ValueError: that is a UsageError here."""
    try:
        return cls(**fields)
    except ValueError as err:
        raise UsageError(str(err)) from None


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit 2), and a subcommand's arguments are added only when
    that subcommand is parsed (`defer`): `repnas build` does not import the study's settings to show their defaults.
    """

    _deferred: Callable[[argparse.ArgumentParser], None] | None = None

    def defer(self, add_arguments: Callable[[argparse.ArgumentParser], None]) -> None:
        self._deferred = add_arguments

    def parse_known_args(self, args=None, namespace=None):
        if self._deferred is not None:  # also before --help: the help shows them
            add, self._deferred = self._deferred, None
            add(self)
        return super().parse_known_args(args, namespace)

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}{_did_you_mean(message)} (see {self.prog} --help)\n")


def _did_you_mean(message: str) -> str:
    """'; did you mean 'search'?' for argparse's "invalid choice: 'serch' (choose from 'build', ...)" (a mistyped
    command or choice), when one choice is close enough; else ''. Reads both quoted and plain choice lists."""
    import difflib
    import re

    found = re.search(r"invalid choice: (['\"]?)(.*?)\1 \(choose from (.*)\)$", message)
    if found is None or "did you mean" in message or "maybe you meant" in message:
        return ""
    choices = [c.strip().strip("'\"") for c in found.group(3).split(",")]
    close = difflib.get_close_matches(found.group(2), choices, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


class DeprecatedAlias(argparse.Action):
    """An old option name (`use`: the new one): stores into the new option's dest, warns in one line on stderr."""

    def __init__(self, option_strings, dest, *, use: str, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.use = use

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{option_string} is deprecated for `{parser.prog}`; use {self.use}", file=sys.stderr)
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)  # a flag (nargs=0) stores const


# value types

def int_at_least(low: int) -> Callable[[str], int]:
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


positive_int = int_at_least(1)
nonneg_int = int_at_least(0)


def count(text: str) -> int:
    """A count of things to make: 1..MAX_COUNT."""
    value = positive_int(text)
    if value > MAX_COUNT:
        raise argparse.ArgumentTypeError(f"{value} is over {MAX_COUNT}; sample in batches")
    return value


def latency_ratio(text: str) -> float:
    """A latency ratio in (0, 1) written '0.6x' (nas.prune.LatencyTarget's ratio form)."""
    from nas.prune import LatencyTarget

    try:
        target = LatencyTarget.parse(text)
    except RepnasError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    if target.ratio is None:
        raise argparse.ArgumentTypeError(f"{text!r}: the search prunes each candidate to a ratio of its own measured "
                                         "latency, e.g. '0.6x' (an absolute time is for `repnas prune`)")
    return target.ratio


def imgsz(text: str) -> int:
    """An input side in pixels: a multiple of STRIDE up to MAX_IMGSZ."""
    value = positive_int(text)
    if value % STRIDE or value > MAX_IMGSZ:
        raise argparse.ArgumentTypeError(f"{value} must be a multiple of {STRIDE} (the largest stride) up to "
                                         f"{MAX_IMGSZ}")
    return value


def devices(text: str) -> list[str]:
    """Comma-separated CUDA indices ("0,1,2,3") -> ["0", "1", "2", "3"]."""
    items = [x.strip() for x in text.split(",")]
    if not items or not all(x.isdigit() for x in items):
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of CUDA indices, e.g. 0,1,2,3")
    return items


def fraction(text: str) -> float:
    """A share in [0.01, 1], written 0.5 or 50%."""
    try:
        value = float(text.rstrip("%")) / (100 if text.endswith("%") else 1)
    except ValueError:
        value = math.nan
    if not 0.01 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a fraction in [0.01, 1] (e.g. 0.5 or 50%)")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return value


# option groups and resolutions shared by several commands

DATA_HELP = "data.yaml (default: the built-in synthetic dataset)"
DEVICE_HELP = "auto, cpu, cuda or cuda:N (default %(default)s)"
QUIET_HELP = "no progress bars or info lines"


def add_source(p: argparse.ArgumentParser) -> None:
    """SOURCE and --weights: a trained model, as `nas.source.load_source` reads it (with --storage/--results for
    STUDY:TRIAL); the same for every command that takes one (val, prune, export-model)."""
    p.add_argument("source", metavar="SOURCE", help="STUDY:TRIAL (e.g. default:3), a trial or `repnas train` folder, a "
                                                    "pruned-model folder, or MODEL.yaml with --weights")
    p.add_argument("--weights", help="state_dict for a MODEL.yaml source (train-time or fused)")


def add_study_location(p: argparse.ArgumentParser) -> None:
    """--storage and --results: where a study lives (for a study's commands and STUDY:TRIAL sources)."""
    p.add_argument("--storage", help="Optuna storage URL of the study (default: DIR/NAME/study.log, a journal file)")
    p.add_argument("--results", default="results", metavar="DIR",
                   help="root folder of study folders (default ./%(default)s)")


def add_latency_backend(p: argparse.ArgumentParser, *, what: str = "") -> None:
    """--latency-backend, one name for every command that times latency (`repnas latency`, `search`, `resume`): a
    `nas.latency.BACKENDS` name; None when not given (the device's default, or a study's stored backend)."""
    import torch

    from nas.latency import BACKENDS, LatencyConfig

    cuda, cpu = (LatencyConfig.for_device(torch.device(kind)).backend for kind in ("cuda", "cpu"))
    p.add_argument("--latency-backend", choices=tuple(BACKENDS), metavar="{" + ",".join(BACKENDS) + "}",
                   help="how latency is timed: " + "; ".join(f"{name}: {b.summary} ({' or '.join(b.device_types)})"
                                                            for name, b in BACKENDS.items())
                   + f" (default {cuda} on CUDA, {cpu} on a CPU{what}; onnxruntime needs the onnx extra)")


def add_search_options(p: argparse.ArgumentParser) -> None:
    """The options of `search` and `resume`; every default shown is read from nas.study.settings or ProxyConfig."""
    from nas.earlystop import EarlyStopConfig
    from nas.study.settings import DEFAULTS, DEMO, DEVICE_PROXY, SAMPLERS
    from nas.train import ProxyConfig

    proxy, demo, cpu = ProxyConfig(), DEMO["proxy"], DEVICE_PROXY["cpu"]
    p.add_argument("--data", help="data.yaml (default: the demo, the built-in synthetic demo set)")
    p.add_argument("--space", help="space YAML, or a built-in space by name: default (the default), small, "
                                   "yolov7 (YOLOv7 head)")
    p.add_argument("--trials", type=count, help=f"trials that count, in all (default {DEFAULTS['trials']}, the demo "
                                                f"{DEMO['trials']}; rejected ones do not)")
    add_study_location(p)
    p.add_argument("--seed", type=int, help=f"sampler seed (default {DEFAULTS['seed']})")
    p.add_argument("--sampler", choices=SAMPLERS, help=f"sampler (default {DEFAULTS['sampler']})")
    p.add_argument("--epochs", type=positive_int,
                   help=f"proxy training epochs (default {proxy.epochs}; on a CPU {cpu['epochs']}, see benchmarks/"
                        f"RESULTS.md 'Proxy fidelity'; the demo {demo['epochs']})")
    p.add_argument("--imgsz", type=imgsz, help=f"proxy training and validation size (default {proxy.imgsz}; on a "
                                               f"CPU {cpu['imgsz']}; the demo {demo['imgsz']})")
    p.add_argument("--val-every", type=positive_int, help="validate every K epochs: the early-stopping rule acts at "
                                                          f"these epochs (default {proxy.val_every}; on a CPU "
                                                          f"{cpu['val_every']}; the demo {demo['val_every']})")
    p.add_argument("--latency-imgsz", type=imgsz, help="latency and GFLOPs input size (default: the space's, the "
                                                       f"demo {DEMO['latency_imgsz']})")
    p.add_argument("--latency-batch", type=positive_int,
                   help=f"latency input batch size (default {DEFAULTS['latency_batch']})")
    add_latency_backend(p, what="; frozen with the study, whose trials and baseline it times")
    p.add_argument("--batch", type=positive_int,
                   help=f"proxy training batch size (default {proxy.batch}, the demo {demo['batch']})")
    p.add_argument("--proxy", nargs="+", type=proxy_setting, metavar="KEY=VALUE", default=[],
                   help="any other proxy training setting, a ProxyConfig field (nas/train.py), nested with dots: "
                        "fraction=0.5 obj_ref_imgsz=160 loss.obj=2 augment.mosaic=0.5 lr0=0.004 seed=1")
    p.add_argument("--device", help=f"auto, cpu, cuda or cuda:N (default {DEFAULTS['device']})")
    p.add_argument("--baseline", help="baseline: a YAML of Arch params, a model YAML, or `seed` (the default)")
    p.add_argument("--max-failures", type=positive_int,
                   help=f"stop after this many failed trials (default {DEFAULTS['max_failures']})")
    p.add_argument("--max-latency-ms", type=positive_float,
                   help="reject Archs slower than this (ms, the study's latency objective) before training")
    p.add_argument("--max-latency-ratio", type=positive_float,
                   help="reject Archs slower than this ratio to the baseline before training")
    p.add_argument("--early-stop", action=argparse.BooleanOptionalAction, default=None,
                   help="stop a trial's training when a no-slower finished trial was clearly better at the same "
                        f"epoch (default {'on' if EarlyStopConfig().enabled else 'off'}; see nas/earlystop.py)")
    p.add_argument("--keep-weights", type=int, metavar="K",
                   help="keep weights only for the Pareto front and the top-K by mAP (default: keep all)")
    p.add_argument("--artifacts", metavar="DIR",
                   help="shared folder for trial folders, DIR/NAME/N (default results/NAME/trials/N)")
    p.add_argument("--stale-after", type=positive_float, metavar="SECONDS", help="a RUNNING trial without a "
                   f"heartbeat this long is taken for dead (default {DEFAULTS['stale_after']:g})")
    p.add_argument("--prune-to", type=fraction, metavar="FRACTION",
                   help="prune each candidate's fused model to this share of its deploy FLOPs, fine-tune it and "
                        "rank the pruned model (a space's `prune_fraction` extra makes it a search dimension)")
    p.add_argument("--prune-to-latency", type=latency_ratio, metavar="RATIOx",
                   help="prune each candidate to this share of its own measured latency ('0.6x': the FLOPs fraction "
                        "searched on measurements, as `repnas prune --target-latency`), fine-tune it and rank it")
    p.add_argument("--prune-finetune-epochs", type=nonneg_int, metavar="K",
                   help="fine-tuning epochs after pruning in the search (default: proxy epochs / 5)")
    p.add_argument("--workers", type=positive_int, default=None,
                   help="worker processes on this machine against the one storage (default 1; the demo, a new "
                        "study without --data, on a CPU: one single-threaded worker per core, up to 2)")
    p.add_argument("--devices", type=devices, metavar="0,1,..",
                   help="CUDA devices: worker i uses device i mod len (sets --workers to at least len)")
    p.add_argument("--enqueue", nargs="+", metavar="A.yaml",
                   help="known candidates to try first: YAMLs of Arch params, model YAMLs, or `seed`")
    p.add_argument("--force", action="store_true", help="on resume, accept changed settings that make trials "
                                                        "incomparable")
    p.add_argument("--quiet", action="store_true", help=QUIET_HELP)


def trial_numbers(text: str) -> list[int]:
    """'3,7,12' -> [3, 7, 12] (trial numbers, >= 0)."""
    try:
        numbers = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of trial numbers, e.g. 3,7,12") \
            from None
    if not numbers or min(numbers) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give trial numbers >= 0, e.g. 3,7,12")
    return numbers


def add_confirm_options(p: argparse.ArgumentParser) -> None:
    """The options of `repnas confirm`."""
    from nas.study.confirm import DEFAULT_FACTOR

    p.add_argument("name", metavar="NAME", help="study name")
    add_study_location(p)
    which = p.add_argument_group("which trials (combined; default --front; the baseline is always included)")
    which.add_argument("--trials", type=trial_numbers, metavar="3,7,12", default=[], help="these trial numbers")
    which.add_argument("--front", action="store_true", help="the proxy Pareto front")
    which.add_argument("--spread", type=positive_int, metavar="K",
                       help="K trials spread evenly over the latency range (fastest and slowest included)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--epochs", type=positive_int, help="confirmation epochs")
    budget.add_argument("--factor", type=positive_float, metavar="F",
                        help=f"confirmation epochs = F x the study's proxy epochs (default {DEFAULT_FACTOR})")
    p.add_argument("--imgsz", type=imgsz, help="training and validation size (default: the study's proxy imgsz)")
    p.add_argument("--seeds", type=nonneg_int, nargs="+", metavar="S",
                   help="training seeds, one run each (default: the study's proxy seed)")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: the study's device)")
    p.add_argument("--workers", type=positive_int, default=1,
                   help="worker processes on this machine against the one storage (default 1)")
    p.add_argument("--devices", type=devices, metavar="0,1,..",
                   help="CUDA devices: worker i uses device i mod len (sets --workers to at least len)")
    p.add_argument("--quiet", action="store_true", help=QUIET_HELP)


def proxy_setting(text: str) -> tuple[tuple[str, ...], object]:
    """'loss.obj=2' -> (("loss", "obj"), 2): a ProxyConfig field path and its value, read as a YAML scalar
    (yaml.safe_load: numbers, true/false, null, plain strings)."""
    import yaml

    key, sep, raw = text.partition("=")
    path = tuple(part.strip() for part in key.split("."))
    if not sep or not all(path) or len(path) > 2:
        raise argparse.ArgumentTypeError(f"{text!r}: give KEY=VALUE with a ProxyConfig field as KEY (nested once "
                                         "with a dot, e.g. loss.obj=2)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    if isinstance(value, (dict, list)):
        raise argparse.ArgumentTypeError(f"{text!r}: the value must be a number, true/false, null or a word")
    return path, value


def proxy_changes(args: argparse.Namespace) -> dict:
    """The proxy settings `search`/`resume` options give: --epochs/--imgsz/--batch/--val-every and --proxy KEY=VALUE
    (nested dict; a key given twice is a usage error)."""
    given = (("epochs", args.epochs), ("imgsz", args.imgsz), ("batch", args.batch), ("val_every", args.val_every))
    proxy: dict = {k: v for k, v in given if v is not None}
    for path, value in getattr(args, "proxy", None) or []:
        node = proxy
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UsageError(f"--proxy {'.'.join(path)}: {part} is not a group of settings")
        if path[-1] in node:
            raise UsageError(f"--proxy {'.'.join(path)}={value}: that proxy setting is given twice; give it once")
        node[path[-1]] = value
    return proxy


def study_settings(args: argparse.Namespace):
    """The StudySettings the options of `search`/`resume` give (None: not given, the stored value or the default)."""
    from nas.study import StudySettings

    proxy = proxy_changes(args)
    return StudySettings(
        name=args.study, storage=args.storage, data=args.data, space=args.space, trials=args.trials, seed=args.seed,
        sampler=args.sampler, proxy=proxy or None, latency_imgsz=args.latency_imgsz,
        latency_batch=args.latency_batch, device=args.device,
        latency={"backend": args.latency_backend} if args.latency_backend else None, baseline=args.baseline,
        max_failures=args.max_failures, max_latency_ms=args.max_latency_ms, max_latency_ratio=args.max_latency_ratio,
        early_stop=None if args.early_stop is None else {"enabled": args.early_stop},
        keep_weights=args.keep_weights, artifacts=args.artifacts, stale_after=args.stale_after,
        prune_to=args.prune_to, prune_to_latency=args.prune_to_latency,
        prune_finetune_epochs=args.prune_finetune_epochs, results=args.results, quiet=args.quiet,
    )


def setup_logging(quiet: bool = False) -> None:
    """Log lines (the library's progress and warnings) as plain messages on stderr; --quiet: warnings only."""
    import logging

    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s", stream=sys.stderr)


def data_path(data: str | None) -> Path:
    """--data, else the built-in synthetic dataset (generated on first use), said on stderr."""
    from nas.synth import default_dataset

    if data:
        return Path(data)
    path = default_dataset()
    print(f"no --data: using the built-in synthetic dataset {path}", file=sys.stderr)
    return path


def default_out(folder: Path, name: str) -> Path:
    """FOLDER/STEM, or STEM-2, STEM-3... when taken; STEM: `name`'s stem as one plain folder name (never '', '.')."""
    base = folder / (Path(name).stem.strip(". ") or "model")
    out, k = base, 2
    while out.exists():
        out, k = base.with_name(f"{base.name}-{k}"), k + 1
    return out
