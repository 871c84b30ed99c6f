"""`repnas relatency`: a finished study's trials re-timed on this machine as a named latency profile, without
weights, resumably (SIGKILL included); `show`/`export --profile` rank on it and mark the rows that changed."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

from nas.cli import main
from nas.study import relatency as rl
from nas.study import show_study
from nas.study.followups import KEY_KEY, KIND_KEY, companion
from nas.study.settings import StudyError
from tests.studyfixtures import copy_searched, load, searched_tiny_study

TRIALS = 4


@pytest.fixture(scope="module")
def searched(tmp_path_factory) -> tuple[Path, dict]:
    """A finished tiny study (results in ROOT/results), made once; tests work on copies."""
    root = tmp_path_factory.mktemp("relatency")
    return root, searched_tiny_study(root, TRIALS)


@pytest.fixture
def study_copy(searched, tmp_path, monkeypatch):
    settings = copy_searched(*searched, TRIALS, tmp_path, monkeypatch)
    return settings, load(settings)


def complete(study):
    return [t for t in study.get_trials(states=(TrialState.COMPLETE,)) if t.values]


def cpu_profile(settings, name="here", **kw):
    return rl.make_profile(settings, name=name, device="cpu", threads=1, **kw)


def test_every_complete_trial_gets_a_profile_latency_scaled_by_the_profiles_own_baseline(study_copy):
    settings, study = study_copy
    summary = rl.run_relatency(study, settings, cpu_profile(settings), report=lambda line: None)
    done = complete(study)
    assert summary["timed"] == summary["total"] == len(done) and summary["failed"] == 0
    study = load(settings)
    stored = rl.stored_profile(study, "here")
    assert stored["backend"] == "torch" and stored["device"] == "cpu" and stored["threads"] == 1
    assert stored["imgsz"] == settings.latency_imgsz or stored["imgsz"] > 0
    results = rl.profile_results(study, "here")
    assert set(results) == {t.number for t in done}
    for r in results.values():  # the objective is the ratio x the profile's frozen baseline, as in a study
        assert r["latency_ms"] == pytest.approx(r["ratio"] * stored["baseline_latency_ms"])
        assert r["network"] == "model.yaml" and r["backend"] == "torch"
    baseline = next(t for t in done if t.user_attrs.get("baseline"))
    assert results[baseline.number]["ratio"] == pytest.approx(1.0, abs=0.5)  # the baseline against itself
    # nothing was written to the finished trials: the study's own objectives are unchanged
    assert [t.values for t in complete(study)] == [t.values for t in done]


def test_a_second_run_times_nothing_and_another_setting_under_the_same_name_is_refused(study_copy, capsys):
    settings, study = study_copy
    rl.run_relatency(study, settings, cpu_profile(settings), report=lambda line: None)
    again = rl.run_relatency(load(settings), settings, cpu_profile(settings), report=lambda line: None)
    assert again["timed"] == 0 and again["done"] == again["total"]
    with pytest.raises(StudyError, match="give another --profile NAME"):
        rl.run_relatency(load(settings), settings, cpu_profile(settings, batch=2), report=lambda line: None)
    assert main(["relatency", "tiny", "--results", settings.results, "--profile", "here", "--device", "cpu",
                 "--threads", "1", "--latency-batch", "2"]) == 2
    err = capsys.readouterr().err
    assert "give another --profile NAME" in err and len(err.strip().splitlines()) == 1


def _with_attr(t, key, value):
    t = copy.deepcopy(t)
    t.user_attrs = t.user_attrs | {key: value}
    return t


def test_trials_without_weights_or_model_yaml_are_rebuilt_and_a_lost_pruned_plan_fails_alone(study_copy, monkeypatch):
    settings, study = study_copy
    done = complete(study)
    for t in done:  # what `repnas clean` removes, and more: one trial keeps neither weights nor model.yaml
        for name in ("weights.pt", "fused.pt"):
            (settings.trials_root / str(t.number) / name).unlink(missing_ok=True)
    gone, pruned = done[-1], done[-2]
    (settings.trials_root / str(gone.number) / "model.yaml").unlink()
    real = rl._complete

    def ranked_pruned(study):  # as the study records a trial ranked pruned (its plan lost here)
        return [_with_attr(t, "prune_fraction", 0.5) if t.number == pruned.number else t for t in real(study)]

    monkeypatch.setattr(rl, "_complete", ranked_pruned)
    summary = rl.run_relatency(load(settings), settings, cpu_profile(settings), report=lambda line: None)
    assert summary["failed"] == 1 and summary["timed"] == len(done) - 1
    results = rl.profile_results(load(settings), "here")
    assert results[gone.number]["network"] == "Arch params (model.yaml gone)"
    failed = rl.failed_timings(load(settings), "here")
    assert [n for n, _ in failed] == [pruned.number] and "pruned/channels.json is gone" in failed[0][1]


def test_a_pruned_trial_is_timed_from_its_channel_plan(study_copy):
    from pruning.channel import prune_to_flops
    from pruning.portable import save_pruned
    from pruning.reparam import fuse_model
    from space.builder import build_model

    settings, study = study_copy
    t = complete(study)[-1]
    folder = settings.trials_root / str(t.number)
    fused = fuse_model(build_model(folder / "model.yaml").eval())
    result = prune_to_flops(fused, 0.5, 64, round_to=4)
    save_pruned(result.model, folder / "pruned", result.plan)
    network, source = rl.deploy_network(study, settings, _with_attr(t, "prune_fraction", 0.5), nc=2)
    assert source == "pruned/channels.json"
    assert {n: (m.in_channels, m.out_channels) for n, m in network.named_modules() if hasattr(m, "out_channels")
            and hasattr(m, "kernel_size")} == {n: (c["in"], c["out"]) for n, c in result.plan.items()}


def test_show_and_export_rank_on_a_profile_and_mark_what_changed(study_copy, capsys, monkeypatch):
    settings, study = study_copy
    done = complete(study)
    worst = min((t for t in done if not t.user_attrs.get("baseline")), key=lambda t: t.values[0])
    order = [t.number for t in done]  # run_relatency times the trials in number order

    def fake_time(network, psettings, baseline):  # on this machine the lowest-mAP trial is by far the fastest
        from nas.latency import Latency

        ratio = 0.001 if order[fake_time.calls] == worst.number else 1.0
        fake_time.calls += 1
        return Latency(ratio, ratio, ratio, 0.0, 1, (64, 64), 1, "float32",
                       {"type": "cpu", "name": "fake", "threads": 1}, reference_median_ms=1.0, latency_ratio=ratio)

    fake_time.calls = 0
    monkeypatch.setattr(rl, "time_latency", fake_time)
    monkeypatch.setattr(rl, "measure_baseline", lambda net, s: (_one(), [_one()], None))
    rl.run_relatency(study, settings, cpu_profile(settings, name="fast"), report=lambda line: None)
    study_front = {t.number for t in load(settings).best_trials}
    changed = rl.front_changes(load(settings), "fast")
    assert worst.number in changed["kept" if worst.number in study_front else "entered"]
    assert main(["show", "tiny", "--results", settings.results, "--profile", "fast"]) == 0
    text = capsys.readouterr().out
    assert "latency profile fast: cpu, torch backend" in text and "against the study's own front" in text
    if worst.number not in study_front:
        assert "(entered: off the study's own front)" in text
    assert main(["export", "tiny", "--results", settings.results, "--profile", "fast", "--format", "csv,json"]) == 0
    out = Path(settings.results) / "tiny" / "profiles" / "fast"
    df = pd.read_csv(out / "pareto.csv")
    row = df[df["trial"] == worst.number].iloc[0]
    assert row["latency_ms"] == pytest.approx(0.001) and row["pareto"] and row["front_rank"] == 1
    assert set(df[df["study_pareto"] == True]["trial"]) == study_front  # noqa: E712
    header = json.loads((out / "pareto.json").read_text())["header"]
    assert header["baseline_latency_ms"] == pytest.approx(1.0) and "profile fast" in header["title"]
    assert (Path(settings.results) / "tiny" / "pareto.csv").is_file()  # the study's own files stay where they are


def _one():
    from nas.latency import Latency

    return Latency(1.0, 1.0, 1.0, 0.0, 1, (64, 64), 1, "float32", {"type": "cpu", "name": "fake", "threads": 1},
                   reference_median_ms=1.0, latency_ratio=1.0)


def test_an_unknown_profile_names_the_ones_there_are(study_copy, capsys):
    settings, study = study_copy
    with pytest.raises(StudyError, match="make one with `repnas relatency tiny`"):
        show_study("tiny", results=settings.results, profile="nope")
    rl.run_relatency(study, settings, cpu_profile(settings), report=lambda line: None)
    assert main(["export", "tiny", "--results", settings.results, "--profile", "nope"]) == 2
    assert "it has here" in capsys.readouterr().err


KILLER = textwrap.dedent("""
    import os, signal, sys
    import nas.study.relatency as rl
    real, calls = rl.time_latency, [0]
    def time_latency(*args, **kwargs):
        calls[0] += 1
        if calls[0] == int(sys.argv[1]):
            os.kill(os.getpid(), signal.SIGKILL)  # mid-run, as the OOM killer or a power cut stops it
        return real(*args, **kwargs)
    rl.time_latency = time_latency
    from nas.cli import main
    sys.exit(main(sys.argv[2:]))
""")


@pytest.mark.slow  # over 10 s (the not-slow suite aims at ~6 min on 2 cores)
def test_sigkill_mid_run_then_rerun_times_each_missing_trial_once(study_copy, tmp_path):
    settings, study = study_copy
    args = ["relatency", "tiny", "--results", settings.results, "--profile", "k", "--device", "cpu", "--threads", "1",
            "--quiet"]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    killed = subprocess.run([sys.executable, "-c", KILLER, "3", *args], env=env, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    first = rl.profile_results(load(settings), "k")
    assert len(first) == 2  # the two timed before the kill were stored; nothing half-written is read as a result
    again = subprocess.run([sys.executable, "-m", "nas.cli", *args], env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    n = len(complete(study))
    assert f"{n} of {n} trials timed ({n - 2} now" in again.stdout
    records = [t for t in companion(load(settings)).get_trials(deepcopy=False)
               if t.user_attrs.get(KIND_KEY) == rl.KIND and t.user_attrs.get(KEY_KEY) == "k"
               and t.state == TrialState.COMPLETE]
    assert sorted(t.user_attrs["followup_target"] for t in records) == sorted(t.number for t in complete(study))
    assert optuna.load_study(study_name="tiny", storage=load(settings)._storage).trials
