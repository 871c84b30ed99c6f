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


# CLI polish (#13 item 9)

def test_version_names_the_installed_version_and_the_checkout_commit(capsys):
    from importlib import metadata
    from pathlib import Path

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and out.count("\n") == 1
    assert out.startswith(f"repnas {metadata.version('repnas')} ")
    assert f"Python {sys.version.split()[0]}, torch {metadata.version('torch')}" in out
    if (Path(__file__).resolve().parents[2] / ".git").exists():
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, check=True).stdout.strip()
        assert f"(git {commit}" in out


@pytest.mark.parametrize(("argv", "hint"), [
    (["serch"], "repnas: error: argument COMMAND: invalid choice: 'serch' (choose from "),
    (["serch"], "); did you mean 'search'? (see repnas --help)"),
    (["export-modl"], "); did you mean 'export-model'? (see repnas --help)"),
    (["space", "smple"], "); did you mean 'sample'? (see repnas space --help)"),
    (["search", "--sampler", "tpee"], "); did you mean 'tpe'? (see repnas search --help)"),
])
def test_a_mistyped_command_or_choice_says_which_was_meant(argv, hint, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and hint in err


def test_nothing_close_is_not_guessed(capsys):
    with pytest.raises(SystemExit):
        main(["frobnicate"])
    assert "did you mean" not in capsys.readouterr().err


def test_resume_help_describes_its_own_name_and_stored_defaults(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["resume", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps at the terminal's width
    assert exit_.value.code == 0
    assert out.startswith("usage: repnas resume [-h]") and "NAME" in out
    assert "Continue study NAME (the same as `repnas search --study NAME`) until it holds --trials counted" in out
    assert ("NAME the study to continue: results/NAME (DIR/NAME with --results DIR), or study NAME in --storage URL"
            in out)
    for option in ("--trials TRIALS trials that count, in all", "--epochs EPOCHS proxy training epochs",
                   "--data DATA data.yaml", "--workers WORKERS worker processes"):
        assert f"{option}" in out and out.split(option, 1)[1].split("--", 1)[0].rstrip().endswith(
            "(default: the study's stored value)"), option
    assert "(default 20" not in out and "the demo" not in out  # a new study's defaults are not resume's
    assert "--results DIR root folder of study folders (default ./results)" in out


def test_a_search_says_its_disk_use_a_finished_study_says_how_to_add_trials_and_data_lines_come_once(
        assets, tmp_path, monkeypatch, capsys, caplog):
    import logging

    import nas.data

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("REPNAS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(nas.data, "_SAID", set())  # as in a fresh process
    caplog.set_level(logging.INFO)
    study = ["--data", str(assets["data"]), "--space", str(assets["space"]), "--baseline", str(assets["baseline"]),
             "--epochs", "1", "--imgsz", "64", "--latency-imgsz", "64", "--batch", "8", "--device", "cpu",
             "--sampler", "random"]
    assert main(["search", "--study", "tiny", "--trials", "1", *study]) == 0
    out = capsys.readouterr().out.splitlines()
    infos = [r.getMessage() for r in caplog.records if r.name == "repnas.data"]
    assert sum(m.startswith("train: 13 images") for m in infos) == 1  # checked, trained, evaluated: said once
    assert sum(m.startswith("val: 3 images") for m in infos) == 1
    assert sum("dataset root" in m for m in infos) == 1
    weights = sum(f.stat().st_size for f in (tmp_path / "results/tiny/trials/0").iterdir())
    from nas.files import format_bytes

    assert out[-1] == (f"trial files: {format_bytes(weights)} in results/tiny/trials (1 trial); free the weights off "
                       "the Pareto front with `repnas clean tiny --keep-weights K` (K: also keep the top-K by "
                       "mAP50-95)")
    assert main(["resume", "tiny"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "study tiny already has its 1 trial; add trials with `repnas resume tiny --trials 2`"
    assert main(["resume", "tiny", "--trials", "1", "--results", "results"]) == 0
    assert main(["search", "--study", "tiny", "--trials", "1"]) == 0
    assert capsys.readouterr().out.count("study tiny already has its 1 trial; add trials with") == 2


def test_seed_is_a_model_source_for_build_and_latency(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no file named seed here
    assert main(["build", "seed", "--nc", "1", "--imgsz", "320"]) == 0
    assert "seed: 23 layers, 13,692,982 parameters, 11.8 GFLOPs as built" in capsys.readouterr().out
    assert main(["latency", "seed", "--reference", "seed", "--imgsz", "64", "--device", "cpu", "--iters", "2"]) == 0
    assert "reference seed (fused): median" in capsys.readouterr().out
