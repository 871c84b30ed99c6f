"""Files and locks (nas/files.py, pruning/atomic.py): the atomic writer's result, permissions and failures, the file
lock between threads of one process, and weights as bytes that load weights-only."""

from __future__ import annotations

import errno
import fcntl
import io
import os
import stat
import threading
from pathlib import Path

import pytest
import torch
from torch import nn

import pruning.atomic
from nas.files import (
    FileLock,
    atomic_path,
    folder_bytes,
    format_bytes,
    state_dict_bytes,
    write_bytes_atomic,
    write_text_atomic,
)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


@pytest.fixture
def umask_027():
    """The process umask set to 0o027 for the test, the previous one restored after."""
    before = os.umask(0o027)
    try:
        yield
    finally:
        os.umask(before)


@pytest.mark.parametrize(("mask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_and_lock_files_get_0o666_less_the_umask(tmp_path, mask, mode):
    before = os.umask(mask)  # (tests/nas/test_umask.py runs every command's files in a process of its own)
    try:
        write_bytes_atomic(tmp_path / "weights.pt", b"w")
        with atomic_path(tmp_path / "model.onnx") as tmp:
            tmp.write_bytes(b"o")
        with FileLock(tmp_path / "study.log.flock"):  # 0o664 under umask 0o002: the group can open it to lock
            pass
    finally:
        os.umask(before)
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in tmp_path.iterdir()} == {
        "weights.pt": oct(mode), "model.onnx": oct(mode), "study.log.flock": oct(mode)}


def test_folder_bytes_counts_regular_files_only_and_format_bytes_reads_well(tmp_path):
    (tmp_path / "trials" / "0").mkdir(parents=True)
    (tmp_path / "trials" / "0" / "weights.pt").write_bytes(b"x" * 1500)
    (tmp_path / "trials" / "top.json").write_bytes(b"x" * 20)
    (tmp_path / "trials" / "link").symlink_to(tmp_path / "trials" / "0" / "weights.pt")  # not counted twice
    assert folder_bytes(tmp_path / "trials") == 1520
    assert folder_bytes(tmp_path / "missing") == 0
    assert [format_bytes(n) for n in (0, 999, 1520, 1_500_000, 2_345_000_000)] == [
        "0 B", "999 B", "1.5 kB", "1.5 MB", "2.3 GB"]


def test_an_atomic_write_leaves_no_temporary_file_and_gets_the_umask_permissions(tmp_path, umask_027):
    path = tmp_path / "out.bin"
    write_bytes_atomic(path, b"first")
    assert path.read_bytes() == b"first"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # 0o666 less the umask, as open() gives (mkstemp: 0o600)
    write_text_atomic(path, "second \u00e9")  # replaces the file, UTF-8
    assert path.read_bytes() == "second \u00e9".encode()
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    with atomic_path(tmp_path / "named.txt") as tmp:  # for writers that need a file name
        assert tmp.parent == tmp_path and tmp.name.endswith(".tmp")
        tmp.write_text("by name")
    assert (tmp_path / "named.txt").read_text() == "by name"
    assert stat.S_IMODE((tmp_path / "named.txt").stat().st_mode) == 0o640
    assert _leftovers(tmp_path) == []


def test_a_failing_write_leaves_the_target_untouched_and_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "weights.pt"
    path.write_bytes(b"the good copy")

    def full_disk(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pruning.atomic.os, "fsync", full_disk)
    with pytest.raises(OSError, match=os.strerror(errno.ENOSPC)):
        write_bytes_atomic(path, b"half a new copy")
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="the writer failed"), atomic_path(path) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("the writer failed")
    assert path.read_bytes() == b"the good copy"
    assert _leftovers(tmp_path) == []


def _held_elsewhere(path: Path) -> bool:
    """Whether another open file description holds the flock on `path` (a non-blocking attempt is refused)."""
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops the lock this attempt may have taken
    return False


def test_two_threads_of_one_process_exclude_each_other(tmp_path):
    lock = FileLock(tmp_path / "shared.lock")  # one object shared by both threads, as the journal's lock is
    a_holds, b_trying, b_acquired, a_may_release = (threading.Event() for _ in range(4))
    order: list[str] = []

    def thread_a():
        assert lock.acquire() is True  # Optuna's journal lock protocol: acquire() -> bool
        a_holds.set()
        a_may_release.wait(timeout=60)
        order.append("A releases")
        lock.release()

    def thread_b():
        a_holds.wait(timeout=60)
        b_trying.set()
        lock.acquire()
        order.append("B acquired")
        b_acquired.set()
        lock.release()

    threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for thread in threads:
        thread.start()
    assert b_trying.wait(timeout=60)
    assert not b_acquired.wait(timeout=0.5)  # B waits while A holds the lock (set at once if it did not)
    a_may_release.set()
    for thread in threads:
        thread.join(timeout=60)
    assert order == ["A releases", "B acquired"]
    assert not _held_elsewhere(tmp_path / "shared.lock")


def test_the_lock_is_a_context_manager_and_release_without_acquire_does_nothing(tmp_path):
    path = tmp_path / "sub" / "ctx.lock"
    lock = FileLock(path)
    lock.release()  # never acquired: a no-op, nothing created
    assert not path.exists()
    with lock as held:
        assert held is lock and path.is_file()  # the lock file (and its folder) made on acquire
        assert _held_elsewhere(path)
    assert not _held_elsewhere(path)
    lock.release()  # released already: a no-op again
    assert not _held_elsewhere(path)


def test_state_dict_bytes_load_weights_only_on_the_cpu():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    state = torch.load(io.BytesIO(state_dict_bytes(model)), weights_only=True)
    assert list(state) == list(model.state_dict())
    assert all(isinstance(v, torch.Tensor) and v.device.type == "cpu" for v in state.values())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
