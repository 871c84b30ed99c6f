"""Bad CLI values: one line on stderr naming the option, the value and the fix; exit code 2; nothing written."""

from __future__ import annotations

import pytest
import torch
import yaml

from nas.cli import main
from space.builder import build_model
from tests.conftest import tiny_yaml
from tests.reliability.badinput import record_rule


def _run(argv: list[str], capsys) -> str:
    try:
        code = main(argv)
    except SystemExit as exit_info:  # argparse's own refusals
        code = exit_info.code
    assert code == 2, argv
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.fixture
def model_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = tiny_yaml(3)
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    torch.save(build_model(cfg).state_dict(), tmp_path / "w.pt")
    return tmp_path


@pytest.mark.parametrize("rule, argv, expected", [
    ("--trials negative", ["search", "--trials", "-3"], "argument --trials: -3 must be >= 1"),
    ("--trials zero", ["search", "--trials", "0"], "argument --trials: 0 must be >= 1"),
    ("study name with '/'", ["search", "--study", "a/b"], "study name 'a/b' is not allowed"),
    ("study name with '..'", ["search", "--study", "../up"], "study name '../up' is not allowed"),
    ("study name with '/' (show)", ["show", "x/../../etc"], "study name 'x/../../etc' is not allowed"),
    ("unknown device", ["search", "--study", "d", "--device", "tpu"],
     "device 'tpu' is not a device; use auto, cpu, cuda or cuda:N"),
    ("--prune-to above 1", ["search", "--prune-to", "1.5"], "'1.5' is not a fraction in [0.01, 1]"),
    ("--stale-after not a number", ["search", "--stale-after", "abc"], "'abc' is not a positive number"),
])
def test_bad_search_values(rule, argv, expected, tmp_path, monkeypatch, capsys, reliability_report):
    monkeypatch.chdir(tmp_path)
    line = _run(argv, capsys)
    assert expected in line and line.startswith(f"repnas {argv[0]}: error: ")
    assert not (tmp_path / "results").exists()
    record_rule(f"CLI: {rule}", reliability_report)


@pytest.mark.parametrize("rule, target, expected", [
    ("--target-flops above 100%", "150%", "is above 100% of the unpruned"),
    ("--target-flops below 1%", "0.5%", "is below the 1% minimum"),
    ("--target-flops above 100%", "1.5", "above 100%"),
    ("--target-flops not a target", "half", "is not a FLOPs target"),
    ("--target-flops above the model's GFLOPs", "99G", "is above the unpruned model's"),
])
def test_bad_prune_targets(rule, target, expected, model_files, capsys, reliability_report):
    line = _run(["prune", "tiny.yaml", "--weights", "w.pt", "--target-flops", target, "--imgsz", "64"], capsys)
    assert expected in line and f"target='{target}'" in line
    assert not (model_files / "results").exists()
    record_rule(f"CLI: {rule}", reliability_report)


def test_bad_prune_sources(model_files, capsys, reliability_report):
    assert "a model YAML needs --weights" in _run(["prune", "tiny.yaml", "--target-flops", "50%"], capsys)
    record_rule("CLI: model YAML source without --weights", reliability_report)
    (model_files / "evil.pt").write_bytes(b"not a torch file")
    line = _run(["prune", "tiny.yaml", "--weights", "evil.pt", "--target-flops", "50%"], capsys)
    assert "--weights evil.pt: not a weights-only state_dict" in line
    record_rule("CLI: --weights not a weights-only state_dict", reliability_report)
    assert "--round-to: 0 must be >= 1" in _run(["prune", "tiny.yaml", "--target-flops", "50%", "--round-to", "0"],
                                                  capsys)
    record_rule("CLI: --round-to zero", reliability_report)
