"""Add the design document's RepVGG block to an installed PyPI `yolov5` package, as the document instructs a
checkout: the block's classes appended to models/common.py and `RepVGGBlock` added to the module set of
models/yolo.py's `parse_model` (the set whose rows get their input channels prepended and widths scaled).

Optionally also lay out a checkout-shaped copy of the patched package (`--checkout DIR`): the same files with the
package's `yolov5.` import prefix removed, so `models.yolo` is the import root, `python val.py` runs from DIR as in
a clone of ultralytics/yolov5. Nothing of YOLOv5 is kept in this repository (it is AGPL): both are made here, from
the installed package, at build time.

    python patch_yolov5.py --block ../shared/reference/seed_repvgg_block.py [--checkout DIR]

Run it with the Python of the environment that holds the package (it finds the package without importing it).
Patching twice changes nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import shutil
import sys
from pathlib import Path

MARK = "# --- RepVGGBlock of the repnas design document (added by repnas tests/yolov5env/patch_yolov5.py) ---"
SET_HEAD = "        if m in {\n                Conv, GhostConv,"


def block_source(path: Path) -> str:
    """The reference module's code less its docstring and imports (common.py imports numpy, torch and nn)."""
    text = path.read_text(encoding="utf-8")
    body = re.sub(r'^\s*""".*?"""\s*', "", text, count=1, flags=re.S)
    lines = [line for line in body.splitlines() if not line.startswith(("import ", "from "))]
    code = "\n".join(lines).strip()
    if "class RepVGGBlock" not in code:
        raise SystemExit(f"{path}: no class RepVGGBlock in it; give the design document's block file")
    return code


def patch(package: Path, block: str) -> list[str]:
    """Patch models/common.py and models/yolo.py under `package`; returns what was changed."""
    done = []
    common = package / "models" / "common.py"
    text = common.read_text(encoding="utf-8")
    if MARK not in text:
        for name in ("class RepVGGBlock", "class SEBlock", "def conv_bn"):
            if name in text:
                raise SystemExit(f"{common}: already defines {name.split()[1]} (another patch?); start from a clean "
                                 "install")
        common.write_text(f"{text.rstrip()}\n\n\n{MARK}\n{block}\n", encoding="utf-8")
        done.append(f"{common}: RepVGGBlock, SEBlock, conv_bn appended")
    yolo = package / "models" / "yolo.py"
    text = yolo.read_text(encoding="utf-8")
    if "RepVGGBlock" not in text:
        if text.count(SET_HEAD) != 1:
            raise SystemExit(f"{yolo}: parse_model's module set is not where YOLOv5 7.0 has it; patch it by hand")
        yolo.write_text(text.replace(SET_HEAD, SET_HEAD.replace("Conv, GhostConv,", "Conv, RepVGGBlock, GhostConv,")),
                        encoding="utf-8")
        done.append(f"{yolo}: RepVGGBlock added to parse_model's channel-module set")
    return done


def lay_checkout(package: Path, out: Path) -> int:
    """Copy `package` to `out` with `from yolov5.X`/`import yolov5.X` made `from X`/`import X`; returns files
    rewritten."""
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(package, out, ignore=shutil.ignore_patterns("__pycache__"))
    rewritten = 0
    for path in out.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        new = re.sub(r"^(\s*)(from|import) yolov5\.", r"\1\2 ", text, flags=re.M)
        if new != text:
            path.write_text(new, encoding="utf-8")
            rewritten += 1
    (out / "__init__.py").unlink(missing_ok=True)  # a checkout's root is not a package
    return rewritten


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--block", required=True, type=Path, help="the design document's block (seed_repvgg_block.py)")
    p.add_argument("--checkout", type=Path, help="also lay out a checkout-shaped copy of the patched package here")
    args = p.parse_args(argv)
    spec = importlib.util.find_spec("yolov5")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{sys.executable}: no `yolov5` package installed; pip install yolov5==7.0.14 first")
    package = Path(next(iter(spec.submodule_search_locations)))
    for line in patch(package, block_source(args.block)) or [f"{package}: already patched"]:
        print(line)
    if args.checkout:
        n = lay_checkout(package, args.checkout)
        print(f"{args.checkout}: checkout-shaped copy ({n} files' imports rewritten to the `models.` root)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
