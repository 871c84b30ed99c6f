"""Who runs which trial (nas/study/leases.py): a dead worker's trial (same host: dead PID; any host: an expired
heartbeat) is failed and its Arch enqueued once more, a SIGKILLed search resumes losing nothing, and a claim
that loses a race between hosts is released as surplus."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import optuna
import pytest
from optuna.trial import TrialState

import nas.study
from nas.cli import main
from nas.study import StudySettings, claim_trial, counts, host_id, prepare_study, recover_stale_trials, run_search
from tests.studyfixtures import BASELINE
from tests.studyfixtures import files_intact as _files_intact
from tests.studyfixtures import load as _load


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


def _search_argv(assets, name: str, trials: int) -> list[str]:
    return ["--study", name, "--data", str(assets["data"]), "--space", str(assets["space"]),
            "--baseline", str(assets["baseline"]), "--trials", str(trials), "--epochs", "3", "--imgsz", "64",
            "--batch", "4", "--latency-imgsz", "64", "--device", "cpu", "--sampler", "random", "--quiet"]


@pytest.mark.slow  # over 10 s (the not-slow suite aims at ~6 min on 2 cores)
def test_sigkill_during_a_trial_then_resume_loses_nothing(assets, tmp_path, monkeypatch):
    monkeypatch.setenv("REPNAS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "nas.cli", "search", *_search_argv(assets, "kill", 3)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    settings = StudySettings(name="kill")
    deadline = time.time() + 120
    try:  # kill while trial >= 1 trains (after trial 0 is COMPLETE with its files)
        while time.time() < deadline:
            if (tmp_path / "results/kill/study.log").exists():
                trials = _load(settings).trials
                if any(t.number >= 1 and t.state == TrialState.RUNNING and "latency_ms" in t.user_attrs
                       for t in trials):
                    break
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.05)
        else:
            pytest.fail("no trial reached training in 120 s")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    before = _load(settings)
    finished = {t.number: (t.state, t.values, t.user_attrs.get("files")) for t in before.trials
                if t.state.is_finished()}
    running = [t.number for t in before.trials if t.state == TrialState.RUNNING]
    assert finished and running

    assert main(["search", "--study", "kill", "--quiet"]) == 0  # stored settings; the dead worker is detected
    after = _load(settings)
    assert sum(counts(t) for t in after.trials) == 3
    assert not [t for t in after.trials if t.state == TrialState.RUNNING]
    for number, (state, values, files) in finished.items():
        t = after.trials[number]
        assert (t.state, t.values, t.user_attrs.get("files")) == (state, values, files)
    for number in running:
        assert after.trials[number].state == TrialState.FAIL
        assert after.trials[number].user_attrs["fail_reason"] == "stale: worker died"
    requeued = [t for t in after.trials if t.user_attrs.get("requeued_from") in running]
    assert len(requeued) == 1 and requeued[0].params == after.trials[running[0]].params
    _files_intact(after, tmp_path / "results/kill/trials")


def test_lease_expiry_fails_a_trial_of_another_host(settings):
    _, study = prepare_study(replace(settings, trials=1))
    trial = study.ask()
    trial.set_user_attr("host", "another-host")
    trial.set_user_attr("pid", 12345)
    trial.set_user_attr("heartbeat", time.time() - 100)
    assert recover_stale_trials(study, stale_after=600) == []  # its lease still runs
    assert recover_stale_trials(study, stale_after=60) == [trial.number]
    frozen = study.trials[trial.number]
    assert frozen.state == TrialState.FAIL and "no heartbeat from another-host pid 12345" in frozen.user_attrs[
        "fail_reason"]
    assert study.trials[-1].state == TrialState.WAITING and study.trials[-1].user_attrs["baseline"] is True


def test_a_claim_that_loses_a_race_is_released_as_surplus(settings, assets, monkeypatch):
    """Two hosts asking at once on an RDB storage: the later trial number is released, its params enqueued again."""
    settings, study = prepare_study(replace(settings, trials=1), enqueue=[str(assets["baseline"])])
    enqueued = dict(BASELINE, P5_width=16)
    study.enqueue_trial(enqueued)
    real_ask = study.ask
    monkeypatch.setattr(study, "ask", lambda *a, **k: (real_ask(), real_ask(*a, **k))[1])  # another host asks first
    assert claim_trial(study, replace(settings, storage="postgresql://elsewhere/db")) is None
    released = study.trials[1]
    assert released.state == TrialState.PRUNED and released.user_attrs["pruned_reason"] == "surplus"
    assert not counts(released)
    assert study.trials[-1].state == TrialState.WAITING and study.trials[-1].system_attrs["fixed_params"] == enqueued
