"""`repnas confirm`: retrain chosen trials longer / with other seeds, resumably, once each, and report the ranking
agreement; `show` and `export` gain the confirmed columns."""

from __future__ import annotations

import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

from nas.cli import main
from nas.fidelity import kendall_tau_b, spearman_rho
from nas.study import confirm as confirm_mod
from nas.study import show_study
from nas.study.attrs import LATENCY_MS_KEY
from nas.study.confirm import (
    KIND,
    SUMMARY_KEY_PREFIX,
    ConfirmPlan,
    claim_task,
    make_plan,
    run_confirm,
    select_trials,
)
from nas.study.followups import KEY_KEY, TARGET_KEY, companion, followups, start_followup
from nas.study.settings import StudyError
from tests.studyfixtures import copy_searched, load, searched_tiny_study, sha256_of


@pytest.fixture(scope="module")
def searched(tmp_path_factory) -> tuple[Path, dict]:
    """A finished 7-trial tiny study (results in ROOT/results), made once; tests work on copies."""
    root = tmp_path_factory.mktemp("confirm")
    return root, searched_tiny_study(root, 7)


@pytest.fixture
def study_copy(searched, tmp_path, monkeypatch):
    """(settings, study) of a private copy of the searched study."""
    settings = copy_searched(*searched, 7, tmp_path, monkeypatch)
    return settings, load(settings)


def complete(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.get_trials(states=(TrialState.COMPLETE,)) if t.values]


