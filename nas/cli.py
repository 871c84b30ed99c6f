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


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


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


# ---------------------------------------------------------------------------------------------------------------


def cmd_build(args: argparse.Namespace) -> int:
    """Build a model YAML and print YOLOv5's per-layer table with params and GFLOPs (as built and deployed)."""
    from space.builder import build_model
    from space.cost import model_cost

    model = build_model(args.model, nc=args.nc, device="meta")
    cost = model_cost(model, args.imgsz)
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
