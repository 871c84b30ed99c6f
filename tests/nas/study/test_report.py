"""What a study shows (nas/study/report.py): `repnas show` and `repnas export` of a searched study, trial records of
trial folders under --artifacts, --keep-weights and `repnas clean`."""

from __future__ import annotations

from dataclasses import replace

import yaml
from optuna.trial import TrialState

from nas.cli import main
from nas.study import load_study, run_search, show_study, trial_records
from nas.study.report import _settings_lines, proxy_summary
from nas.study.settings import resolve_settings
from tests.studyfixtures import BASELINE


def test_cli_search_then_export_and_bad_names(settings, assets, tmp_path, capsys):
    assert main(["search", "--study", "cli", "--data", str(assets["data"]), "--space", str(assets["space"]),
                 "--baseline", str(assets["baseline"]), "--trials", "1", "--epochs", "1", "--imgsz", "64",
                 "--batch", "8", "--latency-imgsz", "64", "--device", "cpu", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "trial    0 COMPLETE" in out and "study cli: 1 trials, 1 complete" in out
    assert main(["export", "cli", "--format", "md,json", "--out", str(tmp_path / "exported")]) == 0
    assert sorted(p.name for p in (tmp_path / "exported").iterdir()) == ["pareto.json", "pareto.md", "pareto.png"]
    trial = load_study("cli").trials[0].user_attrs
    screen = show_study("cli").splitlines()
    assert f"  baseline: {assets['baseline'].resolve()}" in screen
    assert "  trials: 1 to count; sampler tpe, seed 0" in screen
    assert any(line.startswith("  proxy: 1 epoch at 64 px, batch 8, AdamW lr0 0.002, validated every ")
               for line in screen)
    threads = trial["device"]["threads"]
    assert (f"  latency: 64x64 px, batch 1, torch backend, 3 warm-up + 30 timed passes in 5 rounds, interleaved with "
            f"the baseline; on CPU, {threads} thread{'' if threads == 1 else 's'} in every process") in screen
    assert any(line.startswith("  baseline latency (frozen at creation): ") and " ms median, p90 " in line
               for line in screen)
    header = screen.index("  trial mAP50-95   mAP50 measured ms objective ms  ratio   GFLOPs  arch")
    row = screen[header + 1].split()
    assert row[:6] == ["0", f"{trial['map50_95']:.4f}", f"{trial['map50']:.4f}", f"{trial['latency_measured_ms']:.3f}",
                       f"{trial['latency_ms']:.3f}", f"{trial['latency_ratio']:.3f}"]
    assert " ".join(row[7:11]) == "d1-1-1-1-1 w8-8-8-8-8 se----- h0.25x1" and row[-1] == "(baseline)"
    assert not [line for line in screen if "None" in line or "1 threads" in line or "{" in line]
    assert main(["search", "--study", "../escape"]) == 2
    assert main(["export", "a/b"]) == 2
    assert main(["export", "missing"]) == 2
    err = capsys.readouterr().err
    assert "study name '../escape' is not allowed" in err and "no study 'missing'" in err


def test_show_labels_every_setting(settings):
    lines = _settings_lines(resolve_settings(replace(settings, baseline=None, latency_batch=2), latency_threads=1))
    assert "  baseline: the space's seed design" in lines
    assert ("  latency: 64x64 px, batch 2, torch backend, 0 warm-up + 2 timed passes in 1 round, interleaved with the "
            "baseline; on CPU, 1 thread in every process") in lines
    assert proxy_summary({"epochs": 1, "imgsz": 64, "batch": 8, "fraction": 0.5, "loss": {"obj": 2.0}}) == (
        "1 epoch at 64 px, batch 8, AdamW lr0 0.002, validated every 5 epochs, seed 0; differs from the defaults in: "
        "fraction=0.5 loss.obj=2.0")
    assert proxy_summary({"epochs": 60, "val_every": 1}).startswith("60 epochs at 160 px, batch 16, AdamW lr0 0.002, "
                                                                  "validated every epoch, seed 0; every other setting")


def test_enqueue_keep_weights_clean_and_artifacts(settings, assets, tmp_path, capsys):
    known = dict(BASELINE, P3_width=16, P4_width=16)
    path = tmp_path / "known.yaml"
    path.write_text(yaml.safe_dump(known))
    shared = tmp_path / "shared"
    study = run_search(replace(settings, trials=3, keep_weights=0, artifacts=str(shared)), enqueue=[str(path)])
    assert study.trials[1].user_attrs["arch"] == known and study.trials[1].user_attrs["enqueued"] is True
    front = {t.number for t in study.best_trials}
    for t in study.trials:
        if t.state == TrialState.COMPLETE:
            assert (shared / "tiny" / str(t.number) / "model.yaml").is_file()
            assert (shared / "tiny" / str(t.number) / "weights.pt").is_file() == (t.number in front)
    records = trial_records(study, replace(settings, artifacts=str(shared)))
    assert (tmp_path / "results/tiny" / records[0].yaml_path).resolve() == shared / "tiny/0/model.yaml"
    assert main(["clean", "tiny", "--keep-weights", "5"]) == 0
    assert "removed 0 weight files" in capsys.readouterr().out
