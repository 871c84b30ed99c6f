"""The journal file and the storage errors (nas/study/journal.py, nas/study/storage.py): a torn last record is
ignored by readers and moved aside (kept) under the journal's lock by the next writer; a record complete but for its
newline is kept; a corrupt line is one error naming its line and the repair, with nothing written; a failed append
(full disk, I/O error) is undone; permission denied, an unreachable database, an older database schema and a
database lost during a run are each one StorageError naming the file or the URL (password masked) and the fix.

The CLI-level runs of the same faults (exit 2, one line, the study resumed) are in tests/reliability/test_faults.py.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import sqlite3
import subprocess
from pathlib import Path

import optuna
import pytest

import nas.study.journal
from nas.study import StudySettings, storage_for
from nas.study.journal import StorageError
from nas.study.storage import mask_url, storage_failure

NAME = "j"


def _settings(tmp_path: Path, **changes) -> StudySettings:
    return StudySettings(name=NAME, results=str(tmp_path / "results"), **changes)


def _journal(tmp_path: Path) -> Path:
    return tmp_path / "results" / NAME / "study.log"


def _make(tmp_path: Path, n: int = 5) -> Path:
    """A journal with a study and `n` study user attrs a0..a{n-1}, one record each; its path."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=storage_for(_settings(tmp_path)), study_name=NAME,
                                directions=["maximize", "minimize"])
    for i in range(n):
        study.set_user_attr(f"a{i}", i)
    return _journal(tmp_path)


def _attrs(tmp_path: Path, **kwargs) -> dict:
    return optuna.load_study(study_name=NAME, storage=storage_for(_settings(tmp_path), **kwargs)).user_attrs


def _torn(path: Path) -> list[Path]:
    return sorted(path.parent.glob("study.log.torn-*"))


def _lock_is_held(path: Path) -> bool:
    fd = os.open(path.with_name(path.name + ".flock"), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _cut_last_record(path: Path, keep: int) -> tuple[bytes, bytes]:
    """Cut the last line of `path` to its first `keep` bytes, no newline; return (the complete part, the cut)."""
    data = path.read_bytes()
    start = data.rstrip(b"\n").rfind(b"\n") + 1
    path.write_bytes(data[:start] + data[start:start + keep])
    return data[:start], data[start:start + keep]


def test_a_reader_ignores_a_torn_last_record_and_never_touches_the_file(tmp_path):
    path = _make(tmp_path)
    _cut_last_record(path, 20)
    before = path.read_bytes()
    assert _attrs(tmp_path, create=False) == {"a0": 0, "a1": 1, "a2": 2, "a3": 3}  # a4's record is the torn one
    assert path.read_bytes() == before and not _torn(path)  # `show` may see a live writer's partial line: no repair


def test_the_next_append_moves_a_torn_last_record_aside_under_the_lock_and_keeps_every_record_before(
        tmp_path, monkeypatch, caplog):
    path = _make(tmp_path)
    complete, cut = _cut_last_record(path, 20)
    held = []
    real = nas.study.journal.write_bytes_atomic
    monkeypatch.setattr(nas.study.journal, "write_bytes_atomic",
                        lambda *a: (held.append(_lock_is_held(path)), real(*a))[1])
    study = optuna.load_study(study_name=NAME, storage=storage_for(_settings(tmp_path)))
    with caplog.at_level(logging.WARNING, logger="repnas.study"):
        study.set_user_attr("after", 1)
    (aside,) = _torn(path)
    assert held == [True]  # moved aside while holding the journal's write lock
    assert aside.read_bytes() == cut and aside.name.startswith("study.log.torn-")
    assert path.read_bytes().startswith(complete) and path.read_bytes().count(b"\n") == complete.count(b"\n") + 1
    assert _attrs(tmp_path) == {"a0": 0, "a1": 1, "a2": 2, "a3": 3, "after": 1}
    lines = complete.count(b"\n")
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: its last record (line {lines + 1}, 20 bytes without a newline) was cut off by a crash or a full "
        f"disk during a write; moved it to {aside} and kept the {lines} complete records before it"]


def test_a_writer_repairs_on_open_and_a_second_torn_record_gets_its_own_file(tmp_path):
    path = _make(tmp_path)
    _, first = _cut_last_record(path, 10)
    storage_for(_settings(tmp_path), repair=True)  # a search or resume opening its study
    assert [p.read_bytes() for p in _torn(path)] == [first] and path.read_bytes().endswith(b"\n")
    with open(path, "ab") as f:
        f.write(b'{"op_code":8,"wor')
    storage_for(_settings(tmp_path), repair=True)
    assert sorted(p.read_bytes() for p in _torn(path)) == sorted([first, b'{"op_code":8,"wor'])
    assert _attrs(tmp_path) == {"a0": 0, "a1": 1, "a2": 2, "a3": 3}


