"""Injected trial faults fail their trial with its reason, never the study, and `repnas show` counts them by reason.

One tiny study (3 trials that count, 1 epoch at 64 px) runs in this process. Trials 1..5 are five distinct
enqueued Archs, and each gets one fault, injected through monkeypatch only while that trial runs:

    nan      the training loss becomes NaN (fit raises TrainingDiverged)
    loader   the dataset's __getitem__ raises (a corrupt image)
    oom      CUDA out of memory at every batch size: the half-batch retry fails as well
    build    the model fails to build
    disk     the disk fills while weights.pt is written (ENOSPC from the atomic write; no partial file is left)

Trial 6 diverges too, at its second batch: its message differs from trial 1's only in figures, and `repnas show`
counts the two as one reason ("2 x TrainingDiverged: loss became nan at epoch #, batch # ...").

The one-time OOM that succeeds at half the batch is tests/nas/study/test_trial.py's
test_cuda_out_of_memory_retries_once_at_half_the_batch.

Storage faults (the tests after it, counted under "storage faults"): a torn last journal record (Example C: moved
aside with one warning, the study resumed), a corrupt record in the middle of the journal, ENOSPC and EIO during an
append, permission denied on study.log, a PostgreSQL storage unreachable at start, a database lost during a run
(SQLite, and the real PostgreSQL server of REPNAS_TEST_POSTGRES), a database schema older than the installed Optuna.
Each ends in one stderr line without a traceback (exit 2) and leaves the study readable.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sqlite3
import subprocess
import sys
import uuid
from collections import Counter
from dataclasses import replace
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

import nas.data
import nas.files
import nas.study
import nas.train
from nas.cli import main
from nas.study import counts, prepare_study, run_search
from tests.nas.conftest import assets, settings  # noqa: F401  (fixtures: tiny space, data, baseline)
from tests.studyfixtures import BASELINE

# fault -> (trial number, the start of the trial's fail_reason)
FAULTS = {
    "nan": (1, "TrainingDiverged: loss became nan at epoch 1, batch 1"),
    "loader": (2, "OSError: image file is truncated: images/train/3.jpg"),
    "oom": (3, "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"),
    "build": (4, "ValueError: injected: this Arch does not build"),
    "disk": (5, f"OSError: [Errno {errno.ENOSPC}] {os.strerror(errno.ENOSPC)}"),
}
NAN_AGAIN = (6, "TrainingDiverged: loss became nan at epoch 1, batch 2")
TRIALS = 3
# what the "failed:" line of `repnas show` says for each kind
SHOWN = {kind: f"1 x {reason}" for kind, (_, reason) in FAULTS.items()} | {
    "nan": "2 x TrainingDiverged: loss became nan at epoch #, batch # (box/obj/cls [#, #, #])"}


class _FullDisk:
    """A file whose write stores the first half of the data, then fails as a full disk does."""

    def __init__(self, f, folder: Path, seen_temp: list[Path]):
        self._f, self._folder, self._seen = f, folder, seen_temp

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()

    def write(self, data: bytes) -> int:
        self._f.write(data[: len(data) // 2])
        self._f.flush()
        self._seen.extend(self._folder.glob(".weights.pt.*.tmp"))  # the temp file exists now, half written
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_each_fault_fails_its_trial_with_its_reason_and_the_study_finishes(settings, monkeypatch, capsys,  # noqa: F811
                                                                           reliability_report):
    settings, study = prepare_study(replace(settings, trials=TRIALS, max_failures=10))
    stages = ("P1", "P2", "P3", "P4", "P5", "P1 P2")
    for widened in stages:  # trials 1..6: distinct Archs, so no fault trial is rejected as a duplicate
        study.enqueue_trial(dict(BASELINE, **{f"{stage}_width": 16 for stage in widened.split()}),
                            user_attrs={"enqueued": True})
    target = {kind: number for kind, (number, _) in FAULTS.items()}
    current: list[int | None] = [None]  # the trial run_trial is running

    real_run_trial = nas.study.run.run_trial

    def run_trial(trial, *args):
        current[0] = trial.number
        try:
            return real_run_trial(trial, *args)
        finally:
            current[0] = None

    losses: Counter = Counter()  # loss calls per trial

    class FaultyLoss(nas.train.DetectionLoss):
        def __call__(self, preds, targets):
            losses[current[0]] += 1
            if current[0] == target["oom"]:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            loss, items = super().__call__(preds, targets)
            diverges = current[0] == target["nan"] or (current[0] == NAN_AGAIN[0] and losses[current[0]] == 2)
            return (loss * float("nan"), items) if diverges else (loss, items)

    real_getitem = nas.data.YoloDataset.__getitem__

    def getitem(self, i):
        if current[0] == target["loader"]:
            raise OSError("image file is truncated: images/train/3.jpg")
        return real_getitem(self, i)

    real_build = nas.study.trial.build_model

    def build_model(*args, **kwargs):
        if current[0] == target["build"]:
            raise ValueError("injected: this Arch does not build")
        return real_build(*args, **kwargs)

    real_fit, oom_batches = nas.study.trial.fit, []

    def fit(model, data, cfg, callbacks=()):
        if current[0] == target["oom"]:
            oom_batches.append(cfg.batch)
        return real_fit(model, data, cfg, callbacks)

    real_write, temp_seen = nas.study.trial.write_bytes_atomic, []

    def write_bytes_atomic(path, data):
        if current[0] != target["disk"] or Path(path).name != "weights.pt":
            return real_write(path, data)
        real_fdopen = os.fdopen
        with monkeypatch.context() as m:  # only this write's file is on the full disk
            m.setattr(os, "fdopen", lambda fd, *a, **k: _FullDisk(real_fdopen(fd, *a, **k), Path(path).parent,
                                                                            temp_seen))
            return real_write(path, data)

    monkeypatch.setattr(nas.study.run, "run_trial", run_trial)
    monkeypatch.setattr(nas.train, "DetectionLoss", FaultyLoss)
    monkeypatch.setattr(nas.data.YoloDataset, "__getitem__", getitem)
    monkeypatch.setattr(nas.study.trial, "build_model", build_model)
    monkeypatch.setattr(nas.study.trial, "fit", fit)
    monkeypatch.setattr(nas.study.trial, "write_bytes_atomic", write_bytes_atomic)

    lines: list[str] = []
    study = run_search(settings, report=lines.append)  # no fault escapes: the study runs to its count
    trials = optuna.load_study(study_name=settings.name, storage=nas.study.storage_for(settings)).trials
    assert sum(counts(t) for t in trials) == TRIALS
    assert not [t for t in trials if t.state == TrialState.RUNNING]

    def failed_with(number: int, reason: str) -> bool:
        t = trials[number]
        return t.state == TrialState.FAIL and str(t.user_attrs.get("fail_reason", "")).startswith(reason)

    failed_right = [kind for kind, (number, reason) in FAULTS.items() if failed_with(number, reason)]
    assert main(["show", settings.name]) == 0
    screen = capsys.readouterr().out
    failed_line = next((line for line in screen.splitlines() if line.startswith("  failed: ")), "")
    shown = [kind for kind, text in SHOWN.items() if text in failed_line]
    reliability_report("faults", f"injected faults: {len(failed_right)}/{len(FAULTS)} kinds FAILED with their reason, "
                                 f"study finished ({sum(counts(t) for t in trials)} of {TRIALS} counted), show counts "
                                 f"{len(shown)} reasons")
    assert failed_right == list(FAULTS), [(t.number, t.state.name, t.user_attrs.get("fail_reason")) for t in trials]
    assert failed_with(*NAN_AGAIN)
    assert shown == list(FAULTS) and failed_line.count(" x ") == len(FAULTS), screen  # 6 failures, 5 reasons
    assert f"{len(FAULTS) + 1} FAIL" in screen and f"{TRIALS} of {TRIALS} counted" in screen
    assert all(f"trial {n:>4} FAIL" in "\n".join(lines) for n, _ in [*FAULTS.values(), NAN_AGAIN])
    assert study.trials[0].state == TrialState.COMPLETE  # the baseline before the faults

    # the OOM trial tried its batch and half of it; the message names the retry
    assert oom_batches == [8, 4]
    assert trials[target["oom"]].user_attrs["oom_retry"] == "CUDA out of memory at batch 8; retried at batch 4"
    # the full disk: the temp file existed half written, and neither it nor a weights.pt is left
    folder = nas.study.trial_folder(settings, target["disk"])
    assert len(temp_seen) == 1 and temp_seen[0].parent == folder and temp_seen[0].name.startswith(".weights.pt.")
    assert sorted(p.name for p in folder.iterdir() if "weights" in p.name) == []
    assert "weights.pt" not in trials[target["disk"]].user_attrs["files"]
    for kind in ("nan", "loader", "oom", "build", "disk"):  # each failure left its traceback for the user
        assert (nas.study.trial_folder(settings, target[kind]) / "traceback.txt").is_file()


# Storage faults: the study's journal file and database storages. Each ends in one stderr line (exit 2, no traceback)
# and leaves the study readable; the runs go on with `repnas resume`. Unit tests: tests/nas/study/test_journal.py.
STORAGE_KINDS = ("torn last record", "corrupt record", "ENOSPC during an append", "EIO during an append",
                 "permission denied", "PostgreSQL unreachable at start", "database lost mid-run (SQLite)",
                 "database lost mid-run (PostgreSQL)", "older database schema")
HANDLED: dict[str, bool] = {}  # kind -> its checks held (one line, exit 2, no traceback, study readable after)
# A database that goes away while the first trial trains: every SQL statement fails from then on, as when the server
# is stopped. Run as `python -c LOSE_DATABASE repnas-args...` (the product holds no test hooks).
LOSE_DATABASE = """
import sys

