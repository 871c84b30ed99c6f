import subprocess
import sys

import pytest
import yaml

from nas.cli import main
from space.builder import build_model


def test_build_prints_the_seed_table_and_totals(seed_yaml, capsys):
    assert main(["build", str(seed_yaml)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["from", "n", "params", "module", "arguments"]
    assert lines[1].split()[:5] == ["0", "-1", "1", "2,176", "RepVGGBlock"]
    assert "13" in lines[7].split() and "8,539,648" in lines[7]  # the 13-block P4 row
    assert lines[23].split()[1:5] == ["[15,", "18,", "21]", "1"]
    assert (f"{seed_yaml}: 23 layers, 13,906,045 parameters, 47.8 GFLOPs as built; deployed (fused) 12,798,333 "
            "parameters, 43.2 GFLOPs (at 640x640, nc=80)") in out


def test_build_with_nc_and_imgsz(seed_yaml, capsys):
    assert main(["build", str(seed_yaml), "--nc", "1", "--imgsz", "320"]) == 0
    assert "GFLOPs (at 320x320, nc=1)" in capsys.readouterr().out


def test_space_sample_writes_yamls_that_build(tmp_path, capsys):
    assert main(["space", "sample", "--n", "3", "--seed", "7", "--out", str(tmp_path), "--nc", "2"]) == 0
    files = sorted(tmp_path.glob("*.yaml"))
    assert [f.name for f in files] == ["arch_000.yaml", "arch_001.yaml", "arch_002.yaml"]
    for f in files:
        cfg = yaml.safe_load(f.read_text())
        assert cfg["nc"] == 2
        build_model(f, device="meta")
    assert f"wrote 3 model YAMLs to {tmp_path}" in capsys.readouterr().out
    again = tmp_path / "again"
    main(["space", "sample", "--n", "3", "--seed", "7", "--out", str(again), "--nc", "2"])
    assert [p.read_text() for p in sorted(again.glob("*.yaml"))] == [p.read_text() for p in files]  # seeded


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["build", "missing.yaml"], "repnas build: error: missing.yaml: no such file; check the path"),
        (["build", "x.yaml", "--imgsz", "100"], "argument --imgsz: 100 must be a multiple of 32"),
        (["build", "x.yaml", "--nc", "-3"], "argument --nc: -3 must be >= 1"),
        (["space", "sample", "--n", "0", "--out", "o"], "argument --n: 0 must be >= 1"),
        (["space", "sample", "--out", "o", "--space", "nope.yaml"],
         "repnas space: error: nope.yaml: no such file; check the path"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and message in err


def test_bad_model_yaml_is_one_line(tmp_path, capsys):
    path = tmp_path / "m.yaml"
    path.write_text("nc: 3\nanchors: 3\nbackbone: [[-1, 1, Foo, [16]]]\nhead: []\n")
    assert main(["build", str(path)]) == 2
    err = capsys.readouterr().err
    assert err == (f"repnas build: error: {path}: backbone row 0 (layer 0): field 'module': unknown module 'Foo'; "
                   "known modules: Conv, Bottleneck, C3, SPPF, Concat, SEBlock, RepVGGBlock, Detect, nn.Upsample\n")


def test_console_script_help_everywhere():
    for argv in (["--help"], ["build", "--help"], ["space", "--help"], ["space", "sample", "--help"]):
        result = subprocess.run([sys.executable, "-m", "nas.cli", *argv], capture_output=True, text=True,
                                check=False)
        assert result.returncode == 0 and "usage: repnas" in result.stdout


def test_search_proxy_option_sets_any_proxy_field_nested_with_dots():
    from nas import cli_args
    from nas.cli import make_parser

    args = make_parser().parse_args(["search", "--epochs", "3", "--proxy", "fraction=0.5", "loss.obj=2",
                                     "obj_ref_imgsz=160", "augment.mosaic=0.5", "optimizer=SGD", "seed=1"])
    assert cli_args.proxy_changes(args) == {"epochs": 3, "fraction": 0.5, "loss": {"obj": 2},
                                            "obj_ref_imgsz": 160, "augment": {"mosaic": 0.5},
                                            "optimizer": "SGD", "seed": 1}
    twice = make_parser().parse_args(["search", "--epochs", "3", "--proxy", "epochs=4"])
    with pytest.raises(cli_args.UsageError, match="epochs=4: that proxy setting is given twice"):
        cli_args.proxy_changes(twice)
    for bad in ("fraction", "=1", "a.b.c=1", "loss.obj=[1, 2]"):
        with pytest.raises(SystemExit):
            make_parser().parse_args(["search", "--proxy", bad])


def test_an_unknown_proxy_setting_is_one_line_exit_2_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["search", "--study", "x", "--proxy", "bogus=1", "--trials", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bogus" in err
    assert not (tmp_path / "results" / "x").exists()
