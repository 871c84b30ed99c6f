"""The study's journal file, results/NAME/study.log: an Optuna journal backend that reads with repnas's own scan and
writes with a repair first, and the storage errors it raises.

Optuna's journal is one JSON record per line, appended under a lock. A crash, a power cut or a full disk during an
append can leave the last line cut off without its newline. Optuna's own backend then appends the next record onto
the torn one, and from there on every reader dies with a JSONDecodeError. Here:

- reading (`repnas show`, `export`, every process) ignores a last line without its newline (it may be a live
  writer's partial append), and stops at a complete line that is not a record with one line naming the file, the
  line number and the repair (`StorageError`, exit 2);
- every append first looks at the end of the file under the journal's lock (`nas.files.FileLock`, so no live writer
  is mid-append): a torn last record is moved aside into `study.log.torn-<UTC time>` beside the journal (kept, never
  deleted) and the journal cut back to its last complete record; a last record complete but for its newline gets
  the newline. One warning line says which. `repair()` does the same at once (a search or resume opening its study);
- an append that fails (a full disk, an I/O error, permission denied) is undone (the file cut back to its size before
  the append) and raised as a `StorageError` naming the file and the fix; if even the undo fails, the next append's
  repair moves the partial record aside.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from optuna.storages.journal import BaseJournalBackend

from nas.files import FileLock, write_bytes_atomic
from nas.study.settings import StudyError

LOG = logging.getLogger("repnas.study")
TORN_SUFFIX = ".torn-"  # study.log.torn-20250102T030405Z: a moved-aside torn record
_CHUNK = 1 << 16


class StorageError(StudyError):
    """A study's storage that cannot be read or written as it is: the message names the file (or the URL, password
    masked), what failed and the fix."""


def _op_codes() -> frozenset[int] | None:
    try:  # the journal's operations; a private module of Optuna, so a missing one only loosens the scan
        from optuna.storages.journal._storage import JournalOperation
    except ImportError:  # pragma: no cover - another Optuna layout
        return None
    return frozenset(op.value for op in JournalOperation)


OP_CODES = _op_codes()


def parse_record(line: bytes) -> dict[str, Any]:
    """One journal line (without its newline) as its record; ValueError saying what is wrong with it."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"invalid JSON at byte {err.pos + 1}: {err.msg}") from None
    except UnicodeDecodeError:
        raise ValueError("bytes that are not UTF-8") from None
    op = record.get("op_code") if isinstance(record, dict) else None
    if not isinstance(op, int) or (OP_CODES is not None and op not in OP_CODES):
        raise ValueError("valid JSON, but not a journal operation (an object with a known op_code)")
    return record


def corrupt_line_error(path: Path, number: int, why: str) -> StorageError:
    """The error for complete line `number` (1-based) of journal `path` that is not a record."""
    return StorageError(
        f"{path}: line {number} is not a study journal record ({why}); repnas reads nothing past it. To repair it, "
        f"keep a copy and cut the journal before that line (what was recorded from there on is lost): "
        f"`cp {path} {path}.bak && head -n {number - 1} {path}.bak > {path}`, or restore {path} from a backup")


def io_error(path: Path, doing: str, err: OSError, *, study: str | None = None) -> StorageError:
    """`err` (from `doing` on `path`) as a StorageError with the fix its errno calls for, and with `study` given,
    the command that goes on: `repnas resume` for a search, the same `repnas confirm` for a confirmation (both
    write to this journal)."""
    what = f"{path}: could not {doing}: {err.strerror or err} [errno {err.errno}]"
    if err.errno in (errno.EACCES, errno.EPERM):
        fix = (f"give this user read and write access to {path} and its folder (e.g. `chmod u+rw {path}`), or run "
               "as the user who owns them")
    elif err.errno == errno.EROFS:
        fix = f"{path.parent} is on a read-only file system; remount it writable or move the study"
    elif err.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        fix = f"free space on the disk of {path.parent}"
    else:
        fix = f"check the disk of {path.parent} (the kernel log says more) and free space on it"
    if study is not None:
        fix += f", then run `repnas resume {study}` or, for a confirmation, the same `repnas confirm {study} ...` again"
    return StorageError(f"{what}; {fix}")


def _last_newline_end(fd: int, size: int) -> int:
    """The offset just past the file's last newline (0 when it has none): where a torn last record starts."""
    end = size
    while end > 0:
        start = max(0, end - _CHUNK)
        found = os.pread(fd, end - start, start).rfind(b"\n")
        if found >= 0:
            return start + found + 1
        end = start
    return 0


def _count_newlines(fd: int, end: int) -> int:
    count, at = 0, 0
    while at < end:
        count += os.pread(fd, min(_CHUNK, end - at), at).count(b"\n")
        at += _CHUNK
    return count