def test_a_last_record_that_lacks_only_its_newline_is_kept(tmp_path, caplog):
    path = _make(tmp_path)
    path.write_bytes(path.read_bytes()[:-1])  # cut exactly before the last newline: the record is whole
    assert "a4" not in _attrs(tmp_path, create=False)  # a reader cannot tell it from a live writer's: not yet
    with caplog.at_level(logging.WARNING, logger="repnas.study"):
        storage_for(_settings(tmp_path), repair=True)
    assert not _torn(path) and path.read_bytes().endswith(b"}\n")
    assert _attrs(tmp_path)["a4"] == 4
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: its last record (line 6) was complete but lacked its newline (a write cut short at its last "
        "byte); added the newline and kept the record"]


CORRUPT = {  # name -> (line index to replace, its new bytes, what the error says about it)
    "bad JSON": (3, b'{"op_code":2,"worker_id":"x","user_attr":{"a', "invalid JSON at byte 43: Unterminated string"),
    "not UTF-8": (3, b'{"op_code":2,"x":"\xff\xfe"}', "bytes that are not UTF-8"),
    "blank line": (2, b"", "invalid JSON at byte 1: Expecting value"),
    "not a record": (4, b"[1, 2, 3]", "valid JSON, but not a journal operation"),
    "unknown op_code": (4, b'{"op_code":99,"worker_id":"x"}', "valid JSON, but not a journal operation"),
    "last complete line": (-1, b"\x00\x00\x00\x00", "invalid JSON at byte 1: Expecting value"),
}


@pytest.mark.parametrize("kind", list(CORRUPT))
def test_a_corrupt_line_is_one_error_naming_its_line_and_the_repair_and_nothing_is_written(tmp_path, kind):
    path = _make(tmp_path)
    index, bad, why = CORRUPT[kind]
    lines = path.read_bytes().splitlines(keepends=True)
    number = index % len(lines) + 1
    lines[index] = bad + b"\n"
    path.write_bytes(b"".join(lines) + b'{"op_code":8,"wo')  # and a torn tail: a writer must not repair it first
    before = path.read_bytes()
    for opened in (lambda: _attrs(tmp_path, create=False), lambda: storage_for(_settings(tmp_path), repair=True)):
        with pytest.raises(StorageError) as caught:
            opened()
        message = str(caught.value)
        assert message.startswith(f"{path}: line {number} is not a study journal record ({why}")
        assert f"`cp {path} {path}.bak && head -n {number - 1} {path}.bak > {path}`" in message
        assert "\n" not in message
    assert path.read_bytes() == before and not _torn(path)
    # the repair it names works: the journal cut before that line loads
    subprocess.run(f"cp {path} {path}.bak && head -n {number - 1} {path}.bak > {path}", shell=True, check=True)
    assert set(_attrs(tmp_path)) == {f"a{i}" for i in range(number - 2)}


def _fail_writes_to(path: Path, monkeypatch, code: int, *, undo_fails: bool = False) -> None:
    """Make os.write to the file `path` store half its bytes, then fail with `code`; and os.ftruncate fail."""
    target = os.stat(path)
    real_write, real_truncate = os.write, os.ftruncate

    def ours(fd: int) -> bool:
        st = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino)

    def write(fd, data):
        if not ours(fd):
            return real_write(fd, data)
        real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(code, os.strerror(code))

    def ftruncate(fd, size):
        if undo_fails and ours(fd):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_truncate(fd, size)

    monkeypatch.setattr(os, "write", write)
    monkeypatch.setattr(os, "ftruncate", ftruncate)


@pytest.mark.parametrize(("code", "fix"), [(errno.ENOSPC, "free space on the disk of"),
                                           (errno.EIO, "check the disk of")])
