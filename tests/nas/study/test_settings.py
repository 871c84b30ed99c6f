"""Study settings (nas/study/settings.py): what a resumed study may change. A frozen field given anew is refused
naming it (unless --force, which keeps the old settings in the history), one proxy field merges into the stored
proxy, and a lease shorter than three heartbeats is refused. Tiny study: tests/studyfixtures.py."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import optuna
import pytest

import nas.study
from nas.cli import main
from nas.study import SearchStopped, StudyError, StudySettings, run_search
from nas.train import TrainingDiverged


def test_changed_data_on_resume_is_refused_naming_the_field(settings, assets, monkeypatch):
    monkeypatch.setattr(nas.study.trial, "fit", lambda *a, **k: (_ for _ in ()).throw(TrainingDiverged("skip")))
    with pytest.raises(SearchStopped):
        run_search(replace(settings, max_failures=1))
    with pytest.raises(StudyError, match=r"resuming with data: '.*data\.yaml' -> '.*other.*'; latency_imgsz: 64 -> 96 "
                                         r"would make its trials incomparable.*--force"):
        run_search(StudySettings(name="tiny", data=str(assets["other"]), latency_imgsz=96))
    assert main(["search", "--study", "tiny", "--data", str(assets["other"]), "--quiet"]) == 2
    # --force accepts the change: stored settings replaced, the old ones kept in the history
    monkeypatch.setattr(nas.study.trial, "fit", lambda *a, **k: (_ for _ in ()).throw(TrainingDiverged("again")))
    with pytest.raises(SearchStopped):
        run_search(StudySettings(name="tiny", data=str(assets["other"]), max_failures=1), force=True)
    study = optuna.load_study(study_name="tiny", storage=nas.study.storage_for(settings))
    assert "other" in study.user_attrs["settings"] and "other" not in str(study.user_attrs["settings_history"])


def test_resume_changes_one_proxy_field_and_refuses_short_leases(settings, capsys):
    run_search(replace(settings, trials=1))
    assert main(["search", "--study", "tiny", "--epochs", "1", "--trials", "1", "--quiet"]) == 0  # same value
    assert main(["search", "--study", "tiny", "--epochs", "2", "--quiet"]) == 2
    assert main(["search", "--study", "tiny", "--stale-after", "10", "--quiet"]) == 2
    assert main(["resume", "no-such-study"]) == 2
    err = capsys.readouterr().err
    assert "proxy: {" in err and "'epochs': 1" in err and "'epochs': 2" in err
    assert "stale_after=10.0 must be at least 90 s" in err and "no study 'no-such-study'" in err
    assert not (Path("results") / "no-such-study").exists()


def test_a_built_in_space_is_stored_by_name_and_a_file_by_absolute_path(tmp_path, monkeypatch):
    from nas.study.settings import _normalise

    monkeypatch.chdir(tmp_path)
    assert _normalise("space", "small") == "small" and _normalise("space", "default") == "default"
    (tmp_path / "small").write_text("a space file named like the built-in one wins")
    assert _normalise("space", "small") == str(tmp_path / "small")


def test_baseline_seed_is_the_seed_design_and_stored_by_name(tmp_path, monkeypatch):
    from nas.study.settings import load_baseline, load_enqueue, merge_settings
    from space.searchspace import load_space, seed_arch

    monkeypatch.chdir(tmp_path)
    space = load_space()
    assert load_baseline("seed", space) == load_baseline(None, space) == seed_arch(space)
    assert load_enqueue("seed", space) == seed_arch(space).to_params()
    assert merge_settings(StudySettings(name="s", baseline="seed"), None).baseline == "seed"  # not a path here
