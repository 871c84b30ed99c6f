"""`repnas prune`, `repnas val` and `repnas export-model` on trials of a tiny study: the sources they share, the
sizes they default to and say, their progress lines."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from nas.cli import main
from nas.source import SourceError, load_source
from nas.study import run_search
from pruning.portable import load_pruned


@pytest.fixture
def study(settings):
    wide = dict(settings.proxy, epochs=1)
    run_search(replace(settings, trials=2, proxy=wide))
    return settings


def test_prune_a_study_trial_writes_prune_json_and_a_loadable_model(study, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert main(["prune", "tiny:0", "--target-flops", "60%", "--round-to", "4", "--imgsz", "64",
                 "--finetune-epochs", "1", "--device", "cpu", "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "GFLOPs deploy at 64" in text and "mAP50 (after 1 fine-tuning epochs)" in text and "latency ratio" in text
    report = json.loads((out / "prune.json").read_text())
    assert report["gflops_after"] == pytest.approx(0.6 * report["gflops_before"], rel=0.02)
    assert report["params_after"] < report["params_before"]
    for key in ("map50_95_before", "map50_before", "map50_95_pruned", "map50_pruned", "map50_95_finetuned",
                "map50_finetuned"):
        assert 0 <= report[key] <= 1, key
    assert report["latency"]["latency_ratio"] > 0 and report["finetune_epochs"] == 1
    model = load_pruned(out)
    x = torch.rand(1, 3, 64, 64)
    again = load_source(str(out)).model
    assert torch.equal(model(x)[0], again(x)[0])
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return  # the ONNX test below says how to install them
    assert main(["export-model", str(out), "--onnx", str(tmp_path / "pruned.onnx"), "--imgsz", "64"]) == 0
    assert "onnxruntime vs PyTorch on a seeded batch of 2: max abs diff" in capsys.readouterr().out


def test_prune_defaults_to_the_studys_sizes_says_them_and_says_each_step(study, tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO)
    assert main(["prune", "tiny:0", "--target-flops", "60%", "--round-to", "4", "--finetune-epochs", "1",
                 "--device", "cpu", "--out", str(tmp_path / "pruned")]) == 0  # no --imgsz, no --eval-imgsz
    text = capsys.readouterr().out
    assert "GFLOPs deploy at 64 " in text and "at 64 px, achieved" in text and "; mAP at 64 px;" in text
    said = [r.getMessage() for r in caplog.records if r.name == "repnas.prune"]
    assert said[0].startswith("prune: tiny:0 (trial folder ") and said[0].endswith(
        "; GFLOPs and latency at 64 px (the size its GFLOPs and latency were recorded at; --imgsz changes it); mAP "
        "and fine-tuning at 64 px (the size it was trained at; --eval-imgsz changes it)")
    steps = ["calibration batches", "pruning ", "pruned ", "evaluating the source", "the source at 64 px: mAP50-95",
             "evaluating the pruned model", "the pruned model at 64 px: mAP50-95", "fine-tuning 1 epoch at 64 px",
             "fine-tune epoch 1/1: box", "BatchNorms folded back", "evaluating the fine-tuned model",
             "the fine-tuned model at 64 px: mAP50-95", "timing the pruned model", "latency "]
    assert len(said) == 1 + len(steps), said
    for line, step in zip(said[1:], steps):
        assert line.startswith("prune: ") and step in line, (line, step)


@pytest.mark.slow  # over 10 s (the not-slow suite aims at ~6 min on 2 cores)
def test_val_takes_every_source_at_the_size_it_was_trained_at(study, tmp_path, capsys, caplog):
    from nas.study import load_study

    trial = load_study("tiny").trials[0]
    folder = tmp_path / "results/tiny/trials/0"
    caplog.set_level(logging.INFO)
    for argv in (["tiny:0"], [str(folder)], [str(folder / "model.yaml"), "--weights", str(folder / "fused.pt")]):
        caplog.clear()
        assert main(["val", *argv, "--device", "cpu"]) == 0, argv  # no --weights required, no --data, no --imgsz
        out = capsys.readouterr().out.splitlines()
        assert out[0].split() == ["images", "boxes", "mAP50", "mAP50-95", "imgsz"]
        assert float(out[1].split()[2]) == pytest.approx(trial.user_attrs["map50"], abs=5e-5)
        assert out[1].split()[4] == "64" and out[2].startswith("evaluated at 64 px (the size it was trained at; "
                                                               "--imgsz changes it) on the val split of ")
        said = [r.getMessage() for r in caplog.records if r.name == "repnas.val"]
        assert len(said) == 2 and " at 64 px (the size it was trained at" in said[0]
        assert said[1].startswith("val: 3 images in ") and said[1].endswith(" images/s)")
    assert main(["val", "tiny:0", "--imgsz", "96", "--device", "cpu", "--quiet"]) == 0
    assert capsys.readouterr().out.splitlines()[2].startswith("evaluated at 96 px (--imgsz) on")
    for quiet in ([], ["--quiet"]):  # the console as a user sees it: progress on stderr, none with --quiet
        run = subprocess.run([sys.executable, "-m", "nas.cli", "val", "tiny:0", "--device", "cpu", *quiet],
                             capture_output=True, text=True, check=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
        said = [line for line in run.stderr.splitlines() if line.startswith(("val: tiny:0 ", "val: 3 images in "))]
        assert len(said) == (0 if quiet else 2) and (run.stderr == "" if quiet else True), run.stderr
        assert run.stdout.splitlines()[1].split()[4] == "64"


def test_val_names_a_class_count_mismatch_in_one_whole_line(study, tmp_path, capsys, monkeypatch):
    from nas.synth import SynthConfig, make_synthetic

    folder = tmp_path / "results/tiny/trials/0"
    shutil.copy(folder / "fused.pt", tmp_path / "fused.pt")  # weights away from their run: no data recorded
    four = make_synthetic(tmp_path / "four", SynthConfig(images=10, classes=4, imgsz=64))
    monkeypatch.setattr("nas.synth.default_dataset", lambda *a: four)  # the built-in set has 4 classes too
    for data in ([], ["--data", str(four)]):
        assert main(["val", str(folder / "model.yaml"), "--weights", str(tmp_path / "fused.pt"), *data]) == 2
        what = f"--data {four}" if data else f"the built-in synthetic dataset {four} (no --data given)"
        assert capsys.readouterr().err == (
            f"repnas val: error: {folder / 'model.yaml'}: the weights have nc=2, {what} has 4 classes; pass --data "
            "DATA.yaml of the 2-class dataset they were trained on\n")
    assert main(["prune", "tiny:0", "--target-flops", "50%", "--data", str(four)]) == 2
    assert "tiny:0: the weights have nc=2, --data" in capsys.readouterr().err


def test_a_weights_misfit_is_said_whole_never_cut_mid_word(study, tmp_path, capsys):
    import yaml

    folder = tmp_path / "results/tiny/trials/0"
    other = yaml.safe_load((folder / "model.yaml").read_text())
    other["backbone"][0][3][0] *= 2  # a wider stem: a model the weights do not fit
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(other))
    assert main(["val", str(tmp_path / "other.yaml"), "--weights", str(folder / "fused.pt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith("; give the YAML these weights were trained from\n"), err
    assert "torch.Siz" not in err and " tensors differ in shape (first model.0." in err


def test_export_model_onnx_matches_pytorch(study, tmp_path, capsys):
    pytest.importorskip("onnxruntime", reason="ONNX export needs the onnx extra: pip install -e '.[onnx]'")
    pytest.importorskip("onnx", reason="ONNX export needs the onnx extra: pip install -e '.[onnx]'")
    out = tmp_path / "model.onnx"
    assert main(["export-model", "tiny:1", "--onnx", str(out), "--imgsz", "64"]) == 0
    assert out.is_file() and "onnxruntime vs PyTorch on a seeded batch of 2: max abs diff" in capsys.readouterr().out


def test_bad_sources_and_targets_exit_2(study, tmp_path, capsys):
    assert main(["prune", "tiny:9", "--target-flops", "50%"]) == 2
    assert main(["prune", "tiny:0", "--target-flops", "150%"]) == 2
    assert main(["prune", "nothing-here.yaml", "--target-flops", "50%"]) == 2
    err = capsys.readouterr().err
    assert "tiny:9: study 'tiny' has trials 0..1" in err and "above 100%" in err
    assert "no such study trial, folder or model YAML" in err
    folder = tmp_path / "results/tiny/trials/0"
    (folder / "fused.pt").write_bytes((folder / "fused.pt").read_bytes() + b"x")  # damaged after the study
    with pytest.raises(SourceError, match=r"sha256 .* differs from the .* recorded by the study"):
        load_source("tiny:0")


def test_target_below_what_grouped_convs_allow_exits_2_naming_them(tmp_path, monkeypatch, capsys):
    import yaml

    from pruning.reparam import fuse_model
    from space.builder import build_model
    from tests.pruning.test_channel import grouped_yaml

    monkeypatch.chdir(tmp_path)
    (tmp_path / "grouped.yaml").write_text(yaml.safe_dump(grouped_yaml(nc=2)))
    torch.manual_seed(0)
    torch.save(fuse_model(build_model(grouped_yaml(nc=2))).state_dict(), tmp_path / "fused.pt")
    assert main(["prune", "grouped.yaml", "--weights", "fused.pt", "--target-flops", "20%", "--imgsz", "64",
                 "--importance", "l2", "--no-eval", "--device", "cpu", "--out", "out", "--quiet"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("repnas prune: error: target='20%' ("), lines
    assert "below the smallest reachable" in lines[0] and "deploy GFLOPs" in lines[0]
    assert "grouped convolutions are never pruned" in lines[0] and "model.2.rbr_reparam" in lines[0]
    assert "Traceback" not in captured.err and not (tmp_path / "out").exists()


def test_an_unreachable_target_fails_before_any_evaluation(monkeypatch):
    from nas import prune
    from pruning.channel import PruneError
    from pruning.reparam import fuse_model
    from space.builder import build_model
    from tests.pruning.test_channel import grouped_yaml

    evaluated = []
    monkeypatch.setattr(prune, "_map", lambda *a: evaluated.append(a) or (0.0, 0.0))
    model = fuse_model(build_model(grouped_yaml(nc=2)))
    with pytest.raises(PruneError, match="grouped convolutions are never pruned"):
        prune.prune_job(model, object(), "20%", imgsz=64, importance="l2", device="cpu", measure=False)
    assert evaluated == []


def test_search_with_prune_to_ranks_pruned_models(settings, tmp_path):
    from nas.pareto import pareto_table
    from nas.study import trial_records

    study = run_search(replace(settings, trials=2, prune_to=0.6, prune_finetune_epochs=1,
                               space=str(_wide_space(tmp_path)), baseline=str(tmp_path / "wide-base.yaml")))
    pruned = [t for t in study.trials if t.user_attrs.get("prune_fraction")]
    assert pruned and not study.trials[0].user_attrs.get("prune_fraction")  # the baseline stays as designed
    for t in pruned:
        a = t.user_attrs
        assert a["gflops_deploy"] == pytest.approx(0.6 * a["gflops_deploy_unpruned"], rel=0.02)
        assert {"pruned/channels.json", "pruned/weights.pt"} <= set(a["files"])
        assert a["prune"]["map50_95_finetuned"] == a["map50_95"] == t.values[0]
        model = load_pruned(tmp_path / "results/tiny/trials" / str(t.number) / "pruned")
        assert model(torch.rand(1, 3, 64, 64))[0].shape[-1] == 5 + 2
    table = pareto_table(trial_records(study, settings))
    assert sorted(table["pruned"].dropna().tolist()) == [0.6] * len(pruned)


def _wide_space(tmp_path):
    """The tiny space with widths 16|32, so that a 60% FLOPs target leaves channel multiples of 8 to cut."""
    import yaml

    from tests.nas.conftest import BASELINE, TINY_SPACE

    space = dict(TINY_SPACE, stages={n: {"depth": [1], "width": [16, 32], "se": False} for n in TINY_SPACE["stages"]})
    path = tmp_path / "wide.yaml"
    path.write_text(yaml.safe_dump(space))
    base = {k: (16 if k.endswith("_width") and k.startswith("P") else v) for k, v in BASELINE.items()}
    (tmp_path / "wide-base.yaml").write_text(yaml.safe_dump(base))
    return path


def _affine_timer(monkeypatch, overhead=0.2, source_ms=10.0):
    """nas.prune's timer replaced by a latency model of FLOPs with a fixed overhead (real timings of a tiny model on
    a busy CPU are launch overhead and noise; the search on real timings is benchmarks/prune_latency.py's)."""
    import nas.prune
    from nas.latency import Latency
    from space.cost import count_gflops

    def measure(model, imgsz, batch=1, device="cpu", cfg=None, *, reference=None):
        ms = source_ms * (overhead + (1 - overhead) * count_gflops(model, imgsz) / full[0]) if full else source_ms
        ref = None if reference is None else source_ms
        return Latency(ms, ms, ms, 0.0, 1, (imgsz, imgsz), batch, {"type": "cpu", "name": "fake"},
                       reference_median_ms=ref, latency_ratio=None if ref is None else ms / ref)

    full: list[float] = []
    real_job = nas.prune.prune_job

    def job(model, *args, **kwargs):
        full.append(count_gflops(model, kwargs["imgsz"]))
        return real_job(model, *args, **kwargs)

    monkeypatch.setattr(nas.prune, "measure_latency", measure)
    monkeypatch.setattr(nas.prune, "prune_job", job)


