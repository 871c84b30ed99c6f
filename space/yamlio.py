"""Guarded YAML reading and YOLOv5/YOLOv7-style YAML writing.

Reading never evaluates anything (PyYAML's safe loader) and fails fast on hostile input: the file size, the
size of the document once aliases are expanded, its nesting depth, recursive aliases, over-long numbers and
duplicate keys are all checked before any Python object is built. Writing returns text; the caller decides where
it goes.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from space.errors import ConfigError

MAX_FILE_BYTES = 1 << 20  # 1 MiB: model and space YAMLs are a few KiB
MAX_EXPANDED_NODES = 200_000  # scalars + collections after alias expansion
MAX_DEPTH = 32
MAX_NUMBER_CHARS = 100  # digits of one number: far above any setting, far below Python's 4300-digit int limit
_INT_TAG, _FLOAT_TAG, _MERGE_TAG = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float", "tag:yaml.org,2002:merge"


def _line(node: yaml.Node) -> str:
    return f"line {node.start_mark.line + 1}" if node.start_mark is not None else "an unknown line"


def _check_scalar(node: yaml.ScalarNode, where: str, error: type[ConfigError]) -> None:
    """A number too long to be a setting (Python refuses to read integers past 4300 digits) fails here, named."""
    if node.tag in (_INT_TAG, _FLOAT_TAG) and len(node.value) > MAX_NUMBER_CHARS:
        raise error(f"{where}: {_line(node)}: a number of {len(node.value):,} characters ({node.value[:20]}...) is "
                    f"over the {MAX_NUMBER_CHARS}-character limit; no setting needs it, write a smaller value")


def _check_unique_keys(node: yaml.MappingNode, where: str, error: type[ConfigError]) -> None:
    """YAML says mapping keys are unique; PyYAML would keep the last silently, hiding a typo'd override."""
    seen: set[tuple[str, str]] = set()
    for key, _ in node.value:
        if isinstance(key, yaml.ScalarNode) and key.tag != _MERGE_TAG:
            ident = (key.tag, key.value)
            if ident in seen:
                raise error(f"{where}: {_line(key)}: field {key.value!r} is given twice; keep one of them")
            seen.add(ident)


def _expanded_size(root: yaml.Node, where: str, error: type[ConfigError]) -> int:
    """Node count of the document with every alias expanded, computed without expanding (memoised)."""
    sizes: dict[int, int] = {}
    depths: dict[int, int] = {}
    in_progress: set[int] = set()

    def visit(node: yaml.Node, depth: int) -> int:
        key = id(node)
        if key in in_progress:
            raise error(f"{where}: recursive YAML alias (a node contains itself); write the data out plainly")
        if depth > MAX_DEPTH:
            raise error(f"{where}: YAML nested deeper than {MAX_DEPTH} levels; flatten the document")
        if key in sizes and depths[key] >= depth:
            return sizes[key]
        if key not in sizes and isinstance(node, yaml.ScalarNode):
            _check_scalar(node, where, error)
        elif key not in sizes and isinstance(node, yaml.MappingNode):
            _check_unique_keys(node, where, error)
        in_progress.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [child for pair in node.value for child in pair]
        else:
            children = []
        for child in children:
            total += visit(child, depth + 1)
            if total > MAX_EXPANDED_NODES:
                in_progress.discard(key)
                raise error(
                    f"{where}: YAML expands to more than {MAX_EXPANDED_NODES:,} nodes (an alias bomb?); "
                    "write the data out plainly without nested aliases"
                )
        in_progress.discard(key)
        sizes[key], depths[key] = total, max(depth, depths.get(key, 0))
        return total

    return visit(root, 0)


def parse_yaml_text(text: str, where: str, error: type[ConfigError] = ConfigError) -> Any:
    """Parse YAML text safely with limits; `where` names the source in error messages, raised as `error`."""
    if len(text) > MAX_FILE_BYTES:
        raise error(f"{where}: {len(text):,} characters of YAML is over the {MAX_FILE_BYTES:,} limit")
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is None:
            return None
        _expanded_size(node, where, error)
        return yaml.load(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise error(f"{where}: not valid YAML{at}: {problem}; fix the syntax") from None
    except ConfigError:
        raise
    except RecursionError:
        raise error(f"{where}: YAML nested too deeply; flatten the document") from None
    except ValueError as err:  # a constructor's refusal (e.g. an impossible date): the file's fault
        detail = " ".join(str(err).split())[:120]
        raise error(f"{where}: a value cannot be read ({detail}); fix the value") from None


def read_yaml(path: str | Path, error: type[ConfigError] = ConfigError) -> Any:
    """Read a YAML file safely (size, alias and depth limits; UTF-8 only); failures raise `error`."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise error(f"{path}: no such file; check the path") from None
    except OSError as err:
        raise error(f"{path}: cannot read ({err.strerror}); check the path and permissions") from None
    if path.is_dir():
        raise error(f"{path}: is a folder, not a YAML file; name the .yaml file inside it")
    if size > MAX_FILE_BYTES:
        raise error(f"{path}: {size:,} bytes is over the {MAX_FILE_BYTES:,}-byte limit for a YAML file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise error(
            f"{path}: not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start}); save the file as UTF-8"
        ) from None
    return parse_yaml_text(text, str(path), error)


# ---------------------------------------------------------------------------------------------------------------
# Writing model YAMLs the way YOLOv5's and YOLOv7's own files look: flow-style rows, stride comments, activations
# written as YOLOv7 writes them (`nn.LeakyReLU(0.1)`, a plain YAML string).

_BARE_STRINGS = {"None", "nc", "anchors"}  # names YOLOv5 resolves; written unquoted as in its YAMLs
_BARE_ACTIVATION = re.compile(r"^nn\.[A-Za-z][A-Za-z0-9]*\([-+0-9.eE]*\)$")  # YOLOv7's per-row nn.LeakyReLU(0.1)


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "True" if value else "False"
    if value is None:
        return "None"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        if value in _BARE_STRINGS or _BARE_ACTIVATION.match(value):
            return value
        return "'" + value.replace("'", "''") + "'"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_scalar(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} into a model YAML")


def _row(row: list) -> str:
    src, number, module, args = row
    return f"[{_scalar(src)}, {number}, {module}, {_scalar(list(args))}]"


def format_model_yaml(cfg: dict, header: str = "", comments: dict[int, str] | None = None) -> str:
    """YOLOv5-style text for a model dict (rows in flow style, `# i-P3/8` comments from `comments`)."""
    comments = comments or {}
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    for key, value in cfg.items():
        if key in ("backbone", "head", "anchors"):
            continue
        lines.append(f"{key}: {_scalar(value)}")
    anchors = cfg.get("anchors")
    if isinstance(anchors, list):
        lines.append("anchors:")
        lines += [f"  - {_scalar(level)}" for level in anchors]
    elif anchors is not None:
        lines.append(f"anchors: {anchors}")
    index = 0
    for part in ("backbone", "head"):
        rows = cfg.get(part, [])
        lines.append(f"{part}:")
        lines.append("  # [from, number, module, args]")
        for k, row in enumerate(rows):
            opener = "  [" if k == 0 else "   "
            note = f"  # {index}-{comments[index]}" if index in comments else f"  # {index}"
            lines.append(f"{opener}{_row(row)},{note}")
            index += 1
        lines.append("  ]" if rows else "  []")
    return "\n".join(lines) + "\n"