def confirm_records(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return companion(study).get_trials(deepcopy=False)


def test_selection_front_spread_trials_and_the_baseline(study_copy):
    settings, study = study_copy
    done = sorted(complete(study), key=lambda t: t.user_attrs[LATENCY_MS_KEY])
    baseline = next(t.number for t in done if t.user_attrs.get("baseline"))
    front = {t.number for t in study.best_trials}
    assert set(select_trials(study)) == front | {baseline}  # the default: the front, and the baseline always
    spread = select_trials(study, spread=3)
    assert {done[0].number, done[-1].number, baseline} <= set(spread)  # fastest and slowest
    lat = [study.trials[n].user_attrs[LATENCY_MS_KEY] for n in spread]
    assert lat == sorted(lat)
    assert set(select_trials(study, trials=[done[2].number])) == {done[2].number, baseline}
    plan = make_plan(study, settings, spread=3, seeds=[1, 0, 1])
    assert plan.epochs == 4 and plan.imgsz == 64 and plan.seeds == (1, 0)  # 4x the proxy's 1 epoch
    assert make_plan(study, settings, factor=2.5, imgsz=96).epochs == 2
    assert make_plan(study, settings, epochs=7).budget == "epochs=7,imgsz=64"
    not_complete = next(t.number for t in study.trials if t.state != TrialState.COMPLETE)
    with pytest.raises(StudyError, match=f"--trials {not_complete}: trial {not_complete} .* not COMPLETE"):
        select_trials(study, trials=[not_complete])


def test_confirm_runs_each_trial_and_seed_once_with_files_and_stats(study_copy):
    settings, study = study_copy
    plan = make_plan(study, settings, spread=5, epochs=2, seeds=[0, 1])
    assert len(plan.trials) >= 5
    lines = []
    summary = run_confirm(study, settings, plan, report=lines.append)
    results = followups(study, KIND)
    assert sorted((n, k) for n, runs in results.items() for k in runs) == sorted(
        (n, plan.key(s)) for n, s in plan.tasks())
    assert len(confirm_records(study)) == len(plan.tasks())  # nothing ran twice, nothing failed
    for n, runs in results.items():
        for key, result in runs.items():
            for entry in result["files"].values():
                assert entry["path"] == f"{n}/confirm/{key}/{Path(entry['path']).name}"
                assert sha256_of(settings.trials_root / entry["path"]) == entry["sha256"]
            assert result["epochs"] == 2 and 0 <= result["map50_95"] <= 1
    # the stored summary, recomputed by hand from the results
    assert study.user_attrs[SUMMARY_KEY_PREFIX + plan.budget] == summary
    rows = {r["trial"]: r for r in summary["trials"]}
    proxy, mean = [], []
    for n in plan.trials:
        values = [results[n][plan.key(s)]["map50_95"] for s in (0, 1)]
        assert rows[n]["map50_95"] == pytest.approx(np.mean(values))
        assert rows[n]["std"] == pytest.approx(np.std(values, ddof=1))
        proxy.append(study.trials[n].values[0])
        mean.append(np.mean(values))
    agreement = summary["agreement"]
    assert agreement["n"] == len(plan.trials)
    if agreement["tau_b"] is not None:  # (all-tied mAPs at 2 epochs would leave it undefined, and say so)
        assert agreement["tau_b"] == pytest.approx(kendall_tau_b(proxy, mean))
        assert agreement["rho"] == pytest.approx(spearman_rho(proxy, mean))
    lat = [study.trials[n].user_attrs[LATENCY_MS_KEY] for n in plan.trials]
    front = [n for n, m, la in zip(plan.trials, mean, lat)
             if not any(m2 >= m and l2 <= la and (m2 > m or l2 < la) for m2, l2 in zip(mean, lat))]
    assert summary["confirmed_front"] == front
    assert sum("confirm epochs=2,imgsz=64" in line for line in lines) == len(plan.tasks())


def test_show_and_export_mark_which_front_rows_survived(study_copy, capsys):
    settings, study = study_copy
    plan = make_plan(study, settings, spread=5, epochs=2)
    summary = run_confirm(study, settings, plan)
    assert main(["export", "tiny", "--results", settings.results]) == 0
    table = pd.read_csv(Path(settings.results) / "tiny" / "pareto.csv")
    confirmed = {r["trial"]: r for r in summary["trials"]}
    for _, row in table.iterrows():
        if row["trial"] in confirmed:
            assert row["confirmed_map50_95"] == pytest.approx(confirmed[row["trial"]]["map50_95"])
            assert row["confirmed_runs"] == 1
            assert bool(row["confirmed_pareto"]) == (row["trial"] in summary["confirmed_front"])
        else:
            assert pd.isna(row["confirmed_map50_95"]) and pd.isna(row["confirmed_pareto"])
    assert "retrained at epochs=2,imgsz=64" in (Path(settings.results) / "tiny" / "pareto.md").read_text()
    shown = show_study("tiny", results=settings.results)
    front = [t.number for t in study.best_trials]
    survived = [n for n in front if n in summary["confirmed_front"]]
    assert sorted(summary["survived"]) == sorted(survived)
    assert f"proxy-front trials that survived: {summary['survived']}" in shown
    assert shown.count("survived") - 1 == len(survived)  # one row mark per survivor (+ the summary line)
    assert "confirmed at epochs=2,imgsz=64" in shown


def test_fewer_than_five_trials_give_no_tau_and_say_why(study_copy, capsys):
    settings, study = study_copy
    chosen = [t.number for t in complete(study) if not t.user_attrs.get("baseline")][:2]
    code = main(["confirm", "tiny", "--results", settings.results, "--trials", ",".join(map(str, chosen)),
                 "--epochs", "1", "--quiet"])
    out = capsys.readouterr().out
    assert code == 0
    assert "Kendall τ-b: not computed (n=3 < 5" in out and "Spearman" not in out
    assert "confirmed Pareto front: trials" in out


def test_a_failing_run_is_recorded_and_the_others_finish_then_a_rerun_retries_it(study_copy, monkeypatch):
    settings, study = study_copy
    plan = make_plan(study, settings, spread=3, epochs=1)
    victim = plan.trials[0]
    real = confirm_mod.run_one

    def flaky(study_, settings_, plan_, number, seed, data_cfg):
        if number == victim:
            raise RuntimeError("loader exploded")
        return real(study_, settings_, plan_, number, seed, data_cfg)

    monkeypatch.setattr(confirm_mod, "run_one", flaky)
    run_confirm(study, settings, plan)
    assert set(followups(study, KIND)) == set(plan.trials) - {victim}
    assert (settings.trials_root / str(victim) / "confirm" / plan.key(0) / "traceback.txt").is_file()
    assert "confirmation runs failed" in show_study("tiny", results=settings.results)
    monkeypatch.setattr(confirm_mod, "run_one", real)
    run_confirm(study, settings, plan)
    assert set(followups(study, KIND)) == set(plan.trials)
    assert "confirmation runs failed" not in show_study("tiny", results=settings.results)


def test_a_claim_racing_another_hosts_claim_is_released(study_copy, monkeypatch):
    settings, study = study_copy
    plan = make_plan(study, settings, spread=3, epochs=1)
    first_task = plan.tasks()[0]
    rival = start_followup(study, first_task[0], KIND, plan.key(first_task[1]))  # another host claimed it first
    real, calls = confirm_mod.open_tasks, []

    def racing(study_, plan_, first=0):  # the first look is from before the rival's claim landed
        calls.append(first)
        left = real(study_, plan_, first)
        return [first_task, *left] if len(calls) == 1 else left

    monkeypatch.setattr(confirm_mod, "open_tasks", racing)
    number, seed, mine = claim_task(study, replace(settings, storage="sqlite:///elsewhere.db"), plan)
    assert (number, seed) != first_task  # it moved on to the next open run
    released = [t for t in confirm_records(study) if t.state == TrialState.FAIL]
    assert len(released) == 1 and released[0].user_attrs["fail_reason"].startswith("surplus")
    assert released[0].user_attrs[TARGET_KEY] == first_task[0]
    assert rival.number < released[0].number < mine.number


CLAIMER = """
import sys
import optuna
from nas.study import load_study, stored_settings
from nas.study.confirm import ConfirmPlan, claim_task
from nas.study.followups import finish_followup
optuna.logging.set_verbosity(optuna.logging.WARNING)
results, trials = sys.argv[1], tuple(int(n) for n in sys.argv[2].split(","))
study = load_study("tiny", results=results)
plan = ConfirmPlan(trials, 1, 64, tuple(range(8)))
while (claimed := claim_task(study, stored_settings(study, "tiny", None, results), plan)) is not None:
    finish_followup(study, claimed[2], {"map50_95": 0.0})  # no training: only the claiming races
"""


@pytest.mark.slow  # over 10 s (the not-slow suite aims at ~6 min on 2 cores)
def test_four_processes_claiming_at_once_never_take_one_run_twice(study_copy):
    # a run told COMPLETE between two reads of the claims once looked neither running nor done: claimed again
    settings, study = study_copy
    trials = [t.number for t in complete(study)]
    procs = [subprocess.Popen([sys.executable, "-c", CLAIMER, settings.results, ",".join(map(str, trials))])
             for _ in range(4)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0, 0, 0]
    records = confirm_records(load(settings))
    assert len(records) == 8 * len(trials)  # no surplus claim to release: the local lock made every claim unique
    assert all(t.state == TrialState.COMPLETE for t in records)


@pytest.mark.slow  # over 10 s (the not-slow suite aims at ~6 min on 2 cores)
def test_two_workers_never_run_the_same_confirmation_twice(study_copy):
    settings, study = study_copy
    out = subprocess.run([sys.executable, "-m", "nas.cli", "confirm", "tiny", "--results", settings.results,
                          "--spread", "6", "--epochs", "1", "--seeds", "0", "1", "--workers", "2", "--quiet"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    plan = ConfirmPlan.from_dict({"trials": select_trials(study, spread=6), "epochs": 1, "imgsz": 64,
                                  "seeds": [0, 1]})
    records = confirm_records(load(settings))
    claimed = [(t.user_attrs[TARGET_KEY], t.user_attrs[KEY_KEY]) for t in records]
    diagnosis = [(t.number, t.user_attrs[TARGET_KEY], t.user_attrs[KEY_KEY], t.state.name, t.user_attrs.get("pid"),
                  t.user_attrs.get("fail_reason")) for t in records]
    assert sorted(claimed) == sorted((n, plan.key(s)) for n, s in plan.tasks()), (diagnosis, out.stdout)
    assert all(t.state == TrialState.COMPLETE for t in records)
    ran = [line for line in out.stdout.splitlines() if ": mAP50-95" in line]
    assert len(ran) == len(plan.tasks())  # each reported once, by a worker process (which one: who claimed first)
    assert {line.split("]")[0] for line in ran} <= {"[worker 0", "[worker 1"}


@pytest.mark.slow  # over 10 s (the not-slow suite aims at ~6 min on 2 cores)
def test_killed_during_a_confirmation_then_rerun_loses_nothing(study_copy):
    settings, study = study_copy
    cmd = [sys.executable, "-u", "-m", "nas.cli", "confirm", "tiny", "--results", settings.results,
           "--spread", "5", "--epochs", "3", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:  # kill while the second run trains, after the first one was recorded
        if ": mAP50-95" in line:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    before = followups(load(settings), KIND)
    assert len(before) == 1
    (number, runs), = before.items()
    kept = next(iter(runs.values()))
    running = [t for t in confirm_records(load(settings)) if t.state == TrialState.RUNNING]
    assert len(running) <= 1  # the one it was training (unless the kill came between two runs)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    after = followups(load(settings), KIND)
    plan = ConfirmPlan.from_dict({"trials": select_trials(study, spread=5), "epochs": 3, "imgsz": 64,
                                  "seeds": [0]})
    assert set(after) == set(plan.trials)
    assert after[number] == runs  # the run finished before the kill is kept as it was, files and all
    for entry in kept["files"].values():
        assert sha256_of(settings.trials_root / entry["path"]) == entry["sha256"]
    records = confirm_records(load(settings))
    assert not [t for t in records if t.state == TrialState.RUNNING]
    assert len([t for t in records if t.state == TrialState.FAIL]) == len(running)  # the killed one, as stale
    assert sum(t.state == TrialState.COMPLETE for t in records) == len(plan.tasks())


def test_confirm_bad_input_is_one_line_with_exit_2(study_copy, capsys):
    settings, _ = study_copy
    assert main(["confirm", "nosuch", "--results", settings.results]) == 2
    assert "no study 'nosuch'" in capsys.readouterr().err
    assert main(["confirm", "tiny", "--results", settings.results, "--trials", "99"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--trials 99" in err
    with pytest.raises(SystemExit) as exc:
        main(["confirm", "tiny", "--results", settings.results, "--epochs", "5", "--factor", "2"])
    assert exc.value.code == 2
    assert not list(companion(load(settings)).get_trials())  # nothing was written
