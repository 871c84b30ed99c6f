"""Security promises that hold for the whole package: no eval/exec, and YAML code is never run."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from space.builder import build_model
from space.errors import RepnasError

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("nas", "pruning", "space")
BUILTINS = ("eval", "exec", "compile", "__import__")
PICKLE = ("pickle.load", "pickle.loads", "pickle.Unpickler", "marshal.loads", "dill.load")


def _calls(tree: ast.AST) -> list[tuple[str, int]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            text = ast.unparse(f)
            # the builtins (not methods such as module.eval() or re.compile()), and pickle's loaders
            if text in BUILTINS or text in {f"builtins.{b}" for b in BUILTINS} or text in PICKLE:
                found.append((text, node.lineno))
    return found


def test_no_eval_exec_or_pickle_load_in_the_package():
    offenders = []
    files = [p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")]
    assert len(files) > 15
    for path in files:
        for name, line in _calls(ast.parse(path.read_text(), str(path))):
            offenders.append(f"{path.relative_to(REPO)}:{line}: {name}(...)")
    assert offenders == []


def test_the_scan_finds_what_it_looks_for():
    tree = ast.parse("eval('1')\nexec('x=1')\nbuiltins.__import__('os')\npickle.load(f)\nmodel.eval()\n")
    assert [name for name, _ in _calls(tree)] == ["eval", "exec", "builtins.__import__", "pickle.load"]


@pytest.mark.parametrize("module, args", [
    ("__import__('os').system('touch PWNED')", [8, 3, 1]),
    ("Conv", ["__import__('os').system('touch PWNED')", 3, 1]),
    ("nn.Module.__subclasses__", [8]),
])
def test_code_in_a_model_yaml_is_rejected_and_runs_nothing(tmp_path, monkeypatch, module, args):
    monkeypatch.chdir(tmp_path)
    cfg = {"nc": 1, "anchors": 1, "backbone": [[-1, 1, module, args]], "head": [[-1, 1, "Detect", ["nc", "anchors"]]]}
    with pytest.raises(RepnasError):
        build_model(cfg)
    assert not (tmp_path / "PWNED").exists()


def test_bad_search_input_writes_no_study(tmp_path, monkeypatch, capsys):
    from nas.cli import main

    monkeypatch.chdir(tmp_path)
    for argv in (["search", "--study", "x1", "--device", "tpu"], ["search", "--study", "x2", "--space", "nope.yaml"],
                 ["search", "--study", "x3", "--data", "missing/data.yaml"]):
        assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("repnas search: error: ") for line in err)
    assert "device 'tpu' is not a device" in err[0]
    assert not (tmp_path / "results").exists()


def _torch_loads(tree: ast.AST) -> list[tuple[int, bool]]:
    """(line, weights_only=True given) for every torch.load(...) call."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
            safe = any(kw.arg == "weights_only" and isinstance(kw.value, ast.Constant) and kw.value.value is True
                       for kw in node.keywords)
            found.append((node.lineno, safe))
    return found


def test_every_torch_load_in_the_package_is_weights_only():
    loads, unsafe = 0, []
    for path in [p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")]:
        for line, safe in _torch_loads(ast.parse(path.read_text(), str(path))):
            loads += 1
            if not safe:
                unsafe.append(f"{path.relative_to(REPO)}:{line}")
    assert loads >= 2  # nas/source.py and pruning/portable.py load weights
    assert unsafe == []
    tree = ast.parse("torch.load(f)\ntorch.load(f, weights_only=False)\ntorch.load(f, weights_only=True)\n")
    assert [safe for _, safe in _torch_loads(tree)] == [False, False, True]  # the scan tells them apart
