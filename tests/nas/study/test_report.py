"""What a study shows (nas/study/report.py): `repnas export` of a searched study, trial records of trial folders
under --artifacts, --keep-weights and `repnas clean`."""

from __future__ import annotations

from dataclasses import replace

import yaml
from optuna.trial import TrialState

from nas.cli import main
from nas.study import run_search, trial_records
from tests.studyfixtures import BASELINE


def test_cli_search_then_export_and_bad_names(settings, assets, tmp_path, capsys):
    assert main(["search", "--study", "cli", "--data", str(assets["data"]), "--space", str(assets["space"]),
                 "--baseline", str(assets["baseline"]), "--trials", "1", "--epochs", "1", "--imgsz", "64",
                 "--batch", "8", "--latency-imgsz", "64", "--device", "cpu", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "trial    0 COMPLETE" in out and "study cli: 1 trials, 1 complete" in out
    assert main(["export", "cli", "--format", "md,json", "--out", str(tmp_path / "exported")]) == 0
    assert sorted(p.name for p in (tmp_path / "exported").iterdir()) == ["pareto.json", "pareto.md", "pareto.png"]
    assert main(["search", "--study", "../escape"]) == 2
    assert main(["export", "a/b"]) == 2
    assert main(["export", "missing"]) == 2
    err = capsys.readouterr().err
    assert "study name '../escape' is not allowed" in err and "no study 'missing'" in err


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
