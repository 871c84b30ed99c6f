"""SIGKILL at seeded random moments of a study, then resume: no finished trial is lost or changed, none stays
RUNNING, every recorded file matches its sha256, and the Pareto files agree with the study.

Each run starts a fresh tiny study (3 trials, 1 epoch at 64 px), runs `repnas search` under
tests/reliability/_killpoint.py, which SIGKILLs the process on the Nth entry to one phase (build, latency, training,
evaluation, fusing, between trials, writing the Pareto files, writing weights.pt), then resumes it with
`repnas search --study NAME`. The (phase, N) pairs come from a fixed seed and cover every phase.

Two more phases hit the journal file study.log on the Nth append: `journal-torn` writes the first half of the
append's record to the real file, fsyncs and dies (the resume must move the torn record aside, keep it, and lose
nothing complete before it); `journal-full` makes the append's write fail with ENOSPC after half its bytes (the run
must end with one line, exit 2, the write undone). Their N come from their own seeded draw, so the first 12 runs
stay what they were.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

import nas.study
from nas.cli import main
from nas.study import StudySettings, counts, prepare_study
from tests.nas.conftest import assets, settings  # noqa: F401  (fixtures: tiny space, data, baseline)
from tests.reliability._killpoint import JOURNAL_PHASES, PHASES

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SEED = 6
RUNS = 12
TRIALS = 3
# Entries to each phase in a 3-trial run of the tiny study (2 training steps per epoch, 5 Pareto files per export;
# claim_trial is entered once per trial): the Nth is drawn from 1..this, so every run dies where it was told to.
ENTRIES = {"build": 3, "latency": 3, "training": 6, "evaluation": 3, "fusing": 3, "between-trials": 3,
           "pareto": 15, "weights": 3,
           # appends to study.log by the main thread: 106 in a 3-trial run of the tiny study (a margin kept)
           "journal-torn": 100, "journal-full": 100}
JOURNAL_RUNS = 4  # each journal phase twice


def kill_plan(seed: int = SEED, runs: int = RUNS) -> list[tuple[str, int]]:
    """`runs` seeded (phase, occurrence) pairs: every phase once in a shuffled order, then phases drawn at random."""
    rng = random.Random(seed)
    phases = list(PHASES)
    rng.shuffle(phases)
    phases += [rng.choice(PHASES) for _ in range(runs - len(PHASES))]
    return [(phase, rng.randint(1, ENTRIES[phase])) for phase in phases]


def journal_plan(seed: int = SEED, runs: int = JOURNAL_RUNS) -> list[tuple[str, int]]:
    """`runs` seeded (journal phase, occurrence) pairs, the journal phases in turn."""
    rng = random.Random(seed + 1)
    return [(JOURNAL_PHASES[i % len(JOURNAL_PHASES)], rng.randint(1, ENTRIES[JOURNAL_PHASES[0]])) for i in range(runs)]


IN_TRIAL = {"build", "latency", "training", "evaluation", "fusing", "weights"}  # a trial is RUNNING at the kill
PLAN = kill_plan() + journal_plan()
DONE: list[dict] = []  # one entry per run that got through its checks' counting


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _load(study: StudySettings) -> optuna.Study:
    return optuna.load_study(study_name=study.name, storage=nas.study.storage_for(study, create=False))


def _pareto_rows(folder: Path) -> tuple[dict[int, tuple[float, float]], dict[int, tuple[float, float]]]:
    """(trial -> (mAP50-95, latency_ms)) as pareto.csv and pareto.json in `folder` give them."""
    with open(folder / "pareto.csv", newline="") as f:
        from_csv = {int(row["trial"]): (float(row["map50_95"]), float(row["latency_ms"])) for row in csv.DictReader(f)}
    document = json.loads((folder / "pareto.json").read_text())
    from_json = {row["trial"]: (row["map50_95"], row["latency_ms"]) for row in document["trials"]}
    assert document["header"]["n_trials"] == len(document["trials"])
    return from_csv, from_json


def test_the_plan_hits_every_phase():
    assert len(PLAN) >= 14 and {phase for phase, _ in PLAN} == set(PHASES + JOURNAL_PHASES)
    assert PLAN[:12] == kill_plan()  # the journal runs came after: the first 12 draws are unchanged
    assert all(1 <= n <= ENTRIES[phase] for phase, n in PLAN)


@pytest.mark.parametrize(("phase", "occurrence"), PLAN, ids=[f"{p}-{n}" for p, n in PLAN])
def test_sigkill_then_resume_loses_nothing(phase, occurrence, settings, tmp_path, capsys, reliability_report):  # noqa: F811
    results = tmp_path / "results"
    settings, _ = prepare_study(replace(settings, results=str(results)))
    marker = tmp_path / "killed-at"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
    proc = subprocess.run([sys.executable, "-m", "tests.reliability._killpoint", phase, str(occurrence), str(marker),
                           "--", "search", "--study", settings.name, "--results", str(results), "--quiet"],
                          env=env, capture_output=True, text=True, timeout=300)
    journal = results / settings.name / "study.log"
    if phase == "journal-full":  # not killed: the product undid the write and ended with one line
        assert proc.returncode == 2, f"rc {proc.returncode} at {phase} {occurrence}:\n{proc.stderr[-3000:]}"
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"repnas search: error: {journal}: could not append to the "
                                                       "study journal: No space left on device"), proc.stderr[-3000:]
        name = settings.name
        assert (f"run `repnas resume {name}` or, for a confirmation, the same `repnas confirm {name} ...` again (the "
                "partial record was undone") in lines[0], lines[0]
        assert journal.read_bytes().endswith(b"\n")
    else:
        assert proc.returncode == -9, \
            f"rc {proc.returncode}, not SIGKILL at {phase} {occurrence}:\n{proc.stderr[-3000:]}"
    assert marker.read_text() == f"{phase} {occurrence}\n"
    torn_before = journal.read_bytes()[journal.read_bytes().rfind(b"\n") + 1:]
    assert bool(torn_before) == (phase == "journal-torn")  # a half record without its newline, before the resume

    before = _load(settings).trials  # a reader ignores the torn last line
    finished = {t.number: (t.state, t.values, t.user_attrs.get("files")) for t in before if t.state.is_finished()}
    running = [t.number for t in before if t.state == TrialState.RUNNING]
    if phase in JOURNAL_PHASES:  # the append may have been a trial's (it is then RUNNING) or the study's
        assert len(running) <= 1
    else:
        assert len(running) == (phase in IN_TRIAL)

    assert main(["search", "--study", settings.name, "--results", str(results), "--quiet"]) == 0
    capsys.readouterr()
    after = _load(settings).trials
    lost = sum(number >= len(after) or (after[number].state, after[number].values, after[number].user_attrs.get(
        "files")) != kept for number, kept in finished.items())
    left_running = sum(t.state == TrialState.RUNNING for t in after)
    # a kill mid-write leaves its temp file (.NAME.*.tmp) beside the real one, which it never touched: counted
    temps = len(list(results.rglob(".*.tmp")))
    torn = sorted(journal.parent.glob("study.log.torn-*"))
    DONE.append({"phase": phase, "lost": lost, "running": left_running, "temps": temps,
                 "torn": len(torn) if phase == "journal-torn" and [p.read_bytes() for p in torn] == [torn_before]
                 else 0, "one_line": phase == "journal-full"})
    journal_runs = sum(p in JOURNAL_PHASES for p, _ in PLAN)
    reliability_report("kill/resume", f"{len(DONE)}/{len(PLAN)} runs, {len({d['phase'] for d in DONE})} phases hit, "
                                      f"{sum(d['lost'] for d in DONE)} finished trials lost, "
                                      f"{sum(d['running'] for d in DONE)} left RUNNING, "
                                      f"{sum(d['temps'] for d in DONE)} half-written temp files left behind; "
                                      f"journal ({journal_runs} of the runs): {sum(d['torn'] for d in DONE)} torn "
                                      f"records moved aside and kept, {sum(d['one_line'] for d in DONE)} full-disk "
                                      "appends undone and ended in one line")
    assert lost == 0 and left_running == 0
    assert sum(counts(t) for t in after) == TRIALS
    assert [p.read_bytes() for p in torn] == ([torn_before] if phase == "journal-torn" else [])
    for number in running:  # the killed process's trial: failed as stale, its Arch tried again
        assert after[number].state == TrialState.FAIL
        assert after[number].user_attrs["fail_reason"] == "stale: worker died"
        killed = before[number]  # a journal kill can come before its Arch was sampled: nothing to try again then
        if killed.user_attrs.get("arch") or killed.params or killed.system_attrs.get("fixed_params"):
            assert [t.number for t in after if t.user_attrs.get("requeued_from") == number]
        else:
            assert phase in JOURNAL_PHASES and not [t for t in after if t.user_attrs.get("requeued_from") == number]

    trials_root = results / settings.name / "trials"
    complete = {t.number: t for t in after if t.state == TrialState.COMPLETE}
    for t in complete.values():
        for name, entry in t.user_attrs["files"].items():
            assert _sha(trials_root / entry["path"]) == entry["sha256"], (t.number, name)

    from_csv, from_json = _pareto_rows(results / settings.name)
    values = {number: tuple(t.values) for number, t in complete.items()}
    for rows in (from_csv, from_json):
        assert rows.keys() == values.keys() and all(rows[n] == pytest.approx(values[n]) for n in values)
