"""Running a study (nas/study/run.py): run_search until the count, resumed for one more; a failing trial fails
alone and max_failures stops the study; Ctrl-C and a lost lease; the demo when no data is given; how many
workers by default."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

import nas.study
from nas.cli import main
from nas.study import SearchStopped, StudySettings, counts, run_search
from nas.study.settings import resolved_proxy
from nas.train import TrainingDiverged
from tests.studyfixtures import BASELINE
from tests.studyfixtures import load as _load
from tests.studyfixtures import sha256_of as _sha


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


def test_diverging_trial_fails_and_the_study_finishes_its_count(settings, monkeypatch, tmp_path):
    real_fit, calls = nas.study.trial.fit, []

    def fit(model, data, cfg, callbacks=()):
        calls.append(1)
        if len(calls) == 2:
            raise TrainingDiverged("loss became nan at epoch 1")
        return real_fit(model, data, cfg, callbacks)

    monkeypatch.setattr(nas.study.trial, "fit", fit)
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

    monkeypatch.setattr(nas.study.trial, "fit", fit)
    with pytest.raises(SearchStopped, match="2 trials failed"):
        run_search(replace(settings, max_failures=2))
    study = optuna.load_study(study_name="tiny", storage=nas.study.storage_for(settings))
    assert _states(study) == ["FAIL", "FAIL"]


def test_interrupt_fails_the_trial_and_keeps_the_baseline_enqueued(settings, monkeypatch):
    monkeypatch.setattr(nas.study.trial, "fit", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        run_search(settings)
    study = _load(settings)
    first, waiting = study.trials[0], study.trials[-1]
    assert first.state == TrialState.FAIL and first.user_attrs["fail_reason"] == "interrupted"
    assert waiting.state == TrialState.WAITING and waiting.user_attrs["baseline"] is True
    assert waiting.user_attrs["requeued_from"] == 0 and waiting.user_attrs["requeue_reason"] == "interrupted"


def test_a_trial_whose_lease_was_taken_is_dropped_and_the_worker_goes_on(settings, monkeypatch):
    real_fit, lines = nas.study.trial.fit, []

    def fit(model, data, cfg, callbacks=()):
        study = _load(settings)
        running = [t for t in study.trials if t.state == TrialState.RUNNING]
        if running and running[0].number == 1:  # another process takes trial 1 for dead while it trains
            study.tell(running[0].number, state=TrialState.FAIL)
        return real_fit(model, data, cfg, callbacks)

    monkeypatch.setattr(nas.study.trial, "fit", fit)
    study = run_search(replace(settings, trials=2), report=lines.append)
    assert "trial    1 lost its lease (marked stale by another worker); its result is dropped" in lines
    assert study.trials[1].state == TrialState.FAIL and sum(counts(t) for t in study.trials) == 2


def test_a_new_study_without_data_is_the_demo(monkeypatch, tmp_path):
    """No --data on a new study: the demo's settings and the synthetic demo set (generated into the cache)."""
    from nas.synth import DEMO_DATA, SynthConfig

    monkeypatch.setenv("REPNAS_CACHE_DIR", str(tmp_path / "cache"))
    small = replace(DEMO_DATA, images=12)  # the demo set's kind, fewer images
    monkeypatch.setattr("nas.synth.DEMO_DATA", small)
    monkeypatch.setattr(nas.study.run, "create_or_load_study", lambda settings, enqueue=(): None)  # settings only
    settings, _ = nas.study.prepare_study(StudySettings(name="demo", results=str(tmp_path / "res")))
    assert Path(settings.data).parent.name == small.key and small != SynthConfig()
    # stored resolved: every proxy field, the demo's values over the defaults
    assert settings.trials == nas.study.DEMO["trials"] and settings.proxy == resolved_proxy(nas.study.DEMO["proxy"])
    assert settings.proxy["loss"]["obj"] == 6.25 and settings.latency_imgsz == 320
    given, _ = nas.study.prepare_study(StudySettings(name="demo2", results=str(tmp_path / "res"), trials=3,
                                                     proxy={"epochs": 2}))
    assert given.trials == 3 and given.proxy == resolved_proxy(nas.study.DEMO["proxy"] | {"epochs": 2})  # given wins


