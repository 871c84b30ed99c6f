"""The search study: tiny space (widths 8|16), 16 synthetic images at 64 px, one epoch per trial."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

import nas.study
from nas.cli import main
from nas.study import SearchStopped, StudyError, StudySettings, counts, host_id, recover_stale_trials, run_search
from nas.train import TrainingDiverged
from space.searchspace import Arch, arch_cost, load_space
from tests.nas.conftest import BASELINE, TINY_SPACE


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _states(study: optuna.Study) -> list[str]:
    return [t.state.name for t in study.trials]


def test_three_trials_complete_with_baseline_files_and_pareto(settings, tmp_path):
    lines: list[str] = []
    study = run_search(settings, report=lines.append)
    assert sum(counts(t) for t in study.trials) == 3
    assert study.trials[0].user_attrs["baseline"] is True
    assert study.trials[0].user_attrs["arch"] == BASELINE
    assert study.user_attrs["baseline_latency_ms"] > 0
    folder = tmp_path / "results" / "tiny"
    assert (folder / "study.log").is_file()
    for t in study.trials:
        if t.state != TrialState.COMPLETE:
            continue
        files = t.user_attrs["files"]
        assert set(files) == {"model.yaml", "weights.pt", "fused.pt", "epochs.csv", "metrics.json", "trial.log"}
        for entry in files.values():
            assert _sha(folder / "trials" / entry["path"]) == entry["sha256"]
        assert t.values[1] == pytest.approx(t.user_attrs["latency_ratio"] * study.user_attrs["baseline_latency_ms"])
        assert t.constraints == {"budget": 0.0} and t.user_attrs["fusion_error"] < 1e-4
        assert set(t.user_attrs["seconds"]) == {"build", "latency", "train", "fuse", "eval"}
    for ext in ("md", "csv", "html", "json", "png"):
        assert (folder / f"pareto.{ext}").is_file()
    assert len(lines) == len(study.trials) and lines[0].startswith("trial    0 COMPLETE")

    before = len(study.trials)
    again = run_search(StudySettings(name="tiny", trials=4))  # stored settings reused: exactly one more counts
    assert sum(counts(t) for t in again.trials) == 4
    assert len([t for t in again.trials if t.number >= before and counts(t)]) == 1


def test_stale_running_trial_is_failed_and_requeued(settings):
    run_search(replace(settings, trials=1))
    study = optuna.load_study(study_name="tiny", storage=nas.study.storage_for(settings))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    trial = study.ask({"P1_width": optuna.distributions.CategoricalDistribution([8, 16])})
    arch = dict(BASELINE, P1_width=16)
    trial.set_user_attr("arch", arch)
    trial.set_user_attr("host", host_id())
    trial.set_user_attr("pid", dead.pid)
    alive = study.ask()
    alive.set_user_attr("host", host_id())
    alive.set_user_attr("pid", os.getpid())

    assert recover_stale_trials(study) == [trial.number]
    frozen = study.trials[trial.number]
    assert frozen.state == TrialState.FAIL and frozen.user_attrs["fail_reason"] == "stale: worker died"
    assert study.trials[alive.number].state == TrialState.RUNNING  # its worker (this process) lives
    waiting = [t for t in study.trials if t.state == TrialState.WAITING]
    assert [t.system_attrs["fixed_params"] for t in waiting] == [arch]
    assert recover_stale_trials(study) == []  # once
    assert len([t for t in study.trials if t.state == TrialState.WAITING]) == 1


def test_diverging_trial_fails_and_the_study_finishes_its_count(settings, monkeypatch, tmp_path):
    real_fit, calls = nas.study.fit, []

    def fit(model, data, cfg, callbacks=()):
        calls.append(1)
        if len(calls) == 2:
            raise TrainingDiverged("loss became nan at epoch 1")
        return real_fit(model, data, cfg, callbacks)

    monkeypatch.setattr(nas.study, "fit", fit)
    study = run_search(settings)
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    assert len(failed) == 1 and sum(counts(t) for t in study.trials) == 3
    assert failed[0].user_attrs["fail_reason"] == "TrainingDiverged: loss became nan at epoch 1"
    traceback_txt = tmp_path / "results/tiny/trials" / str(failed[0].number) / "traceback.txt"
    assert "TrainingDiverged" in traceback_txt.read_text()
    screen = nas.study.show_study("tiny")  # `repnas show`: failures counted by reason, the front, time left
    assert "in all, 3 of 3 counted" in screen and "3 COMPLETE, 1 FAIL" in screen
    assert "failed: 1 x TrainingDiverged: loss became nan at epoch 1" in screen
    assert "Pareto front: " in screen and "; hypervolume " in screen
    assert screen.splitlines()[-1] == "time left: none, the study has its trials"
    assert main(["show", "tiny"]) == 0


def test_max_failures_stops_a_study_where_every_trial_fails(settings, monkeypatch):
    def fit(model, data, cfg, callbacks=()):
        raise TrainingDiverged("loss became nan")

    monkeypatch.setattr(nas.study, "fit", fit)
    with pytest.raises(SearchStopped, match="2 trials failed"):
        run_search(replace(settings, max_failures=2))
    study = optuna.load_study(study_name="tiny", storage=nas.study.storage_for(settings))
    assert _states(study) == ["FAIL", "FAIL"]


def test_over_budget_archs_are_rejected_before_training_and_do_not_count(settings, assets, monkeypatch):
    space = dict(TINY_SPACE, budgets={"max_params": arch_cost(Arch.from_params(BASELINE, load_space(assets["space"])),
                                                               64, 2)[0]})
    tight = assets["root"] / "tight.yaml"
    tight.write_text(yaml.safe_dump(space))
    real_fit, calls = nas.study.fit, []
    monkeypatch.setattr(nas.study, "fit", lambda *a, **k: calls.append(1) or real_fit(*a, **k))
    with pytest.raises(SearchStopped, match="over budget or already trained"):
        run_search(replace(settings, space=str(tight), trials=2))
    study = optuna.load_study(study_name="tiny", storage=nas.study.storage_for(settings))
    assert len(calls) == 1 and study.trials[0].state == TrialState.COMPLETE  # the baseline only
    rejected = [t for t in study.trials if t.user_attrs.get("rejected")]
    assert rejected and all(t.state == TrialState.PRUNED and not counts(t) for t in rejected)
    assert all("max_params" in t.user_attrs["rejected"] and t.constraints == {"budget": 1.0} for t in rejected)
    assert not any((Path("results/tiny/trials") / str(t.number) / "weights.pt").exists() for t in rejected)


def test_changed_data_on_resume_is_refused_naming_the_field(settings, assets, monkeypatch):
    monkeypatch.setattr(nas.study, "fit", lambda *a, **k: (_ for _ in ()).throw(TrainingDiverged("skip")))
    with pytest.raises(SearchStopped):
        run_search(replace(settings, max_failures=1))
    with pytest.raises(StudyError, match=r"resuming with data: '.*data\.yaml' -> '.*other.*'; imgsz: 64 -> 96 "
                                         r"would make its trials incomparable.*--force"):
        run_search(StudySettings(name="tiny", data=str(assets["other"]), imgsz=96))
    assert main(["search", "--study", "tiny", "--data", str(assets["other"]), "--quiet"]) == 2
    # --force accepts the change: stored settings replaced, the old ones kept in the history
    monkeypatch.setattr(nas.study, "fit", lambda *a, **k: (_ for _ in ()).throw(TrainingDiverged("again")))
    with pytest.raises(SearchStopped):
        run_search(StudySettings(name="tiny", data=str(assets["other"]), max_failures=1), force=True)
    study = optuna.load_study(study_name="tiny", storage=nas.study.storage_for(settings))
    assert "other" in study.user_attrs["settings"] and "other" not in str(study.user_attrs["settings_history"])


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


def _create_concurrently(settings, other_settings, monkeypatch) -> optuna.Study:
    """Create `settings`' study while, during its baseline measurement, another process creates it first."""
    real = nas.study.measure_latency
    fired = []

    def measure(*args, **kwargs):
        if not fired:  # the other host finishes creating the study while this one measures
            fired.append(True)
            theirs = nas.study.merge_settings(other_settings, None)
            other = optuna.create_study(storage=nas.study.storage_for(theirs), study_name=theirs.name,
                                        load_if_exists=True, directions=["maximize", "minimize"])
            other.set_user_attr("baseline_latency_ms", 123.0)
            other.set_user_attr("baseline_params", BASELINE)
            other.enqueue_trial(BASELINE, user_attrs={"baseline": True})
            other.set_user_attr(nas.study.SETTINGS_ATTR, nas.study.settings_json(theirs))
        return real(*args, **kwargs)

    monkeypatch.setattr(nas.study, "measure_latency", measure)
    return nas.study.create_or_load_study(nas.study.merge_settings(settings, None))