@pytest.mark.parametrize("target, ratio", [("0.6x", 0.6), ("6ms", 0.6)])
def test_prune_to_a_latency_target_from_the_cli_reports_the_independent_check(study, tmp_path, capsys, monkeypatch,
                                                                              target, ratio):
    _affine_timer(monkeypatch)
    out = tmp_path / "pruned"
    assert main(["prune", "tiny:0", "--target-latency", target, "--importance", "l2", "--round-to", "4", "--imgsz",
                 "64", "--device", "cpu", "--no-eval", "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert f"latency target {target} = ratio {ratio:.3f} at 64 px" in text and "independent check, median of 3" in text
    report = json.loads((out / "prune.json").read_text())
    record = report["latency_target"]
    assert record["target_ratio"] == pytest.approx(ratio) and len(record["check_ratios"]) == 3
    assert record["check_median"] == sorted(record["check_ratios"])[1]
    assert record["within"] and abs(record["check_median"] / ratio - 1) <= 0.03
    # with 20% overhead, 0.6x of the latency needs half the FLOPs, not 0.6 of them
    assert record["fraction"] == pytest.approx(0.5, abs=0.05) and report["gflops_after"] < report["gflops_before"]
    assert report["target"] == target


def test_prune_takes_one_target_and_a_bad_latency_target_exits_2(study, tmp_path, capsys, monkeypatch):
    assert main(["prune", "tiny:0", "--target-latency", "2x", "--device", "cpu", "--no-eval"]) == 2
    err = capsys.readouterr().err
    assert "latency target '2x'" in err and len(err.strip().splitlines()) == 1
    _affine_timer(monkeypatch, source_ms=10.0)
    assert main(["prune", "tiny:0", "--target-latency", "12ms", "--device", "cpu", "--no-eval", "--imgsz", "64"]) == 2
    assert "already measures 10.000 ms" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["prune", "tiny:0", "--target-latency", "0.5x", "--target-flops", "50%"])
    assert exit_.value.code == 2


def test_search_with_prune_to_latency_ranks_each_candidate_pruned_to_its_latency_target(settings, tmp_path,
                                                                                       monkeypatch):
    import nas.study.trial as trial_mod
    from nas.latency import Latency
    from space.cost import count_gflops

    def affine(network, study_settings, reference):  # ratio = 0.2 + 0.8 x FLOPs ratio: exact, machine-independent
        ratio = 0.2 + 0.8 * count_gflops(network, 64) / count_gflops(reference, 64)
        return Latency(ratio, ratio, ratio, 0.0, 1, (64, 64), 1, "float32", {"type": "cpu", "name": "fake",
                       "threads": 1}, reference_median_ms=1.0, latency_ratio=ratio)

    monkeypatch.setattr(trial_mod, "time_latency", affine)
    study = run_search(replace(settings, trials=2, prune_to_latency=0.6, prune_finetune_epochs=1,
                               space=str(_wide_space(tmp_path)), baseline=str(tmp_path / "wide-base.yaml")))
    pruned = [t for t in study.trials if t.user_attrs.get("prune_latency_target")]
    assert pruned and not study.trials[0].user_attrs.get("prune_fraction")  # the baseline stays as designed
    for t in pruned:
        a = t.user_attrs
        assert a["prune_latency_target"] == 0.6 and a["prune_latency_search"]
        assert abs(a["prune_latency_search"][-1][2] / 0.6 - 1) <= 0.015 or len(a["prune_latency_search"]) == 8
        # with 20% overhead, 0.6x of a candidate's latency is half its FLOPs, not 0.6 of them
        assert a["prune_fraction"] == pytest.approx(0.5, abs=0.05)
        assert a["gflops_deploy"] == pytest.approx(a["prune_fraction"] * a["gflops_deploy_unpruned"], rel=0.02)
        assert {"pruned/channels.json", "pruned/weights.pt"} <= set(a["files"])


def test_search_takes_one_pruning_target_and_a_latency_ratio(settings, tmp_path, capsys):
    assert main(["search", "--study", "x", "--prune-to", "0.5", "--prune-to-latency", "0.6x", "--quiet"]) == 2
    assert "give one pruning target" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["search", "--study", "x", "--prune-to-latency", "35ms"])
    assert exit_.value.code == 2
    assert "a ratio of its own measured latency" in capsys.readouterr().err