import sqlalchemy
import sqlalchemy.event
import sqlalchemy.exc

import nas.study.trial
from nas.cli import main

down = []
real_fit = nas.study.trial.fit


def fit(*args, **kwargs):
    down.append(True)
    return real_fit(*args, **kwargs)


@sqlalchemy.event.listens_for(sqlalchemy.engine.Engine, "before_cursor_execute")
def lost(*args):
    if down:
        raise sqlalchemy.exc.OperationalError("SELECT", {}, ConnectionResetError("server closed the connection"))


nas.study.trial.fit = fit
sys.exit(main(sys.argv[1:]))
"""


def _handled(reliability_report, kind: str, ok: bool) -> None:
    HANDLED[kind] = ok
    missing = [k for k in STORAGE_KINDS if k not in HANDLED]
    reliability_report("storage faults", f"{sum(HANDLED.values())}/{len(STORAGE_KINDS)} kinds handled without a "
                                         "traceback, the study readable after (a torn record moved aside with one "
                                         "warning and the study resumed; the others one stderr line, exit 2)" +
                       (f"; not run here: {', '.join(missing)}" if missing else ""))


def _cli(args: list[str], capsys) -> tuple[int, list[str]]:
    """`repnas ARGS` in this process: (exit code, its stderr lines)."""
    capsys.readouterr()
    code = main(args)
    return code, capsys.readouterr().err.strip().splitlines()


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=300)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow  # over 10 s (the not-slow suite aims at ~6 min on 2 cores)
def test_a_torn_last_record_is_moved_aside_and_the_study_resumes(settings, tmp_path, capsys,  # noqa: F811
                                                                  reliability_report):
    """Example C: a 1-trial study whose last journal line is cut to 60 bytes without a newline; `repnas resume`."""
    settings, _ = prepare_study(replace(settings, trials=1))
    assert _run(["-m", "nas.cli", "search", "--study", "tiny", "--quiet"], tmp_path).returncode == 0
    journal = tmp_path / "results" / "tiny" / "study.log"
    lines = journal.read_bytes().splitlines(keepends=True)
    last = json.loads(lines[-1])
    assert (last["op_code"], last["trial_id"], last["state"]) == (6, 0, 1)  # trial 0 told COMPLETE: the last record
    journal.write_bytes(b"".join(lines[:-1]) + lines[-1][:60])
    assert _cli(["show", "tiny"], capsys)[0] == 0  # as before the fix: `show` reads it (and never repairs)
    assert not list(journal.parent.glob("study.log.torn-*"))

    resumed = _run(["-m", "nas.cli", "resume", "tiny", "--quiet"], tmp_path)
    torn = list(journal.parent.glob("study.log.torn-*"))
    rel = Path("results/tiny/study.log")
    warning = (f"{rel}: its last record (line {len(lines)}, 60 bytes without a newline) was cut off by a crash or a "
               f"full disk during a write; moved it to {rel.parent / torn[0].name if torn else '?'} and kept the "
               f"{len(lines) - 1} complete records before it")
    trials = optuna.load_study(study_name="tiny", storage=nas.study.storage_for(settings)).trials
    shown, exported = _cli(["show", "tiny"], capsys)[0], _cli(["export", "tiny"], capsys)[0]
    _handled(reliability_report, "torn last record", resumed.returncode == 0 and resumed.stderr.splitlines() == [
        warning] and len(torn) == 1 and (shown, exported) == (0, 0))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stderr.splitlines() == [warning]  # one warning line, and nothing else
    assert [p.read_bytes() for p in torn] == [lines[-1][:60]]  # kept beside the journal, byte for byte
    assert journal.read_bytes().startswith(b"".join(lines[:-1]))  # every record before it kept
    assert [(t.number, t.state) for t in trials] == [(0, TrialState.FAIL), (1, TrialState.COMPLETE)]
    assert trials[0].user_attrs["fail_reason"] == "stale: worker died"  # its COMPLETE was the torn record
    assert trials[1].user_attrs["requeued_from"] == 0 and trials[1].user_attrs["baseline"] is True
    assert sum(counts(t) for t in trials) == 1 and (shown, exported) == (0, 0)


def test_a_corrupt_record_is_one_line_naming_its_line_and_nothing_is_written(settings, tmp_path, capsys,  # noqa: F811
                                                                             reliability_report):
    prepare_study(replace(settings, trials=1))
    folder = tmp_path / "results" / "tiny"
    journal = folder / "study.log"
    lines = journal.read_bytes().splitlines(keepends=True)
    lines[5] = lines[5][:40] + b"\n"  # a record cut in the middle of the file
    journal.write_bytes(b"".join(lines))
    before = _snapshot(folder)
    rel = Path("results/tiny/study.log")
    outcomes = {command: _cli(args, capsys) for command, args in {
        "show": ["show", "tiny"], "export": ["export", "tiny"], "resume": ["resume", "tiny", "--quiet"],
        "search": ["search", "--study", "tiny", "--quiet"]}.items()}
    ok = {command: code == 2 and len(err) == 1 and err[0].startswith(
        f"repnas {command}: error: {rel}: line 6 is not a study journal record (invalid JSON at byte ")
        for command, (code, err) in outcomes.items()}
    _handled(reliability_report, "corrupt record", all(ok.values()) and _snapshot(folder) == before)
    assert all(ok.values()), outcomes
    assert outcomes["show"][1][0].endswith(f"`cp {rel} {rel}.bak && head -n 5 {rel}.bak > {rel}`, or restore {rel} "
                                           "from a backup")
    assert _snapshot(folder) == before  # nothing written, nothing moved aside


def _faulty_journal_writes(monkeypatch, journal: Path, code: int) -> None:
    """Every os.write to `journal` stores half its bytes, then fails with `code`."""
    target, real_write = os.stat(journal), os.write

    def write(fd, data):
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (target.st_dev, target.st_ino):
            return real_write(fd, data)
        real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "write", write)


@pytest.mark.parametrize(("code", "kind"), [(errno.ENOSPC, "ENOSPC during an append"),
                                            (errno.EIO, "EIO during an append")])
def test_a_full_disk_or_an_io_error_during_an_append_is_one_line_and_the_resume_finishes(
        settings, tmp_path, capsys, monkeypatch, reliability_report, code, kind):  # noqa: F811
    prepare_study(replace(settings, trials=1))
    journal = tmp_path / "results" / "tiny" / "study.log"
    before = journal.read_bytes()
    with monkeypatch.context() as m:
        _faulty_journal_writes(m, journal, code)
        failed, err = _cli(["resume", "tiny", "--quiet"], capsys)
    undone = journal.read_bytes() == before
    fix = ("free space on the disk of results/tiny" if code == errno.ENOSPC else
           "check the disk of results/tiny (the kernel log says more) and free space on it")
    expected = (f"repnas resume: error: results/tiny/study.log: could not append to the study journal: "
                f"{os.strerror(code)} [errno {code}]; {fix}, then run `repnas resume tiny` or, for a "
                "confirmation, the same `repnas confirm tiny ...` again (the partial record was undone; every record "
                "before it is intact)")
    resumed, _ = _cli(["resume", "tiny", "--quiet"], capsys)
    trials = optuna.load_study(study_name="tiny", storage=nas.study.storage_for(settings)).trials
    _handled(reliability_report, kind, failed == 2 and err == [expected] and undone and resumed == 0)
    assert (failed, err) == (2, [expected])
    assert undone  # the half-written record is gone: the journal is as it was
    assert resumed == 0 and sum(counts(t) for t in trials) == 1 and not list(journal.parent.glob("*.torn-*"))


def _deny(monkeypatch, path: Path, *, writing_only: bool) -> None:
    """os.open of `path` (for writing only, or at all) fails with EACCES, as for a file of another user (root, who
    runs CI, is refused nothing by file modes)."""
    real = os.open

    def deny(file, flags, *args, **kwargs):
        if Path(file).resolve() == path.resolve() and (not writing_only or flags & (os.O_WRONLY | os.O_RDWR)):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
        return real(file, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", deny)


def test_permission_denied_on_the_journal_is_one_line_and_nothing_is_written(settings, tmp_path,  # noqa: F811
                                                                             capsys, monkeypatch,
                                                                             reliability_report):
    prepare_study(replace(settings, trials=1))
    folder = tmp_path / "results" / "tiny"
    journal = folder / "study.log"
    before = _snapshot(folder)
    fix = f"give this user read and write access to {Path('results/tiny/study.log')} and its folder"
    with monkeypatch.context() as m:
        _deny(m, journal, writing_only=False)
        unreadable = _cli(["show", "tiny"], capsys)
    with monkeypatch.context() as m:
        _deny(m, journal, writing_only=True)
        read_only_show = _cli(["show", "tiny"], capsys)[0]
        read_only_resume = _cli(["resume", "tiny", "--quiet"], capsys)
    after = _snapshot(folder)
    shown = _cli(["show", "tiny"], capsys)[0]
    expected_show = ("repnas show: error: results/tiny/study.log: could not read the study journal: Permission "
                     f"denied [errno 13]; {fix}")
    expected_resume = ("repnas resume: error: results/tiny/study.log: could not open the study journal for writing: "
                       f"Permission denied [errno 13]; {fix}")
    _handled(reliability_report, "permission denied", unreadable[0] == 2 and len(unreadable[1]) == 1 and
             unreadable[1][0].startswith(expected_show) and read_only_show == 0 and read_only_resume[0] == 2 and
             len(read_only_resume[1]) == 1 and read_only_resume[1][0].startswith(expected_resume) and
             after == before and shown == 0)
    assert unreadable[0] == 2 and len(unreadable[1]) == 1 and unreadable[1][0].startswith(expected_show), unreadable
    assert read_only_show == 0  # reading needs no write access
    assert read_only_resume[0] == 2 and len(read_only_resume[1]) == 1, read_only_resume
    assert read_only_resume[1][0].startswith(expected_resume) and "then run `repnas resume tiny`" in \
        read_only_resume[1][0]
    assert after == before and shown == 0


def test_an_unreachable_postgresql_is_one_line_with_the_password_masked_and_writes_nothing(
        settings, tmp_path, capsys, reliability_report):  # noqa: F811
    url = "postgresql+psycopg2://repnas:s3cret@127.0.0.1:1/repnas"  # port 1: nothing listens there
    searched = _cli(["search", "--study", "pg", "--storage", url, "--data", settings.data, "--quiet"], capsys)
    shown = _cli(["show", "pg", "--storage", url], capsys)
    shown_url = "postgresql+psycopg2://repnas:***@127.0.0.1:1/repnas"
    ok = [code == 2 and len(err) == 1 and err[0].startswith(f"repnas {command}: error: storage {shown_url}: ") and
          "s3cret" not in err[0] for command, (code, err) in (("search", searched), ("show", shown))]
    _handled(reliability_report, "PostgreSQL unreachable at start", all(ok) and not (tmp_path / "results").exists())
    assert all(ok), (searched, shown)
    assert not (tmp_path / "results").exists()  # nothing written


@pytest.mark.parametrize("database", ["SQLite", "PostgreSQL"])
def test_a_database_lost_during_a_run_is_one_line_and_the_study_resumes(settings, tmp_path, capsys,  # noqa: F811
                                                                        reliability_report, database):
    if database == "PostgreSQL":
        from tests.reliability.test_parallel import _postgres_url

        url, name = _postgres_url(), f"lost-{uuid.uuid4().hex[:12]}"
    else:
        url, name = f"sqlite:///{tmp_path / 'study.db'}", "tiny"
    try:
        settings, _ = prepare_study(replace(settings, name=name, storage=url, trials=1))
        lost = _run(["-c", LOSE_DATABASE, "search", "--study", name, "--storage", url, "--quiet"], tmp_path)
        err = lost.stderr.strip().splitlines()
        expected = (f"repnas search: error: storage {nas.study.storage.mask_url(url)}: failed during the run "
                    "(ConnectionResetError: server closed the connection); the study keeps every write that completed "
                    "before. Once the database is reachable again, run the command again")
        shown = _cli(["show", name, "--storage", url], capsys)[0]
        resumed = _cli(["search", "--study", name, "--storage", url, "--quiet"], capsys)[0]
        trials = optuna.load_study(study_name=name, storage=url).trials
        _handled(reliability_report, f"database lost mid-run ({database})", lost.returncode == 2 and len(err) == 1
                 and err[0].startswith(expected) and shown == 0 and resumed == 0)
        assert lost.returncode == 2 and len(err) == 1 and err[0].startswith(expected), lost.stderr[-3000:]
        assert shown == 0 and resumed == 0
        assert trials[0].state == TrialState.FAIL and trials[0].user_attrs["fail_reason"] == "stale: worker died"
        assert sum(counts(t) for t in trials) == 1
    finally:
        if database == "PostgreSQL":
            with contextlib.suppress(KeyError):
                optuna.delete_study(study_name=name, storage=url)


def test_an_older_database_schema_is_one_line_naming_optuna_storage_upgrade(settings, tmp_path, capsys,  # noqa: F811
                                                                             reliability_report):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    prepare_study(replace(settings, storage=url, trials=1))
    with sqlite3.connect(tmp_path / "study.db") as db:  # as an Optuna 3.0 installation left it
        db.execute("UPDATE alembic_version SET version_num = 'v3.0.0.d'")
    outcomes = [_cli([*args, "--storage", url], capsys) for args in (["show", "tiny"], ["resume", "tiny", "--quiet"])]
    with sqlite3.connect(tmp_path / "study.db") as db:
        untouched = db.execute("SELECT version_num FROM alembic_version").fetchall() == [("v3.0.0.d",)] and \
            db.execute("SELECT COUNT(*) FROM trials").fetchone() == (1,)  # the enqueued baseline only
    hint = f"upgrade it with `optuna storage upgrade --storage {url}` and run again"
    upgraded = _run(["-c", "import sys; from optuna.cli import main; sys.exit(main())", "storage", "upgrade",
                     "--storage", url], tmp_path)  # the command the line names
    resumed = _cli(["resume", "tiny", "--storage", url, "--quiet"], capsys)[0]
    ok = [code == 2 and len(err) == 1 and err[0].endswith(hint) for code, err in outcomes]
    _handled(reliability_report, "older database schema", all(ok) and untouched and upgraded.returncode == 0 and
             resumed == 0)
    assert all(ok), outcomes
    assert outcomes[0][1][0] == (f"repnas show: error: storage {url}: its schema was set up by an older Optuna than "
                                 f"the installed {optuna.__version__}; back the database up, then {hint}")
    assert untouched
    assert upgraded.returncode == 0, upgraded.stderr[-2000:]
    assert resumed == 0
