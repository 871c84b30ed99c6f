"""Parallel load: `repnas search --workers 4 --trials 24` (the real CLI, a subprocess) on a tiny study, against
(a) the default local storage (the journal file results/NAME/study.log) and (b) a real PostgreSQL server.

Each run must end with exactly 24 counted trials, each claimed, run and reported by one worker process (all 4
used), no Arch trained twice, no failed or left-over RUNNING trial, and no lock error anywhere in the output.

The PostgreSQL case reads its server from REPNAS_TEST_POSTGRES (an SQLAlchemy URL; `.ci/run` starts a server and
sets it). Without it the test skips, saying how to run it; in CI (CI=true) it fails instead, so a CI that lost its
server cannot pass by skipping.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from nas.study import counts, load_study, prepare_study
from tests.studyfixtures import make_tiny_assets, tiny_settings

WORKERS, TRIALS = 4, 24
# 4^5 = 1024 Archs: two workers rarely sample the same one, and when they do the product must reject one of them
SPACE = {
    "imgsz": 64, "nc": 2,
    "stages": {name: {"depth": [1, 2], "width": [8, 16], "se": False} for name in ("P1", "P2", "P3", "P4", "P5")},
    "head": {"width": [0.25], "depth": [1]},
}
LOCK_ERRORS = re.compile(r"database is locked|OperationalError|deadlock|lock timeout|could not obtain lock|"
                         r"LockTimeout|StorageInternalError|heartbeat of trial id \S+ failed", re.IGNORECASE)
TRIAL_LINE = re.compile(r"^\[worker (\d+)\] trial +(\d+) ([A-Z]+) ", re.MULTILINE)
HOW_TO_RUN_POSTGRES = (
    "set REPNAS_TEST_POSTGRES to the SQLAlchemy URL of a PostgreSQL database to run it (the test adds and deletes "
    "its own uniquely named study). `.ci/run` does this "
    "(as root on Debian it installs and starts a server). By hand, on Debian/Ubuntu:\n"
    "  sudo apt-get install postgresql\n"
    "  sudo -u postgres psql -c \"CREATE ROLE repnas_test LOGIN PASSWORD 'test'\"\n"
    "  sudo -u postgres createdb --owner repnas_test repnas_test\n"
    "  pip install -e \".[dev,onnx,postgres]\"\n"
    "  REPNAS_TEST_POSTGRES=postgresql+psycopg2://repnas_test:test@127.0.0.1:5432/repnas_test "
    "pytest tests/reliability/test_parallel.py"
)


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    return make_tiny_assets(tmp_path_factory.mktemp("parallel-assets"), images=10, space=SPACE)


def _postgres_url() -> str:
    """REPNAS_TEST_POSTGRES with its driver importable; otherwise a skip (a failure in CI) saying how to run it."""
    url = os.environ.get("REPNAS_TEST_POSTGRES")
    problem = None
    if not url:
        problem = "REPNAS_TEST_POSTGRES is not set"
    else:
        try:
            import psycopg2  # noqa: F401
        except ImportError:
            problem = "the PostgreSQL driver psycopg2 is not installed (the `postgres` extra)"
    if problem is None:
        return url
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true: the PostgreSQL parallel-load test must run in CI, but {problem}; {HOW_TO_RUN_POSTGRES}",
                    pytrace=False)
    pytest.skip(f"{problem}: {HOW_TO_RUN_POSTGRES}")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _run_parallel(assets, tmp_path: Path, monkeypatch, name: str, storage: str | None) -> dict:
    """Create the tiny study in this process (latency: no warmup, 2 iterations, which the CLI does not expose),
    then let `repnas search --workers 4 --trials 24` run all its trials; return what the checks need."""
    monkeypatch.setenv("REPNAS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    settings = tiny_settings(assets, name=name, storage=storage, trials=TRIALS, early_stop={"enabled": False})
    prepare_study(settings)
    argv = [sys.executable, "-m", "nas.cli", "search", "--study", name, "--workers", str(WORKERS), "--trials",
            str(TRIALS), "--quiet"] + (["--storage", storage] if storage else [])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    start = time.monotonic()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()  # its workers die with it (parent-death signal)
            proc.communicate()
    seconds = time.monotonic() - start
    output = stdout + stderr
    study = load_study(name, storage=storage)
    return {"proc": proc, "output": output, "seconds": seconds, "trials": study.get_trials(deepcopy=True),
            "trials_root": tmp_path / "results" / name / "trials"}


def _check(run: dict, label: str, reliability_report) -> None:
    """Record the run's count line, then assert every claim the line makes (and the rest of the contract)."""
    proc, output, trials = run["proc"], run["output"], run["trials"]
    counted = [t for t in trials if counts(t)]
    lock_errors = LOCK_ERRORS.findall(output)
    reported = defaultdict(list)  # trial number -> the workers that reported finishing it
    for worker, number, _state in TRIAL_LINE.findall(output):
        reported[int(number)].append(int(worker))
    run_twice = sorted(n for n, workers in reported.items() if len(workers) > 1)
    archs = [json.dumps(t.user_attrs.get("arch"), sort_keys=True) for t in counted]
    surplus = sum(t.user_attrs.get("pruned_reason") == "surplus" for t in trials)
    duplicates = sum(t.user_attrs.get("pruned_reason") == "duplicate" for t in trials)
    reliability_report(
        f"parallel load ({label})",
        f"{WORKERS} workers, {len(set(archs))}/{TRIALS} distinct finished trials, "
        f"{len(lock_errors)} lock errors, {len(run_twice)} run twice ({len(trials)} trials in all: {surplus} surplus "
        f"claims released, {duplicates} duplicate Archs rejected; {run['seconds']:.0f} s)")

    assert proc.returncode == 0, output[-4000:]
    assert not lock_errors, output[-4000:]
    assert "Traceback" not in output, output[-4000:]
    assert len(counted) == TRIALS and len({t.number for t in counted}) == TRIALS
    assert len({t.number for t in trials}) == len(trials)  # no trial number handed out twice
    assert len(set(archs)) == TRIALS  # 24 distinct Archs trained: none trained twice
    assert not [t.number for t in trials if t.state in (TrialState.FAIL, TrialState.RUNNING)]
    completed = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(completed) == TRIALS  # early stopping is off: every counted trial ran to the end

    # one worker process per trial: the claimer's lease (pid) is the process that reported finishing it
    assert not run_twice, run_twice
    assert sorted(reported) == sorted(t.number for t in trials if t.user_attrs.get("pruned_reason") != "surplus"
                                      and t.state != TrialState.WAITING)
    pid_of_worker = defaultdict(set)
    for t in trials:
        if t.number in reported:
            pid_of_worker[reported[t.number][0]].add(t.user_attrs["pid"])
    assert sorted(pid_of_worker) == list(range(WORKERS))  # all 4 workers finished trials
    assert all(len(pids) == 1 for pids in pid_of_worker.values()), dict(pid_of_worker)
    pids = {next(iter(p)) for p in pid_of_worker.values()}
    assert len(pids) == WORKERS and proc.pid not in pids  # 4 worker processes, none of them the coordinator

    # each trial folder holds what its own trial recorded, written once (one "built" line in its trial.log)
    for t in completed:
        folder = run["trials_root"] / str(t.number)
        for entry in t.user_attrs["files"].values():
            assert _sha(run["trials_root"] / entry["path"]) == entry["sha256"], (t.number, entry)
        built = [line for line in (folder / "trial.log").read_text().splitlines() if " built " in line]
        assert len(built) == 1 and f"built {t.user_attrs['arch']}:" in built[0], (t.number, built)
    ran = {t.number for t in trials if "arch" in t.user_attrs}  # surplus claims never reach run_trial
    assert {int(p.name) for p in run["trials_root"].iterdir()} == ran


@pytest.mark.slow
def test_four_workers_on_the_local_journal_run_24_distinct_trials(assets, tmp_path, monkeypatch,
                                                                   reliability_report):
    run = _run_parallel(assets, tmp_path, monkeypatch, "parallel", storage=None)
    _check(run, "journal", reliability_report)
    assert not [t for t in run["trials"] if t.user_attrs.get("pruned_reason") == "surplus"]  # claims are locked


@pytest.mark.slow
def test_four_workers_on_postgresql_run_24_distinct_trials(assets, tmp_path, monkeypatch, reliability_report):
    url = _postgres_url()
    name = f"parallel-{uuid.uuid4().hex[:12]}"  # a fresh study in whatever database the URL names
    try:
        run = _run_parallel(assets, tmp_path, monkeypatch, name, storage=url)
        _check(run, "PostgreSQL", reliability_report)
    finally:
        with contextlib.suppress(KeyError):  # KeyError: never created (the run failed before it)
            optuna.delete_study(study_name=name, storage=url)
