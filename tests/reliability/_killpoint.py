"""Run `repnas` and SIGKILL it on the Nth entry to one phase of a study: the kill/resume tests' driver.

    python -m tests.reliability._killpoint PHASE N MARKER -- search --study NAME --results DIR ...

The product holds no test hooks: this module wraps, in this process only, the functions the study calls in each
phase (as nas.study / nas.train / nas.pareto / nas.study.journal look them up), then runs `nas.cli.main(ARGS)`. On
the Nth entry to PHASE it writes "PHASE N" to MARKER (fsynced, so the test knows the kill came from here) and sends
itself SIGKILL: no handler, `finally` or atexit runs, as when the kernel's OOM killer or a power cut stops a worker.

Phases (what is counted):
    build          build_model called by run_trial (a trial's model, not the baseline's reference copy)
    latency        measure_latency called by run_trial
    training       a training step of fit (its EMA update, after the optimizer step)
    evaluation     the validation inside fit (nas.train.evaluate)
    fusing         the fusion of a trained model in run_trial (fuse_model on a model in eval mode)
    between-trials claim_trial: the previous trial is told and exported, the next not yet asked
    pareto         one Pareto file write (md, csv, html, json, png); it dies with half the bytes in the temp file
    weights        the write of a trial's weights.pt; it dies with half the bytes in the temp file

Journal phases (an append to the study's journal file study.log by the main thread; the heartbeat thread's are not
counted, so the Nth is the same in every run):
    journal-torn   under the journal's lock, the driver writes the first half of the append's bytes to the real
                   study.log, fsyncs and dies: a record torn by a crash or a power cut
    journal-full   the product's own append runs, but its write stores half the bytes and then fails with ENOSPC (a
                   full disk); the process is not killed: the product must undo the write and end with one line
"""

from __future__ import annotations

import errno
import functools
import json
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path

PHASES = ("build", "latency", "training", "evaluation", "fusing", "between-trials", "pareto", "weights")
JOURNAL_PHASES = ("journal-torn", "journal-full")


class KillPoint:
    """Counts entries to one phase and SIGKILLs this process on the `occurrence`-th."""

    def __init__(self, phase: str, occurrence: int, marker: Path):
        if phase not in PHASES + JOURNAL_PHASES:
            raise SystemExit(f"unknown phase {phase!r}; phases: {', '.join(PHASES + JOURNAL_PHASES)}")
        if occurrence < 1:
            raise SystemExit(f"occurrence {occurrence} must be >= 1")
        self.phase, self.occurrence, self.marker, self.seen = phase, occurrence, marker, 0

    def hit(self, phase: str) -> bool:
        """Count an entry to `phase`; True on the chosen one."""
        if phase != self.phase:
            return False
        self.seen += 1
        return self.seen == self.occurrence

    def mark(self) -> None:
        """Write "PHASE N" to the marker, fsynced."""
        with open(self.marker, "w") as f:
            f.write(f"{self.phase} {self.occurrence}\n")
            f.flush()
            os.fsync(f.fileno())

    def enter(self, phase: str, before_death=None) -> None:
        """Count an entry to `phase`; on the chosen one, run `before_death` (a half write), mark and die."""
        if not self.hit(phase):
            return
        if before_death is not None:
            before_death()
        self.die()

    def die(self) -> None:
        self.mark()
        os.kill(os.getpid(), signal.SIGKILL)


def _half_written_temp(path: str | Path, data: bytes) -> None:
    """Leave what a writer killed mid-write leaves: a temp file beside `path` (as write_bytes_atomic names it)
    holding the first half of `data`; `path` itself is not touched."""
    path = Path(path)
    fd, _ = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())


def _journal_bytes(logs: list[dict]) -> bytes:
    """An append's bytes as Optuna's journal writes them: one compact JSON record per line."""
    return "".join(json.dumps(log, separators=(",", ":")) + "\n" for log in logs).encode("utf-8")


def _torn_append(path: Path, lock, data: bytes) -> None:
    """Write the first half of `data` to the journal `path` under its `lock` (as a writer holds it), fsynced."""
    lock.acquire()  # held until the SIGKILL that follows: the kernel releases it
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    os.write(fd, data[: len(data) // 2])
    os.fsync(fd)


def _full_disk_during(path: Path, call):
    """Run `call` with every os.write to the file `path` storing half its bytes and then failing with ENOSPC."""
    real_write, target = os.write, os.stat(path)

    def write(fd, data):
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (target.st_dev, target.st_ino):
            return real_write(fd, data)
        real_write(fd, bytes(data[: max(1, len(data) // 2)]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    os.write = write
    try:
        return call()
    finally:
        os.write = real_write


def _called_from(function) -> bool:
    """Whether the wrapper that calls this runs inside `function` (run_trial calls its phases, which call the seams)."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code is function.__code__:
            return True
        frame = frame.f_back
    return False


def install(kill: KillPoint) -> None:
    """Wrap the phase seams of nas.study, nas.train, nas.pareto and the journal file in this process."""
    import nas.pareto
    import nas.study
    import nas.study.journal
    import nas.train

    run_trial = nas.study.run_trial

    def counted(module, name: str, phase: str, in_trial: bool = False, when=lambda *a, **k: True):
        """Count calls of module.name (only those made by run_trial when `in_trial`) that `when` accepts."""
        real = getattr(module, name)

        @functools.wraps(real)
        def wrapper(*args, **kwargs):
            if (not in_trial or _called_from(run_trial)) and when(*args, **kwargs):
                kill.enter(phase)
            return real(*args, **kwargs)

        setattr(module, name, wrapper)

    counted(nas.study.trial, "build_model", "build", in_trial=True)
    counted(nas.study.trial, "measure_latency", "latency", in_trial=True)
    counted(nas.study.trial, "fuse_model", "fusing", in_trial=True, when=lambda model, *a, **k: not model.training)
    counted(nas.study.run, "claim_trial", "between-trials")
    counted(nas.train, "evaluate", "evaluation")

    real_update = nas.train.ModelEMA.update

    def update(self, model):
        kill.enter("training")
        return real_update(self, model)

    nas.train.ModelEMA.update = update

    def writes(module, name: str, phase: str, selected=lambda path: True, encode=lambda data: data):
        real = getattr(module, name)

        @functools.wraps(real)
        def wrapper(path, data, *args, **kwargs):
            if selected(path):
                kill.enter(phase, before_death=lambda: _half_written_temp(path, encode(data)))
            return real(path, data, *args, **kwargs)

        setattr(module, name, wrapper)

    writes(nas.pareto, "write_text_atomic", "pareto", encode=lambda text: text.encode("utf-8"))
    writes(nas.pareto, "write_bytes_atomic", "pareto")
    writes(nas.study.trial, "write_bytes_atomic", "weights", selected=lambda path: Path(path).name == "weights.pt")

    journal = nas.study.journal.JournalFile
    real_append = journal.append_logs

    @functools.wraps(real_append)
    def append_logs(self, logs):
        if threading.current_thread() is threading.main_thread():
            if kill.hit("journal-torn"):
                _torn_append(self.path, self._lock, _journal_bytes(logs))
                kill.die()
            if kill.hit("journal-full"):
                kill.mark()
                return _full_disk_during(self.path, lambda: real_append(self, logs))
        return real_append(self, logs)

    journal.append_logs = append_logs


def main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[3] != "--":
        raise SystemExit("usage: python -m tests.reliability._killpoint PHASE N MARKER -- REPNAS_ARGS...")
    install(KillPoint(argv[0], int(argv[1]), Path(argv[2])))
    from nas.cli import main as repnas

    return repnas(argv[4:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