class JournalFile(BaseJournalBackend):
    """Optuna journal backend on `path` (created when missing), appends under `lock`; see the module docstring.

    `study`: the study's name, for the fix that failing appends suggest (`repnas resume NAME`). Raises StorageError
    (reading, appending, creating the file), never a bare OSError or JSONDecodeError.
    """

    def __init__(self, path: str | Path, lock: FileLock, *, study: str | None = None):
        self.path, self._lock, self.study = Path(path), lock, study
        self._offsets: dict[int, int] = {0: 0}  # line number -> its byte offset, for lines read so far
        if not self.path.exists():
            try:
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666))  # less the umask
            except OSError as err:
                raise io_error(self.path, "create the study journal", err, study=study) from None

    def read_logs(self, log_number_from: int) -> Iterator[dict[str, Any]]:
        """The records from line `log_number_from` (0-based) on, as far as the file held complete lines when the
        read began; a last line without its newline is not yet a record (a live writer's, or torn)."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError as err:
            raise io_error(self.path, "read the study journal", err) from None
        with os.fdopen(fd, "rb") as f:
            try:
                size = os.fstat(fd).st_size  # what is appended while this read runs is read next time
                number = log_number_from if log_number_from in self._offsets else 0
                offset = self._offsets[number]
                f.seek(offset)
                for line in f:
                    if offset + len(line) > size or not line.endswith(b"\n"):
                        return
                    try:
                        record = parse_record(line[:-1]) if number >= log_number_from else None
                    except ValueError as why:
                        raise corrupt_line_error(self.path, number + 1, str(why)) from None
                    offset += len(line)
                    number += 1
                    self._offsets[number] = offset
                    if record is not None:
                        yield record
            except OSError as err:
                raise io_error(self.path, "read the study journal", err) from None

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        """Append `logs` (one line each, as Optuna writes them) after repairing the end of the file, under the lock;
        a failed append is undone and raised as a StorageError."""
        data = "".join(json.dumps(log, separators=(",", ":")) + "\n" for log in logs).encode("utf-8")
        with self._locked(), self._opened() as fd:
            size = self._repair(fd)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            except OSError as err:
                undone = self._undo(fd, size)
                failure = io_error(self.path, "append to the study journal", err, study=self.study)
                raise StorageError(f"{failure} (" + ("the partial record was undone; every record before it is "
                                   "intact" if undone else "a partial record may be left at its end; the next "
                                   "append moves it aside") + ")") from None

    def repair(self) -> None:
        """Move a torn last record aside (or complete one that lacks only its newline) now, under the lock."""
        with self._locked(), self._opened() as fd:
            self._repair(fd)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            self._lock.acquire()
        except OSError as err:
            raise io_error(self._lock.path, "take the study journal's lock", err, study=self.study) from None
        try:
            yield
        finally:
            self._lock.release()

    @contextmanager
    def _opened(self) -> Iterator[int]:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND)
        except OSError as err:
            raise io_error(self.path, "open the study journal for writing", err, study=self.study) from None
        try:
            yield fd
        finally:
            os.close(fd)

    def _undo(self, fd: int, size: int) -> bool:
        try:
            os.ftruncate(fd, size)
            os.fsync(fd)
        except OSError:
            return False
        return True

    def _repair(self, fd: int) -> int:
        """Under the lock: fix a last line without its newline; return the file's size after."""
        try:
            size = os.fstat(fd).st_size
            start = _last_newline_end(fd, size)
            if start == size:
                return size
            tail = os.pread(fd, size - start, start)
            line = _count_newlines(fd, start) + 1
            try:
                parse_record(tail)
            except ValueError:
                pass
            else:  # cut exactly before its newline: the record is whole, so it is kept
                os.write(fd, b"\n")
                os.fsync(fd)
                LOG.warning("%s: its last record (line %d) was complete but lacked its newline (a write cut short "
                            "at its last byte); added the newline and kept the record", self.path, line)
                return size + 1
            aside = self._aside_path()
            write_bytes_atomic(aside, tail)
            os.ftruncate(fd, start)
            os.fsync(fd)
        except OSError as err:
            raise io_error(self.path, "repair the end of the study journal", err, study=self.study) from None
        LOG.warning("%s: its last record (line %d, %d bytes without a newline) was cut off by a crash or a full "
                    "disk during a write; moved it to %s and kept the %d complete records before it", self.path,
                    line, len(tail), aside, line - 1)
        return start

    def _aside_path(self) -> Path:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        aside, k = self.path.with_name(f"{self.path.name}{TORN_SUFFIX}{stamp}"), 2
        while aside.exists():
            aside, k = self.path.with_name(f"{self.path.name}{TORN_SUFFIX}{stamp}-{k}"), k + 1
        return aside