def test_a_study_created_meanwhile_by_another_host_is_joined_not_doubled(settings, monkeypatch):
    study = _create_concurrently(settings, settings, monkeypatch)
    assert study.user_attrs["baseline_latency_ms"] == 123.0  # the first creator's frozen figure is kept
    assert [t.user_attrs.get("baseline") for t in study.trials] == [True]  # one baseline trial, not two


def test_a_study_created_meanwhile_with_other_settings_is_refused(settings, monkeypatch):
    with pytest.raises(StudyError, match=r"created by another process .* with other settings"):
        _create_concurrently(settings, replace(settings, seed=7), monkeypatch)
    study = optuna.load_study(study_name="tiny", storage=nas.study.storage_for(settings))
    assert json.loads(study.user_attrs[nas.study.SETTINGS_ATTR])["seed"] == 7 and len(study.trials) == 1


def test_a_new_study_without_data_is_the_demo(monkeypatch, tmp_path):
    """No --data on a new study: the demo's settings and the synthetic demo set (generated into the cache)."""
    from nas.synth import DEMO_DATA, SynthConfig

    monkeypatch.setenv("REPNAS_CACHE_DIR", str(tmp_path / "cache"))
    small = replace(DEMO_DATA, images=12)  # the demo set's kind, fewer images
    monkeypatch.setattr("nas.synth.DEMO_DATA", small)
    monkeypatch.setattr(nas.study, "create_or_load_study", lambda settings, enqueue=(): None)  # settings only
    settings, _ = nas.study.prepare_study(StudySettings(name="demo", results=str(tmp_path / "res")))
    assert Path(settings.data).parent.name == small.key and small != SynthConfig()
    assert settings.trials == nas.study.DEMO["trials"] and settings.proxy == nas.study.DEMO["proxy"]
    assert settings.proxy["loss"] == {"obj": 6.25} and settings.imgsz == 320
    given, _ = nas.study.prepare_study(StudySettings(name="demo2", results=str(tmp_path / "res"), trials=3,
                                                     proxy={"epochs": 2}))
    assert given.trials == 3 and given.proxy == nas.study.DEMO["proxy"] | {"epochs": 2}  # what is given wins


def test_default_workers_are_two_single_threaded_ones_only_for_the_demo_on_a_cpu(settings, monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert nas.study.default_workers(settings, demo=True) == 2
    assert nas.study.default_workers(settings, demo=False) == 1  # a study of the user's own: one worker
    assert nas.study.default_workers(settings, demo=True, devices=["0"]) == 1
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    assert nas.study.default_workers(settings, demo=True) == 1