def test_a_failed_append_is_undone_and_names_the_file_and_the_fix(tmp_path, monkeypatch, code, fix):
    path = _make(tmp_path)
    before = path.read_bytes()
    study = optuna.load_study(study_name=NAME, storage=storage_for(_settings(tmp_path)))
    with monkeypatch.context() as m:
        _fail_writes_to(path, m, code)
        with pytest.raises(StorageError) as caught:
            study.set_user_attr("lost", 1)
    assert str(caught.value) == (
        f"{path}: could not append to the study journal: {os.strerror(code)} [errno {code}]; {fix} {path.parent}"
        + (" (the kernel log says more) and free space on it" if code == errno.EIO else "")
        + f", then run `repnas resume {NAME}` or, for a confirmation, the same `repnas confirm {NAME} ...` again (the "
          "partial record was undone; every record before it is intact)")
    assert path.read_bytes() == before and not _torn(path)
    study.set_user_attr("later", 2)  # space is back: the study goes on
    assert _attrs(tmp_path) == {**{f"a{i}": i for i in range(5)}, "later": 2}


def test_when_the_undo_fails_too_the_next_append_moves_the_partial_record_aside(tmp_path, monkeypatch):
    path = _make(tmp_path)
    before = path.read_bytes()
    study = optuna.load_study(study_name=NAME, storage=storage_for(_settings(tmp_path)))
    with monkeypatch.context() as m:
        _fail_writes_to(path, m, errno.ENOSPC, undo_fails=True)
        with pytest.raises(StorageError, match=r"a partial record may be left at its end; the next append moves it "
                                               r"aside\)$"):
            study.set_user_attr("lost", 1)
    partial = path.read_bytes()[len(before):]
    assert partial and not partial.endswith(b"\n")
    assert _attrs(tmp_path, create=False) == {f"a{i}": i for i in range(5)}  # still readable meanwhile
    study.set_user_attr("later", 2)
    assert [p.read_bytes() for p in _torn(path)] == [partial]
    assert _attrs(tmp_path) == {**{f"a{i}": i for i in range(5)}, "later": 2}