def test_a_new_data_study_on_a_cpu_takes_the_cpu_proxy_and_a_resumed_one_keeps_its_own(settings, monkeypatch):
    """--data on a CPU: proxy keys not given take DEVICE_PROXY["cpu"] (issue 12's choice, 15 epochs at 160 px), given
    keys win, a GPU keeps ProxyConfig's; a stored study resumes on the proxy it stored after the defaults change."""
    from nas.train import ProxyConfig

    cpu = nas.study.DEVICE_PROXY["cpu"]
    assert (cpu["epochs"], cpu["imgsz"]) != (ProxyConfig().epochs, ProxyConfig().imgsz)
    new, _ = nas.study.prepare_study(replace(settings, name="cpu", proxy={"batch": 8, "cache_images": False}))
    assert {k: new.proxy[k] for k in cpu} == cpu and new.proxy["batch"] == 8 and not new.proxy["cache_images"]
    assert new.proxy == resolved_proxy({"batch": 8, "cache_images": False}, nas.study.device_proxy("cpu"))
    given, _ = nas.study.prepare_study(replace(settings, name="given", proxy={"epochs": 3}))
    assert given.proxy["epochs"] == 3 and given.proxy["imgsz"] == cpu["imgsz"]  # given wins, key by key
    said = nas.study.run.device_proxy_line(new, {"batch": 8})  # said once, when a new study starts
    assert said.startswith("study cpu: proxy 15 epochs at 160 px, batch 8,") and "--epochs --imgsz --val-every" in said
    assert "(imgsz, val_every: the CPU defaults" in nas.study.run.device_proxy_line(given, {"epochs": 3})
    assert nas.study.run.device_proxy_line(given, {"epochs": 3, "imgsz": 96, "val_every": 2}) is None
    gpu = nas.study.device_proxy("cuda")
    assert (gpu["epochs"], gpu["imgsz"]) == (ProxyConfig().epochs, ProxyConfig().imgsz) == (60, 160)
    monkeypatch.setitem(nas.study.settings.DEVICE_PROXY, "cpu", {"epochs": 7, "imgsz": 96})
    resumed, _ = nas.study.prepare_study(replace(settings, name="cpu", proxy=None))
    assert resumed.proxy == new.proxy  # stored resolved: a change of defaults never reaches a resumed study
    later, _ = nas.study.prepare_study(replace(settings, name="later", proxy=None))
    assert (later.proxy["epochs"], later.proxy["imgsz"]) == (7, 96)  # ...and does reach a new one


def test_a_new_study_says_once_which_proxy_keys_the_cpu_defaults_filled(settings):
    proxy = {k: v for k, v in settings.proxy.items() if k != "val_every"}
    lines: list[str] = []
    run_search(replace(settings, trials=1, quiet=False, proxy=proxy), report=lines.append)
    assert lines[0].startswith("study tiny: proxy 1 epoch at 64 px, batch 8, AdamW lr0 0.002, validated every 3 epochs")
    assert "(val_every: the CPU defaults of nas.study.settings.DEVICE_PROXY" in lines[0] and "--val-every" in lines[0]
    assert len([line for line in lines if "DEVICE_PROXY" in line]) == 1
    assert [line for line in lines if line.startswith("trial    0 COMPLETE")]
    lines.clear()
    run_search(replace(settings, trials=2, quiet=False, proxy=proxy), report=lines.append)  # resumed: not said
    assert not [line for line in lines if "DEVICE_PROXY" in line]
    assert [line for line in lines if line.startswith("trial    1 COMPLETE")]


