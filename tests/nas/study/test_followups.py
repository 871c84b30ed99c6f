"""Results added after a trial finished: a companion study of follow-up trials, safe under concurrent writers."""

from __future__ import annotations

import subprocess
import sys

import optuna
import pytest
from optuna.trial import TrialState

from nas.study import StudySettings, storage_for
from nas.study.followups import (
    add_result,
    companion,
    fail_followup,
    finish_followup,
    followups,
    start_followup,
)
from nas.study.leases import host_id, recover_stale_trials
from nas.study.settings import StudyError

WRITER = """
import sys, time
from pathlib import Path
import optuna
from nas.study import StudySettings, storage_for
from nas.study.followups import add_result
name, results, tag, n, go = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), Path(sys.argv[5])
optuna.logging.set_verbosity(optuna.logging.WARNING)
study = optuna.load_study(study_name=name, storage=storage_for(StudySettings(name=name, results=results)))
while not go.exists():  # both writers start together
    time.sleep(0.01)
for k in range(n):
    add_result(study, k % 3, "confirm", f"{tag}-{k}", {"writer": tag, "k": k})
"""


@pytest.fixture
def finished_study(tmp_path) -> optuna.Study:
    """A journal study (the default storage) with three COMPLETE trials."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    settings = StudySettings(name="f", results=str(tmp_path / "results"))
    study = optuna.create_study(study_name="f", storage=storage_for(settings), directions=["maximize", "minimize"])
    for k in range(3):
        trial = study.ask()
        study.tell(trial, [0.1 * k, 10.0 + k])
    return study


def test_optuna_refuses_writes_to_a_finished_trial(finished_study):
    """Why the mechanism exists: a COMPLETE trial's attrs cannot be written any more."""
    frozen = finished_study.trials[0]
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        finished_study._storage.set_trial_user_attr(frozen._trial_id, "confirm", 1)


def test_a_result_lands_on_its_trial_and_is_mirrored_as_one_study_attr(finished_study):
    add_result(finished_study, 1, "confirm", "epochs=40,seed=0", {"map50_95": 0.31})
    add_result(finished_study, 1, "confirm", "epochs=40,seed=1", {"map50_95": 0.29})
    add_result(finished_study, 2, "latency", "cpu", {"median_ms": 3.2})
    assert followups(finished_study, "confirm") == {1: {"epochs=40,seed=0": {"map50_95": 0.31},
                                                        "epochs=40,seed=1": {"map50_95": 0.29}}}
    assert followups(finished_study)[2] == {"latency:cpu": {"median_ms": 3.2}}
    attrs = optuna.load_study(study_name="f", storage=finished_study._storage).user_attrs
    assert attrs["followup:confirm:1:epochs=40,seed=1"] == {"map50_95": 0.29}
    assert attrs["followup:latency:2:cpu"] == {"median_ms": 3.2}
    assert finished_study.trials[1].state == TrialState.COMPLETE  # the trial itself is untouched
    assert "f:followups" in [s.study_name for s in optuna.get_all_study_summaries(finished_study._storage)]


def test_a_later_result_for_the_same_key_wins_and_a_failed_one_is_not_a_result(finished_study):
    add_result(finished_study, 0, "confirm", "k", {"v": 1})
    add_result(finished_study, 0, "confirm", "k", {"v": 2})
    failed = start_followup(finished_study, 0, "confirm", "other")
    fail_followup(finished_study, failed, "diverged")
    assert followups(finished_study, "confirm") == {0: {"k": {"v": 2}}}


def test_followups_need_a_finished_target_and_plain_names(finished_study):
    with pytest.raises(StudyError, match="no finished trial 7"):
        start_followup(finished_study, 7, "confirm", "k")
    finished_study.ask()  # trial 3, RUNNING
    with pytest.raises(StudyError, match="no finished trial 3"):
        start_followup(finished_study, 3, "confirm", "k")
    with pytest.raises(StudyError, match="without ':'"):
        start_followup(finished_study, 0, "con:firm", "k")
    assert followups(finished_study) == {}


def test_a_followup_whose_worker_died_is_recovered_as_stale(finished_study):
    trial = start_followup(finished_study, 0, "confirm", "long")
    assert trial.user_attrs["host"] == host_id()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    trial.set_user_attr("pid", dead.pid)  # its worker is gone
    assert recover_stale_trials(companion(finished_study)) == [trial.number]
    frozen = companion(finished_study).trials[trial.number]
    assert frozen.state == TrialState.FAIL and frozen.user_attrs["fail_reason"] == "stale: worker died"
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):  # the dead worker's late result is refused
        finish_followup(finished_study, trial, {"late": True})
    assert followups(finished_study) == {}


def test_two_processes_adding_results_concurrently_lose_none(finished_study, tmp_path):
    n, go = 15, tmp_path / "go"
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, "f", str(tmp_path / "results"), tag, str(n), str(go)])
               for tag in ("a", "b")]
    go.touch()
    assert [w.wait(timeout=300) for w in writers] == [0, 0]
    results = followups(finished_study, "confirm")
    keys = {key for per_trial in results.values() for key in per_trial}
    assert keys == {f"{tag}-{k}" for tag in "ab" for k in range(n)}  # 30 results, none lost
    assert results[1]["b-4"] == {"writer": "b", "k": 4}
    mirrored = [k for k in optuna.load_study(study_name="f", storage=finished_study._storage).user_attrs
                if k.startswith("followup:confirm:")]
    assert len(mirrored) == 2 * n  # one study attr per key: no writer overwrote another's


def test_a_claim_is_one_journal_record_holding_its_target_key_and_lease(finished_study, tmp_path):
    # a process killed between creating a follow-up and naming it once left a RUNNING trial with no target and no
    # lease: invisible to the confirm claims and never recovered as stale
    journal = tmp_path / "results" / "f" / "study.log"
    companion(finished_study)  # created on first use: not part of the claim
    before = journal.read_bytes().count(b"\n")
    trial = start_followup(finished_study, 1, "confirm", "epochs=4,seed=0")
    assert journal.read_bytes().count(b"\n") == before + 1
    attrs = companion(finished_study).trials[trial.number].user_attrs
    assert {"followup_target", "followup_kind", "followup_key", "host", "pid", "heartbeat"} <= set(attrs)
