"""Files and locks for everything in nas/: the one atomic writer (`pruning.atomic`, re-exported), the one file
lock class, weights as bytes, host-wide lock paths, and how much disk a folder takes.

Every file repnas creates gets the permissions a plain `open()` gives (0o666 less the user's umask) and every folder
those of `mkdir` (0o777 less the umask): a study folder shared over NFS is readable by the group when the umask lets
it be (tests/nas/test_umask.py runs each kind of file under umask 0o022 and 0o077)."""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path

from pruning.atomic import atomic_path, current_umask, write_bytes_atomic, write_text_atomic

__all__ = ["FileLock", "atomic_path", "current_umask", "folder_bytes", "format_bytes", "host_lock_path",
           "state_dict_bytes", "write_bytes_atomic", "write_text_atomic"]


def state_dict_bytes(model) -> bytes:
    """The model's state_dict (tensors on the CPU) as torch.save bytes: loadable with weights_only=True."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buffer)
    return buffer.getvalue()


class FileLock:
    """An exclusive advisory lock on `path` (created if missing) between processes and threads of one machine.

    `fcntl.flock` where available (Linux, macOS); elsewhere a no-op, and the caller's storage or retry logic must
    cope. Every `acquire` opens its own descriptor (flock belongs to an open file description), so two threads of
    one process exclude each other exactly as two processes do: a trial thread and its heartbeat thread append to
    one journal through one lock. The kernel drops the lock when its holder dies, so a SIGKILLed holder never leaves
    it taken. Usable as a context manager and, duck-typed (`acquire() -> bool`, `release()`), as Optuna's journal
    file lock (optuna does not export `BaseJournalFileLock`). Not reentrant: a thread that acquires twice deadlocks.

    Raises OSError when the lock file cannot be created.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._held = threading.local()

    def acquire(self) -> bool:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)  # less the umask, as open(): with umask 0o002 a
        # group sharing the study folder can open it read-write, which flock needs
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        self._held.fd = fd
        return True

    def release(self) -> None:
        fd, self._held.fd = getattr(self._held, "fd", None), None
        if fd is not None:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def host_lock_path(name: str) -> Path:
    """A lock file shared by every process of this user on this machine (e.g. the latency phase)."""
    return Path(tempfile.gettempdir()) / f"repnas-{os.getuid() if hasattr(os, 'getuid') else 'user'}-{name}.lock"


def folder_bytes(path: str | Path) -> int:
    """Bytes of the regular files under `path` (symlinks not followed; files gone meanwhile not counted)."""
    import stat

    total = 0
    for root, _, names in os.walk(path):
        for name in names:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            total += st.st_size if stat.S_ISREG(st.st_mode) else 0
    return total


def format_bytes(n: int) -> str:
    """`n` bytes for a person: '812 B', '1.5 MB', '2.0 GB' (powers of 1000, as `du --si` prints)."""
    if n < 1000:
        return f"{n} B"
    for unit in ("kB", "MB", "GB", "TB"):
        n /= 1000
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}"
    raise AssertionError("unreachable")