def _deny(monkeypatch, path: Path, *, writing_only: bool) -> None:
    """os.open of `path` (for writing only, or at all) fails with EACCES, as on a file of another user."""
    real = os.open

    def deny(file, flags, *args, **kwargs):
        if Path(file) == path and (not writing_only or flags & (os.O_WRONLY | os.O_RDWR)):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
        return real(file, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", deny)


def test_permission_denied_is_one_error_naming_the_file_and_the_fix(tmp_path, monkeypatch):
    path = _make(tmp_path)
    before = path.read_bytes()
    fix = f"give this user read and write access to {path} and its folder (e.g. `chmod u+rw {path}`)"
    with monkeypatch.context() as m:
        _deny(m, path, writing_only=True)
        assert _attrs(tmp_path, create=False)["a4"] == 4  # reading needs no write access
        with pytest.raises(StorageError) as caught:
            storage_for(_settings(tmp_path), repair=True)
        assert str(caught.value).startswith(f"{path}: could not open the study journal for writing: Permission "
                                            f"denied [errno 13]; {fix}") and "`repnas resume j`" in str(caught.value)
        study = optuna.load_study(study_name=NAME, storage=storage_for(_settings(tmp_path)))
        with pytest.raises(StorageError, match="could not open the study journal for writing: Permission denied"):
            study.set_user_attr("x", 1)
    with monkeypatch.context() as m:
        _deny(m, path, writing_only=False)
        with pytest.raises(StorageError) as caught:
            _attrs(tmp_path, create=False)
        assert str(caught.value).startswith(f"{path}: could not read the study journal: Permission denied "
                                            f"[errno 13]; {fix}")
    with monkeypatch.context() as m:
        _deny(m, path.with_name("study.log.flock"), writing_only=True)
        study = optuna.load_study(study_name=NAME, storage=storage_for(_settings(tmp_path)))
        with pytest.raises(StorageError, match=r"study\.log\.flock: could not take the study journal's lock: "
                                               "Permission denied"):
            study.set_user_attr("x", 1)
    assert path.read_bytes() == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads and writes any file whatever its mode")
def test_a_journal_without_write_permission_is_read_but_not_written(tmp_path):
    path = _make(tmp_path)
    path.chmod(0o444)
    try:
        assert _attrs(tmp_path, create=False)["a4"] == 4
        with pytest.raises(StorageError, match="could not open the study journal for writing: Permission denied"):
            storage_for(_settings(tmp_path), repair=True)
    finally:
        path.chmod(0o644)


def test_an_unreachable_database_is_one_error_with_its_password_masked(tmp_path):
    url = "postgresql+psycopg2://repnas:s3cret@127.0.0.1:1/repnas"  # port 1: nothing listens
    with pytest.raises(StorageError) as caught:
        storage_for(_settings(tmp_path, storage=url))
    message = str(caught.value)
    assert "s3cret" not in message and "\n" not in message
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        assert message.startswith("storage postgresql+psycopg2://repnas:***@127.0.0.1:1/repnas: its database driver "
                                  "is not installed")
    else:
        assert message.startswith("storage postgresql+psycopg2://repnas:***@127.0.0.1:1/repnas: cannot connect to the "
                                  'database (OperationalError: connection to server at "127.0.0.1", port 1 failed')
        assert message.endswith("check that its server runs and the URL (host, port, user, password, database), then "
                                "run again")
    with pytest.raises(StorageError, match=r"^storage nosuchdb://x is not a database URL"):
        storage_for(_settings(tmp_path, storage="nosuchdb://x"))
    assert not (tmp_path / "results").exists()  # nothing written


def test_an_older_database_schema_names_optuna_storage_upgrade(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    optuna.create_study(storage=url, study_name=NAME).set_user_attr("kept", 1)
    with sqlite3.connect(tmp_path / "study.db") as db:  # as an Optuna 3.0 installation left it
        db.execute("UPDATE alembic_version SET version_num = 'v3.0.0.d'")
    with pytest.raises(StorageError) as caught:
        storage_for(_settings(tmp_path, storage=url))
    assert str(caught.value) == (
        f"storage {url}: its schema was set up by an older Optuna than the installed {optuna.__version__}; back the "
        f"database up, then upgrade it with `optuna storage upgrade --storage {url}` and run again")
    optuna.storages.RDBStorage(url, skip_compatibility_check=True).upgrade()  # what that command does
    assert optuna.load_study(study_name=NAME, storage=storage_for(_settings(tmp_path, storage=url))).user_attrs == {
        "kept": 1}


def test_a_database_lost_during_a_run_is_one_storage_error_and_other_errors_are_not():
    import sqlalchemy.exc

    url = "postgresql+psycopg2://repnas:s3cret@db.example:5432/repnas"
    lost = sqlalchemy.exc.OperationalError("UPDATE trials", {}, ConnectionResetError("server closed the connection"))
    try:
        raise optuna.exceptions.StorageInternalError("An exception is raised during the commit.") from lost
    except optuna.exceptions.StorageInternalError as err:
        wrapped = err
    for err in (wrapped, lost):
        failure = storage_failure(err, url)
        assert str(failure).startswith("storage postgresql+psycopg2://repnas:***@db.example:5432/repnas: failed "
                                       "during the run (ConnectionResetError: server closed the connection); ")
        assert "`repnas resume NAME --storage URL`" in str(failure)
    journal = StorageError("study.log: could not append")
    assert storage_failure(journal) is journal
    assert storage_failure(ValueError("a bug")) is None and storage_failure(OSError(errno.ENOSPC, "full")) is None
    assert mask_url("postgresql://u:pw@h/db") == "postgresql://u:***@h/db" and mask_url("sqlite:///a.db") == \
        "sqlite:///a.db"


def test_a_repair_that_cannot_write_the_moved_aside_file_changes_nothing(tmp_path, monkeypatch):
    path = _make(tmp_path)
    _cut_last_record(path, 30)
    before = path.read_bytes()

    def full(target, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(nas.study.journal, "write_bytes_atomic", full)
    with pytest.raises(StorageError, match=r"could not repair the end of the study journal: No space left on device "
                                           r"\[errno 28\]; free space on the disk of .*, then run `repnas resume j` "
                                           r"or, for a confirmation, the same `repnas confirm j \.\.\.` again$"):
        storage_for(_settings(tmp_path), repair=True)
    assert path.read_bytes() == before and not _torn(path)  # still torn: the next writer tries again


def test_a_worker_whose_storage_fails_prints_one_line_and_exits_2(tmp_path):
    """`python -m nas.study --worker SPEC` (started by `repnas search --workers N`): its storage error is one line
    on stdout, which the coordinator relays, and exit code 2; no traceback."""
    from nas.study.workers import _worker_command

    path = _make(tmp_path)
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:2]) + b"{oops\n" + b"".join(lines[3:]))
    command = _worker_command(_settings(tmp_path), 0, None, 0, 1)
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stdout.splitlines() == [f"storage error: {path}: line 3 is not a study journal record (invalid JSON "
                                        f"at byte 2: Expecting property name enclosed in double quotes); repnas reads "
                                        f"nothing past it. To repair it, keep a copy and cut the journal before that "
                                        f"line (what was recorded from there on is lost): `cp {path} {path}.bak && "
                                        f"head -n 2 {path}.bak > {path}`, or restore {path} from a backup"]
