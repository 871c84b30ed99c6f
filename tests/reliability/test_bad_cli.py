"""Bad CLI values: one line on stderr naming the option, the value and the fix; exit code 2; nothing written."""

from __future__ import annotations

import pytest
import torch
import yaml

from nas.cli import main
from space.builder import build_model
from tests.conftest import tiny_yaml


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


@pytest.mark.parametrize("argv, expected", [
    (["search", "--trials", "-3"], "argument --trials: -3 must be >= 1"),
    (["search", "--trials", "0"], "argument --trials: 0 must be >= 1"),
    (["search", "--study", "a/b"], "study name 'a/b' is not allowed"),
    (["search", "--study", "../up"], "study name '../up' is not allowed"),
    (["show", "x/../../etc"], "study name 'x/../../etc' is not allowed"),
    (["search", "--study", "d", "--device", "tpu"], "device 'tpu' is not a device; use auto, cpu, cuda or cuda:N"),
    (["search", "--prune-to", "1.5"], "'1.5' is not a fraction in [0.01, 1]"),
    (["search", "--stale-after", "abc"], "'abc' is not a positive number"),
])
def test_bad_search_values(argv, expected, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    line = _run(argv, capsys)
    assert expected in line and line.startswith(f"repnas {argv[0]}: error: ")
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("target, expected", [
    ("150%", "is above 100% of the unpruned"),
    ("0.5%", "is below the 1% minimum"),
    ("1.5", "above 100%"),
    ("half", "is not a FLOPs target"),
    ("99G", "is above the unpruned model's"),
])
def test_bad_prune_targets(target, expected, model_files, capsys):
    line = _run(["prune", "tiny.yaml", "--weights", "w.pt", "--target-flops", target, "--imgsz", "64"], capsys)
    assert expected in line and f"target='{target}'" in line
    assert not (model_files / "results").exists()


def test_bad_prune_sources(model_files, capsys):
    assert "a model YAML needs --weights" in _run(["prune", "tiny.yaml", "--target-flops", "50%"], capsys)
    (model_files / "evil.pt").write_bytes(b"not a torch file")
    line = _run(["prune", "tiny.yaml", "--weights", "evil.pt", "--target-flops", "50%"], capsys)
    assert "--weights evil.pt: not a weights-only state_dict" in line
    assert "--round-to: 0 must be >= 1" in _run(["prune", "tiny.yaml", "--target-flops", "50%", "--round-to", "0"],
                                                  capsys)
