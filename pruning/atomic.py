"""The project's one atomic file writer: a reader (or a crash) never sees half a file.

A file is written to a temporary name beside its target, flushed to disk, given the permissions a plain `open()`
would give it (0o666 less the user's umask; `mkstemp` alone makes it 0o600), and renamed over the target. It lives
in `pruning/` because `pruning.portable` writes a pruned model's folder and imports point `nas -> pruning -> space`;
`nas.files` re-exports it for everything else.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask, read without changing it where the platform allows (Linux: /proc/self/status)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:  # elsewhere: set and restore, under a lock so threads of this module never race on it
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` for a writer that needs a file name (e.g. `torch.onnx.export`);
    on a clean exit it is fsynced, given the umask's permissions and renamed over `path`; on an error it is removed.

    Raises whatever the writer raised (the target is then untouched), or OSError from the rename.
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` atomically (temporary file beside it, fsync, umask permissions, rename).

    Raises OSError (e.g. a full disk) with `path` untouched and no temporary file left.
    """
    with atomic_path(path) as tmp, os.fdopen(os.open(tmp, os.O_WRONLY | os.O_TRUNC), "wb") as f:
        f.write(data)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` as UTF-8 to `path` atomically."""
    write_bytes_atomic(path, text.encode("utf-8"))
