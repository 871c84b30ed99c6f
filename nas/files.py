"""Files and locks for everything in nas/: the one atomic writer (`pruning.atomic`, re-exported), the one file
lock class, weights as bytes, and host-wide lock paths."""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path

from pruning.atomic import atomic_path, write_bytes_atomic, write_text_atomic

__all__ = ["FileLock", "atomic_path", "host_lock_path", "state_dict_bytes", "write_bytes_atomic",
           "write_text_atomic"]


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
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
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