def test_default_workers_are_two_single_threaded_ones_only_for_the_demo_on_a_cpu(settings, monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert nas.study.default_workers(settings, demo=True) == 2
    assert nas.study.default_workers(settings, demo=False) == 1  # a study of the user's own: one worker
    assert nas.study.default_workers(settings, demo=True, devices=["0"]) == 1
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    assert nas.study.default_workers(settings, demo=True) == 1


def test_the_same_arch_in_two_studies_trains_to_the_same_weights(settings, tmp_path):
    """A study trial seeds before it builds: the baseline Arch in two studies gives the same weights.pt sha256."""
    first = run_search(replace(settings, name="one", trials=1))
    torch.manual_seed(99)  # whatever the generators held in between
    second = run_search(replace(settings, name="two", trials=1))
    files = [s.trials[0].user_attrs["files"] for s in (first, second)]
    assert first.trials[0].user_attrs["arch"] == second.trials[0].user_attrs["arch"]
    assert files[0]["weights.pt"]["sha256"] == files[1]["weights.pt"]["sha256"]
    assert _sha(tmp_path / "results" / "two" / "trials" / files[1]["weights.pt"]["path"]) == \
        files[0]["weights.pt"]["sha256"]


@pytest.mark.slow  # over 10 s (the not-slow suite aims at ~6 min on 2 cores)
def test_a_resume_keeps_the_worker_layout_and_times_with_the_stored_threads(settings, tmp_path):
    # issue #13's walk: created with two single-threaded workers, resumed without --workers: its third trial ran in
    # one 2-thread process and the Pareto file mixed "1 threads" and "2 threads" latencies
    import subprocess
    import sys

    common = ["--results", settings.results, "--quiet"]
    first = subprocess.run([sys.executable, "-m", "nas.cli", "search", "--study", "walk", "--data", settings.data,
                            "--space", settings.space, "--baseline", settings.baseline, "--trials", "2",
                            "--epochs", "1", "--imgsz", "64", "--batch", "8", "--latency-imgsz", "64",
                            "--device", "cpu", "--workers", "2", *common], capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    walk = replace(settings, name="walk")
    stored = load_stored_settings(walk)
    assert stored["workers"] == 2 and stored["latency"]["threads"] == 1
    resumed = subprocess.run([sys.executable, "-m", "nas.cli", "resume", "walk", "--trials", "3", *common],
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "[worker " in resumed.stdout  # the stored layout: worker processes again, not one in-process run
    devices = {t.user_attrs["device"]["threads"] for t in _load(walk).trials if "device" in t.user_attrs}
    assert devices == {1}  # every trial timed with the stored thread count
    again = subprocess.run([sys.executable, "-m", "nas.cli", "resume", "walk", "--trials", "4", "--workers", "1",
                            *common], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr  # the layout may be changed freely
    assert "[worker " not in again.stdout and load_stored_settings(walk)["workers"] == 1


def load_stored_settings(settings: StudySettings) -> dict:
    from nas.study.storage import load_stored

    return load_stored(settings)


def test_a_long_failure_reason_is_stored_cut_at_a_word(settings, monkeypatch, tmp_path):
    words = " ".join(f"size mismatch for model.{i}.weight: torch.Size([{i}, 16, 3, 3])" for i in range(20))

    def fit(*args, **kwargs):
        raise TrainingDiverged(words)

    monkeypatch.setattr(nas.study.trial, "fit", fit)
    with pytest.raises(SearchStopped):
        run_search(replace(settings, max_failures=1))
    reason = _load(settings).trials[0].user_attrs["fail_reason"]
    full = f"TrainingDiverged: {words}"
    assert len(reason) <= 300 and reason.endswith("…") and full.startswith(reason[:-1])
    assert full[len(reason) - 1] in " ,;:("  # whole words only; the whole message is in the traceback file
    assert words in (tmp_path / "results/tiny/trials/0/traceback.txt").read_text()
