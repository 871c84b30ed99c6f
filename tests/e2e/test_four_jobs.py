"""The four user jobs end to end through the CLI, on the tiny study's data (tests/studyfixtures.py): search a study,
export its Pareto table, prune one of its trials, resume it for one more trial."""

from __future__ import annotations

import csv
import json

import pytest
from optuna.trial import TrialState

from nas.cli import main
from nas.study import counts, load_study
from pruning.portable import load_pruned
from space.cost import count_gflops
from tests.studyfixtures import make_tiny_assets

TRIAL_FILES = {"model.yaml", "weights.pt", "fused.pt", "epochs.csv", "metrics.json", "trial.log"}


@pytest.mark.slow
def test_search_export_prune_resume(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("REPNAS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    assets = make_tiny_assets(tmp_path / "assets")
    results = tmp_path / "results"
    where = ["--results", str(results)]

    # 1. search: a new study of 2 trials (the baseline first), 1 epoch at 64 px
    assert main(["search", "--study", "e2e", *where, "--data", str(assets["data"]), "--space", str(assets["space"]),
                 "--baseline", str(assets["baseline"]), "--trials", "2", "--epochs", "1", "--imgsz", "64",
                 "--batch", "8", "--latency-imgsz", "64", "--device", "cpu", "--sampler", "random", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "trial    0 COMPLETE" in out and "study e2e: " in out
    study = load_study("e2e", results=str(results))
    searched = {t.number: t.values for t in study.trials if counts(t)}
    assert len(searched) == 2 and study.trials[0].user_attrs["baseline"] is True
    for t in study.trials:
        if t.state == TrialState.COMPLETE:
            assert set(t.user_attrs["files"]) == TRIAL_FILES
            assert {p.name for p in (results / "e2e" / "trials" / str(t.number)).iterdir()} == TRIAL_FILES
    assert {p.name for p in (results / "e2e").glob("pareto.*")} == {f"pareto.{e}" for e in
                                                                   ("md", "csv", "html", "json", "png")}

    # 2. export: the Pareto table as md and csv (and the plot) into a folder of one's choice
    assert main(["export", "e2e", *where, "--format", "md,csv", "--out", "exported"]) == 0
    assert sorted(p.name for p in (tmp_path / "exported").iterdir()) == ["pareto.csv", "pareto.md", "pareto.png"]
    with open(tmp_path / "exported" / "pareto.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(int(r["trial"]) for r in rows) == sorted(t.number for t in study.trials
                                                         if t.state == TrialState.COMPLETE)
    assert "| " in (tmp_path / "exported" / "pareto.md").read_text()

    # 3. prune: trial 0 of the study to half its deploy FLOPs, fine-tuned one epoch
    assert main(["prune", "e2e:0", *where, "--target-flops", "50%", "--imgsz", "64", "--finetune-epochs", "1",
                 "--round-to", "4", "--device", "cpu", "--out", "pruned", "--quiet"]) == 0
    report = json.loads((tmp_path / "pruned" / "prune.json").read_text())
    assert report["gflops_after"] < report["gflops_before"] and report["params_after"] < report["params_before"]
    assert report["finetune_epochs"] == 1 and 0 <= report["map50_95_finetuned"] <= 1
    pruned = load_pruned(tmp_path / "pruned")
    assert count_gflops(pruned, 64) == pytest.approx(report["gflops_after"])

    # 4. resume: the stored settings, one more counted trial; the searched trials are kept as they were
    assert main(["resume", "e2e", *where, "--trials", "3", "--quiet"]) == 0
    resumed = load_study("e2e", results=str(results))
    assert sum(counts(t) for t in resumed.trials) == 3
    assert {n: resumed.trials[n].values for n in searched} == searched
    assert not [t for t in resumed.trials if t.state == TrialState.RUNNING]
    exported = json.loads((results / "e2e" / "pareto.json").read_text())
    assert exported["header"]["n_trials"] == sum(t.state == TrialState.COMPLETE for t in resumed.trials)
