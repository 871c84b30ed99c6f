"""Study reliability: worker processes, SIGKILL + resume, leases, surplus claims, OOM retry, budgets, weights."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from optuna.trial import TrialState

import nas.study
from nas.cli import main
from nas.study import (
    SearchStopped,
    StudySettings,
    claim_trial,
    counts,
    prepare_study,
    recover_stale_trials,
    run_search,
    trial_records,
)
from tests.nas.conftest import BASELINE


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _load(settings: StudySettings) -> optuna.Study:
    return optuna.load_study(study_name=settings.name, storage=nas.study.storage_for(settings))


def _files_intact(study: optuna.Study, root: Path) -> None:
    for t in study.trials:
        if t.state == TrialState.COMPLETE:
            for entry in t.user_attrs["files"].values():
                assert _sha(root / entry["path"]) == entry["sha256"], (t.number, entry)


def test_two_workers_run_six_distinct_trials(settings, tmp_path):
    lines: list[str] = []
    study = run_search(replace(settings, trials=6), workers=2, report=lines.append)
    study = _load(settings)
    counted = [t for t in study.trials if counts(t)]
    assert len(counted) == 6 and len({t.number for t in counted}) == 6
    assert not [t for t in study.trials if t.state == TrialState.RUNNING]
    assert not [t for t in study.trials if t.user_attrs.get("pruned_reason") == "surplus"]  # the local lock
    assert len({t.user_attrs["pid"] for t in study.trials}) == 2  # both workers ran trials
    assert {line.split("]")[0] for line in lines} == {"[worker 0", "[worker 1"}
    _files_intact(study, tmp_path / "results/tiny/trials")


def _search_argv(assets, name: str, trials: int) -> list[str]:
    return ["--study", name, "--data", str(assets["data"]), "--space", str(assets["space"]),
            "--baseline", str(assets["baseline"]), "--trials", str(trials), "--epochs", "3", "--imgsz", "64",
            "--batch", "4", "--latency-imgsz", "64", "--device", "cpu", "--sampler", "random", "--quiet"]


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


def test_cuda_out_of_memory_retries_once_at_half_the_batch(settings, monkeypatch):
    real_fit, batches = nas.study.fit, []

    def fit(model, data, cfg, callbacks=()):
        batches.append(cfg.batch)
        if len(batches) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_fit(model, data, cfg, callbacks)

    monkeypatch.setattr(nas.study, "fit", fit)
    study = run_search(replace(settings, trials=1))
    t = study.trials[0]
    assert t.state == TrialState.COMPLETE and batches == [8, 4]
    assert t.user_attrs["oom_retry"] == "CUDA out of memory at batch 8; retried at batch 4"
    assert t.user_attrs["proxy"]["batch"] == 4


def test_latency_budget_rejects_before_training(settings, monkeypatch):
    real_fit, calls = nas.study.fit, []
    monkeypatch.setattr(nas.study, "fit", lambda *a, **k: calls.append(1) or real_fit(*a, **k))
    with pytest.raises(SearchStopped, match="over budget or already trained"):
        run_search(replace(settings, trials=2, max_latency_ratio=0.01))
    study = _load(settings)
    assert len(calls) == 1 and study.trials[0].state == TrialState.COMPLETE  # the baseline is never rejected
    assert all(t.state == TrialState.PRUNED and not counts(t) for t in study.trials[1:])
    rejected = [t for t in study.trials if t.user_attrs.get("pruned_reason") == "rejected"]  # others: duplicates
    assert rejected and all(t.user_attrs["rejected"].startswith("latency ratio ") and "> max_latency_ratio 0.01" in
               t.user_attrs["rejected"] and t.constraints["latency"] > 0 for t in rejected)


def test_early_stopped_trials_are_pruned_with_partial_metrics_and_count(settings, monkeypatch):
    stops = []

    def rule(epoch, map50_95, latency_ms, epochs, finished, cfg):
        if epoch == 1 and finished:
            stops.append(epoch)
            return "early stop at epoch 1: test rule"
        return None

    monkeypatch.setattr(nas.study, "should_stop", rule)
    proxy = dict(settings.proxy, epochs=2, val_every=1)
    study = run_search(replace(settings, trials=3, proxy=proxy))
    assert study.trials[0].state == TrialState.COMPLETE and len(study.trials[0].user_attrs["curve"]) == 2
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED]
    assert len(pruned) == 2 == len(stops) and all(counts(t) for t in pruned)
    for t in pruned:
        assert t.user_attrs["stopped_epoch"] == 1 and t.user_attrs["pruned_reason"].startswith("early stop")
        assert t.user_attrs["partial_map50_95"] == t.user_attrs["curve"][0][1]
        assert "weights.pt" not in t.user_attrs["files"] and "metrics.json" in t.user_attrs["files"]
    records = {r.number: r for r in trial_records(study, settings)}
    assert all(records[t.number].map50_95 is None for t in pruned)  # partial mAP stays off the Pareto table


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


def test_cli_refuses_devices_without_cuda_and_bad_values(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["search", "--devices", "0,1"]) == 2
    for argv in (["search", "--devices", "a,b"], ["search", "--max-latency-ms", "-3"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "no CUDA device is available here" in err and "'a,b' is not a comma-separated list of CUDA indices" in err
    assert "'-3' is not a positive number" in err


def test_interrupt_fails_the_trial_and_keeps_the_baseline_enqueued(settings, monkeypatch):
    monkeypatch.setattr(nas.study, "fit", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        run_search(settings)
    study = _load(settings)
    first, waiting = study.trials[0], study.trials[-1]
    assert first.state == TrialState.FAIL and first.user_attrs["fail_reason"] == "interrupted"
    assert waiting.state == TrialState.WAITING and waiting.user_attrs["baseline"] is True
    assert waiting.user_attrs["requeued_from"] == 0 and waiting.user_attrs["requeue_reason"] == "interrupted"


def test_a_trial_whose_lease_was_taken_is_dropped_and_the_worker_goes_on(settings, monkeypatch):
    real_fit, lines = nas.study.fit, []

    def fit(model, data, cfg, callbacks=()):
        study = _load(settings)
        running = [t for t in study.trials if t.state == TrialState.RUNNING]
        if running and running[0].number == 1:  # another process takes trial 1 for dead while it trains
            study.tell(running[0].number, state=TrialState.FAIL)
        return real_fit(model, data, cfg, callbacks)

    monkeypatch.setattr(nas.study, "fit", fit)
    study = run_search(replace(settings, trials=2), report=lines.append)
    assert "trial    1 lost its lease (marked stale by another worker); its result is dropped" in lines
    assert study.trials[1].state == TrialState.FAIL and sum(counts(t) for t in study.trials) == 2


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


def test_a_worker_killed_while_holding_the_journal_lock_does_not_hold_it(settings):
    """The local journal's lock dies with its holder: no leftover lock for the others to wait out (Optuna's own
    symlink lock stays behind a SIGKILLed writer and makes every other process wait 30 s before breaking it)."""
    storage = nas.study.storage_for(settings)
    assert isinstance(storage._backend._lock, nas.study._JournalFlock)  # the study's journal takes this lock
    optuna.create_study(storage=storage, study_name="locked", directions=["maximize", "minimize"])
    folder = settings.folder
    code = ("import os, signal, sys; from pathlib import Path; from nas.study import _JournalFlock; "
            "lock = _JournalFlock(Path(sys.argv[1])); lock.acquire(); print('held', flush=True); "
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
