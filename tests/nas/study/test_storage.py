"""Where a study lives (nas/study/storage.py): creating a study another process creates at the same moment, and
the journal file's lock, which dies with its holder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import replace

import optuna
import pytest

import nas.files
import nas.study
from nas.study import StudyError
from tests.studyfixtures import BASELINE


def _create_concurrently(settings, other_settings, monkeypatch) -> optuna.Study:
    """Create `settings`' study while, during its baseline measurement, another process creates it first."""
    real = nas.study.storage.measure_latency
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

    monkeypatch.setattr(nas.study.storage, "measure_latency", measure)
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


def test_a_worker_killed_while_holding_the_journal_lock_does_not_hold_it(settings):
    """The local journal's lock dies with its holder: no leftover lock for the others to wait out (Optuna's own
    symlink lock stays behind a SIGKILLed writer and makes every other process wait 30 s before breaking it)."""
    storage = nas.study.storage_for(settings)
    assert isinstance(storage._backend._lock, nas.files.FileLock)  # the study's journal takes this lock
    optuna.create_study(storage=storage, study_name="locked", directions=["maximize", "minimize"])
    folder = settings.folder
    code = ("import os, signal, sys; from pathlib import Path; from nas.files import FileLock; "
            "lock = FileLock(Path(sys.argv[1])); lock.acquire(); print('held', flush=True); "
            "os.kill(os.getpid(), signal.SIGKILL)")
    holder = subprocess.run([sys.executable, "-c", code, str(folder / "study.log.flock")], capture_output=True,
                            text=True, timeout=60)
    assert holder.returncode == -signal.SIGKILL and holder.stdout == "held\n"
    import fcntl

    fd = os.open(folder / "study.log.flock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free at once: raises BlockingIOError while held
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
    assert not (folder / "study.log.lock").exists()  # no symlink lock is used at all
    study = optuna.load_study(study_name="locked", storage=nas.study.storage_for(settings))
    study.set_user_attr("after", 1)  # a write goes through
    assert study.user_attrs["after"] == 1
