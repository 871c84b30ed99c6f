"""Malformed model and space YAMLs through the real CLI: one stderr line naming file, field, value and fix; exit 2;
nothing written.

A rule that concerns the file itself (encoding, syntax, aliases, size) counts once however many commands check it.

Model YAMLs go through `repnas build X.yaml` and (the file-level rules and the layout rules) `repnas search
--baseline X.yaml`; space YAMLs through `repnas search --space X.yaml` and `repnas space sample --space X.yaml`.
Every case checks that no study folder, study.log or sample folder appeared and that no file under the test's
folder changed.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from tests.conftest import tiny_yaml
from tests.reliability.badinput import record_rule, refusal, tree
from tests.studyfixtures import BASELINE, TINY_SPACE, make_tiny_assets

BAD = "bad.yaml"


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    """A good space, baseline and 16-image dataset for the `repnas search` runs (each refused before any work)."""
    root = tmp_path_factory.mktemp("bad-yaml-assets")
    return make_tiny_assets(root) | {"cache": root / "cache"}


@pytest.fixture
def work(tmp_path, monkeypatch, assets) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("REPNAS_CACHE_DIR", str(assets["cache"]))
    return tmp_path


def _write(where: Path, content: bytes | str | dict) -> None:
    if isinstance(content, dict):
        content = yaml.safe_dump(content, sort_keys=False)
    if isinstance(content, str):
        content = content.encode()
    (where / BAD).write_bytes(content)


def _row(part: str, k: int, row: list, **top) -> dict:
    cfg = tiny_yaml(2)
    cfg[part][k] = row
    cfg.update(top)
    return cfg


def _text_with(cfg: dict, **lines: str) -> str:
    """`cfg` dumped, then top-level `key: raw-text` lines appended (for values safe_dump cannot write)."""
    text = yaml.safe_dump({k: v for k, v in cfg.items() if k not in lines}, sort_keys=False)
    return text + "".join(f"{key}: {raw}\n" for key, raw in lines.items())


BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(8)
)  # 10^9 leaves once expanded: only the counting walk can refuse it without hanging

# Rules whose cause is the file itself: the same refusal for a model YAML, a space YAML and a baseline.
FILE_RULES = {
    "non-UTF-8 bytes": (b"nc: 2\n# caf\xe9\n", ["not UTF-8 text (byte 0xe9 at offset 11)", "save the file as UTF-8"]),
    "alias bomb": (BOMB, ["YAML expands to more than 200,000 nodes (an alias bomb?)",
                          "write the data out plainly without nested aliases"]),
    "recursive alias": ("a: &a [1, *a]\n", ["recursive YAML alias (a node contains itself)", "write the data out"]),
    "YAML syntax error": ("nc: [2\nbackbone: x\n", ["not valid YAML at line 2, column 9", "fix the syntax"]),
    "python tag is not constructed": ("nc: !!python/object/apply:os.system ['touch PWNED']\n",
                                      ["line 1, column 5", "could not determine a constructor for the tag",
                                       "python/object/apply:os.system", "fix the syntax"]),
    "nested too deep": ("a: " + "[" * 40 + "]" * 40 + "\n", ["YAML nested deeper than 32 levels", "flatten"]),
    "file over 1 MiB": ("# " + "x" * (1 << 20) + "\n", ["1,048,579 bytes is over the 1,048,576-byte limit"]),
    "number too long": ("nc: 1" + "0" * 5000 + "\n", ["line 1: a number of 5,001 characters (10000000000",
                                                      "over the 100-character limit", "write a smaller value"]),
    "duplicate key": ("nc: 2\nnc: 3\n", ["line 2: field 'nc' is given twice", "keep one of them"]),
    "NUL character": ("nc: 2\x00\n", ["not valid YAML", "unacceptable character #x0000", "fix the syntax"]),
}


def _file_rule_cases():
    return [pytest.param(rule, *spec, id=rule) for rule, spec in FILE_RULES.items()]


MODEL_RULES = {
    "wrong type: nc a string": (dict(tiny_yaml(2), nc="three"),
                                ["field 'nc'", "'three'", "must be a positive integer up to 100,000"]),
    "wrong type: argument": (_row("backbone", 1, [-1, 1, "RepVGGBlock", [16, 3.5, 2]]),
                             ["backbone row 1 (layer 1), RepVGGBlock", "field 'args[1] (kernel_size)'",
                              "3.5 (float)", "expected an integer"]),
    "wrong type: row": (_row("backbone", 1, {"from": -1}),
                        ["backbone row 1 (layer 1)", "{'from': -1}", "is not a row [from, number, module, args]",
                         "fix its shape"]),
    "zero depth": (_row("backbone", 3, [-1, 0, "RepVGGBlock", [32, 3, 1]]),
                   ["backbone row 3 (layer 3), RepVGGBlock", "field 'number'", "0 must be a positive integer"]),
    "negative depth": (_row("backbone", 3, [-1, -2, "RepVGGBlock", [32, 3, 1]]),
                       ["backbone row 3 (layer 3)", "field 'number'", "-2 must be a positive integer"]),
    "zero width multiple": (dict(tiny_yaml(2), width_multiple=0),
                            ["field 'width_multiple'", "0 is not a number in (0, 16]", "fix the value"]),
    "negative channels": (_row("backbone", 2, [-1, 1, "RepVGGBlock", [-32, 3, 2]]),
                          ["field 'args[0] (out_channels)'", "-32 is outside 1..inf", "fix the value"]),
    "widths not divisible by groups": (_row("head", 0, [-1, 1, "Conv", [32, 1, 1, None, 3]]),
                                       ["head row 0 (layer 8), Conv", "groups=3 must divide in_channels=64 and "
                                        "out_channels=32", "choose widths that are multiples of groups"]),
    "forward from": (_row("head", 2, [[-1, 12], 1, "Concat", [1]]),
                     ["head row 2 (layer 10), Concat", "field 'from'", "12 points forward",
                      "a layer reads only earlier layers 0..9 or -1..-10"]),
    "cyclic from": (_row("head", 2, [[-1, 10], 1, "Concat", [1]]),
                    ["head row 2 (layer 10), Concat", "field 'from'", "10 is this layer itself (a cycle)",
                     "reads only earlier layers 0..9"]),
    "from out of range": (_row("head", 2, [[-1, -40], 1, "Concat", [1]]),
                          ["field 'from'", "-40 is out of range (only 10 earlier layers)", "use 0..9 or -1..-10"]),
    "unknown module": (_row("backbone", 2, [-1, 1, "Focus", [32, 3]]),
                       ["backbone row 2 (layer 2)", "field 'module'", "unknown module 'Focus'",
                        "known modules: Conv, Bottleneck"]),
    "string argument is never evaluated": (_row("backbone", 1, [-1, 1, "RepVGGBlock", ["__import__('os')", 3, 2]]),
                                           ["field 'args[0] (out_channels)'", "__import__('os')",
                                            "strings are never evaluated"]),
    "huge channels": (_row("backbone", 7, [-1, 1, "Conv", [10**30, 1, 1]]),
                      ["backbone row 7 (layer 7), Conv", "field 'args[0]'", "1000000000000000000000000000000 channels",
                       "over the limit of 16384"]),
    "huge repeats": (_row("backbone", 3, [-1, 10**6, "RepVGGBlock", [32, 3, 1]]),
                     ["field 'number'", "1000000 x depth_multiple 1.0", "over the limit of 256"]),
    "huge class count": (dict(tiny_yaml(2), nc=10**9),
                         ["field 'nc'", "1000000000", "must be a positive integer up to 100,000"]),
    "huge parameter count": (_row("backbone", 7, [-1, 1, "SEBlock", [64, 10**9]]),
                             ["the model would have 129,000,", "over the limit of 1,000,000,000",
                              "reduce widths, depths or the multiples"]),
    "NaN multiple": (_text_with(tiny_yaml(2), depth_multiple=".nan"),
                     ["field 'depth_multiple'", "nan is not a number in (0, 16]", "fix the value"]),
    "unknown top-level field": (dict(tiny_yaml(2), depth_multipel=0.5),
                                ["unknown top-level field 'depth_multipel'", "fix the name or remove it"]),
    "unknown activation": (dict(tiny_yaml(2), activation="os.system('x')"),
                           ["field 'activation'", "os.system('x')", "is not a known activation",
                            "use one of nn.SiLU()"]),
    "anchors malformed": (dict(tiny_yaml(2), anchors="many"),
                          ["field 'anchors'", "'many'", "must be a list of levels"]),
    "last row not Detect": (dict(tiny_yaml(2), head=tiny_yaml(2)["head"][:-1]),
                            ["the last row must be Detect", "got C3"]),
    "not a mapping": ("- [1, 2, 3]\n", ["a model YAML is a mapping with nc, anchors, backbone and head", "got list"]),
    "does not run at the input size": (_row("backbone", 0, [-1, 1, "RepVGGBlock", [16, 3, 16]]),
                                       ["--imgsz 64", "the model does not run at a 64x64 input",
                                        "use an input size that is a multiple of its largest stride 256"]),
}


def _nothing_written(work: Path, before: dict) -> None:
    assert not (work / "res").exists(), "a study folder was created"
    assert not list(work.rglob("study.log"))
    assert tree(work) == before


@pytest.mark.parametrize("rule, content, parts", [
    pytest.param(rule, content, parts, id=rule) for rule, (content, parts) in MODEL_RULES.items()
] + _file_rule_cases())
def test_bad_model_yaml_is_refused_by_build(rule, content, parts, work, capsys, reliability_report):
    _write(work, content)
    before = tree(work)
    refusal(["build", BAD, "--imgsz", "64"], capsys, [f"{BAD}: ", *parts])
    _nothing_written(work, before)
    assert not (work / "PWNED").exists()
    record_rule(f"{'YAML file' if rule in FILE_RULES else 'model YAML'}: {rule}", reliability_report)


def _search(assets, **options: str) -> list[str]:
    argv = ["search", "--study", "s", "--results", "res", "--space", str(assets["space"]), "--data",
            str(assets["data"]), "--baseline", str(assets["baseline"]), "--device", "cpu", "--trials", "1"]
    for key, value in options.items():
        argv[argv.index(f"--{key}") + 1] = value
    return argv


@pytest.mark.parametrize("rule, content, parts", _file_rule_cases())
def test_bad_baseline_file_is_refused_by_search(rule, content, parts, work, assets, capsys, reliability_report):
    _write(work, content)
    before = tree(work)
    refusal(_search(assets, baseline=BAD), capsys, [str(work / BAD), *parts])
    _nothing_written(work, before)
    record_rule(f"YAML file: {rule}", reliability_report)


def _seed_layout_yaml(part: str | None = None, k: int = 0, row: list | None = None) -> dict:
    """The model YAML the tiny space writes for BASELINE (a valid --baseline), with row `k` of `part` replaced."""
    from space.searchspace import Arch, parse_space

    cfg = Arch.from_params(BASELINE, parse_space(copy.deepcopy(TINY_SPACE))).to_yaml(2)
    if part is not None:
        cfg[part][k] = row
    return cfg


@pytest.mark.parametrize("rule, cfg, parts", [
    pytest.param("baseline model YAML of another layout", tiny_yaml(2),  # builds, but not the space's layout
                 ["not a model YAML of the RepVGG-YOLO layout", "IndexError"], id="other layout"),
    pytest.param("baseline model YAML the space cannot write",
                 _seed_layout_yaml("head", 3, [-1, 1, "C3", [72, False]]),  # builds; no head width gives 72
                 ["the nearest Arch of the space", "writes a different model", "give the baseline as Arch params"],
                 id="not written by the space"),
])
def test_baseline_model_yaml_outside_the_space_is_refused(rule, cfg, parts, work, assets, capsys,
                                                          reliability_report):
    _write(work, cfg)
    before = tree(work)
    refusal(_search(assets, baseline=BAD), capsys, [f"baseline {work / BAD}", *parts])
    _nothing_written(work, before)
    record_rule(rule, reliability_report)


def test_a_baseline_model_yaml_that_does_not_build_gets_the_builders_message(work, assets, capsys,
                                                                             reliability_report):
    _write(work, _seed_layout_yaml("head", 3, [-1, 0, "C3", [64, False]]))  # zero repeats
    before = tree(work)
    refusal(_search(assets, baseline=BAD), capsys, [f"{work / BAD}: head row 3", "C3", "field 'number'",
                                                    "0 must be a positive integer"])
    _nothing_written(work, before)
    record_rule("baseline model YAML that does not build", reliability_report)


def test_baseline_params_outside_the_space_name_the_baseline_file(work, assets, capsys, reliability_report):
    _write(work, dict(BASELINE, P1_width=24))
    before = tree(work)
    refusal(_search(assets, baseline=BAD), capsys, [f"baseline {work / BAD}", "P1_width=24", "[8, 16]"])
    _nothing_written(work, before)
    record_rule("baseline Arch params outside the space", reliability_report)


def _space(**changes) -> dict:
    space = copy.deepcopy(TINY_SPACE)
    for key, value in changes.items():
        if key in space["stages"]:
            space["stages"][key] = value
        else:
            space[key] = value
    return space


SPACE_RULES = {
    "zero depth": (_space(P3={"depth": [0, 1], "width": [8]}),
                   ["field 'stages.P3.depth'", "0 must be an integer in 1..64"]),
    "negative depth": (_space(P3={"depth": -1, "width": [8]}),
                       ["field 'stages.P3.depth'", "-1 must be an integer in 1..64", "a value or a list of choices"]),
    "wrong type: depth": (_space(P3={"depth": "two", "width": [8]}),
                          ["field 'stages.P3.depth'", "'two' must be an integer in 1..64"]),
    "huge depth": (_space(P3={"depth": 10**12, "width": [8]}),
                   ["field 'stages.P3.depth'", "1000000000000 must be an integer in 1..64"]),
    "width not a multiple of 8": (_space(P3={"depth": 1, "width": [8, 12]}),
                                  ["field 'stages.P3.width'", "12 is not a multiple of 8", "use multiples of 8"]),
    "huge width": (_space(P5={"depth": 1, "width": [10**9]}),
                   ["field 'stages.P5.width'", "1000000000 must be an integer in 8..4096"]),
    "wrong type: width": (_space(P3={"depth": 1, "width": [8.0]}),
                          ["field 'stages.P3.width'", "8.0 must be an integer in 8..4096"]),
    "wrong type: se": (_space(P3={"depth": 1, "width": [8], "se": "yes"}),
                       ["field 'stages.P3.se'", "'yes' must be true, false or [false, true]"]),
    "SE on a narrow stage": (_space(P3={"depth": 1, "width": [8], "se": True}),
                             ["field 'stages.P3.se'", "needs every width >= 32", "make se searchable or drop it"]),
    "stages missing one": ({**_space(), "stages": {k: v for k, v in _space()["stages"].items() if k != "P3"}},
                           ["field 'stages'", "['P1', 'P2', 'P4', 'P5']", "must map exactly P1, P2, P3, P4, P5"]),
    "unknown field": (_space(stagse=1), ["field 'stagse'", "is not a space field", "known: imgsz, nc, stages"]),
    "imgsz not a multiple of 32": (_space(imgsz=100), ["field 'imgsz'", "100 must be a multiple of 32 in 32..8192"]),
    "zero classes": (_space(nc=0), ["field 'nc'", "0 must be a positive integer"]),
    "negative budget": (_space(budgets={"max_params": -5}),
                        ["field 'budgets.max_params'", "-5 must be a positive number or null"]),
    "budget below the smallest Arch": (_space(budgets={"max_gflops": 1e-9}),
                                       ["field 'budgets.max_gflops'", "1e-09 is below the smallest Arch of the space",
                                        "raise it or add smaller depths/widths"]),
    "head width out of range": (_space(head={"width": [0], "depth": [1]}),
                                ["field 'head.width'", "[0] must be distinct numbers in (0, 8]"]),
    "extras range reversed": (_space(extras={"prune_fraction": {"low": 0.5, "high": 0.2}}),
                              ["field 'extras.prune_fraction'", "`low <= high` must hold", "low=0.5, high=0.2"]),
    "NaN extras bound": (_space(extras={"lr": {"low": float("nan"), "high": 1}}),
                         ["field 'extras.lr.low'", "nan must be a finite number"]),
    "empty file": ("", ["a space YAML is a mapping with stages and head", "got NoneType"]),
}


@pytest.mark.parametrize("rule, content, parts", [
    pytest.param(rule, content, parts, id=rule) for rule, (content, parts) in SPACE_RULES.items()
] + _file_rule_cases())
def test_bad_space_yaml_is_refused_by_search_and_space_sample(rule, content, parts, work, assets, capsys,
                                                              reliability_report):
    _write(work, content)
    before = tree(work)
    refusal(_search(assets, space=BAD), capsys, [f"{work / BAD}: ", *parts])
    refusal(["space", "sample", "--space", BAD, "--out", "samples", "--n", "2"], capsys, [f"{BAD}: ", *parts])
    _nothing_written(work, before)
    assert not (work / "samples").exists()
    record_rule(f"{'YAML file' if rule in FILE_RULES else 'space YAML'}: {rule}", reliability_report)


def test_missing_and_folder_yaml_paths_are_refused(work, assets, capsys, reliability_report):
    (work / "folder.yaml").mkdir()
    before = tree(work)
    refusal(["build", "nope.yaml"], capsys, ["nope.yaml: no such file; check the path"])
    refusal(["build", "folder.yaml"], capsys, ["folder.yaml: is a folder, not a YAML file",
                                               "name the .yaml file inside it"])
    refusal(_search(assets, space="nope.yaml"), capsys, ["nope.yaml: no such file; check the path"])
    refusal(_search(assets, baseline="nope.yaml"), capsys, ["nope.yaml: no such file; check the path"])
    _nothing_written(work, before)
    record_rule("YAML path missing", reliability_report)
    record_rule("YAML path is a folder", reliability_report)
