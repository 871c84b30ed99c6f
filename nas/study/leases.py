"""Who runs which trial: claims, leases (host, PID, heartbeat), stale recovery and re-enqueueing (what Optuna keeps
in `storages/_heartbeat.py` and `storages/_callbacks.py`).

Every running trial holds a lease: its worker's host and PID and a heartbeat time renewed every HEARTBEAT_S seconds.
`recover_stale_trials` fails a RUNNING trial whose worker is gone (same host: its PID is dead; any host: no
heartbeat for `stale_after` seconds) and enqueues its Arch once more. The same works for any study of the storage,
the follow-up companion studies included (`nas.study.followups`).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from nas.files import FileLock
from nas.study.attrs import (
    ARCH_KEY,
    FAIL_REASON_KEY,
    HEARTBEAT_KEY,
    HOST_KEY,
    ORIGIN_KEYS,
    PID_KEY,
    PRUNED_REASON_KEY,
    REASON_SURPLUS,
    REQUEUE_REASON_KEY,
    REQUEUED_FROM_KEY,
    REQUEUES_KEY,
    busy,
)
from nas.study.settings import DEFAULTS, HEARTBEAT_S, StudySettings

LOG = logging.getLogger("repnas.study")
EXIT_ORPHANED = 75  # a worker's exit code when its coordinator is gone
MAX_REQUEUES = 2  # an Arch whose trials keep dying (e.g. the kernel's OOM killer) is not enqueued forever


def host_id() -> str:
    """This machine: its hostname and, on Linux, its boot id (two containers or hosts may share a hostname)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8]
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}" if boot else socket.gethostname()


def pid_alive(pid: int) -> bool:
    """Whether process `pid` still runs on this machine.

    A zombie does not: it has exited and only waits for its parent to reap it, which may take a while (or never
    happen: a container's PID 1 that does not reap), yet signal 0 still reaches it. On Linux its /proc state says so,
    and a worker killed with its coordinator is then taken for dead at once, as it is.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return not Path("/proc/self/stat").is_file()  # Linux: it has just ended; elsewhere there is no /proc
    except OSError:
        return True
    return stat[stat.rindex(")") + 2:][:1] not in ("Z", "X")  # the state letter after "PID (comm) "


def take_lease(trial: optuna.Trial) -> None:
    """Record this process as the trial's holder: host, PID, heartbeat now."""
    trial.set_user_attr(HOST_KEY, host_id())
    trial.set_user_attr(PID_KEY, os.getpid())
    trial.set_user_attr(HEARTBEAT_KEY, time.time())


def _ask_lock(settings: StudySettings):
    """Count + ask under a file lock when the storage is this machine's journal file (no surplus trials)."""
    return nullcontext() if settings.storage else FileLock(settings.folder / ".ask.lock")


def claim_trial(study: optuna.Study, settings: StudySettings) -> optuna.Trial | None:
    """A new trial for this worker, or None when the study has (or is running) enough trials to reach --trials.

    Under a local lock, count + ask is atomic. Across hosts (an RDB storage) two workers may ask at once: the trial
    whose number comes after `--trials` busy (counted or running) ones is then released as PRUNED "surplus", which
    does not count, and its enqueued params (if any) are enqueued again.
    """
    with _ask_lock(settings):
        if sum(busy(t) for t in study.get_trials(deepcopy=False)) >= settings.trials:
            return None
        trial = study.ask()
        take_lease(trial)
    ahead = sum(busy(t) for t in study.get_trials(deepcopy=False) if t.number < trial.number)
    if ahead < settings.trials:
        return trial
    trial.set_user_attr(PRUNED_REASON_KEY, REASON_SURPLUS)
    fixed = study.get_trials(deepcopy=False)[trial.number].system_attrs.get("fixed_params")
    study.tell(trial, state=TrialState.PRUNED, skip_if_finished=True)
    if fixed:
        study.enqueue_trial(fixed, user_attrs={k: v for k, v in trial.user_attrs.items()
                                               if k in (*ORIGIN_KEYS, REQUEUED_FROM_KEY)})
    return None


class Heartbeat:
    """Renews a running trial's lease (HEARTBEAT_KEY = time.time()) every `interval` seconds in a thread.

    The thread ends when the trial is finished (the storage refuses the write) or on exit from the `with` block.
    In a worker process started by a coordinator (`parent_pid`) it also ends the process (EXIT_ORPHANED) when the
    coordinator is gone.
    """

    def __init__(self, study: optuna.Study, trial_id: int, interval: float = HEARTBEAT_S,
                 parent_pid: int | None = None):
        self._stop = threading.Event()
        self._args = study._storage, trial_id, interval, parent_pid
        self._thread = threading.Thread(target=self._run, name="repnas-heartbeat", daemon=True)

    def _run(self) -> None:
        storage, trial_id, interval, parent = self._args
        while not self._stop.wait(interval):
            if parent is not None and not pid_alive(parent):
                os._exit(EXIT_ORPHANED)
            try:
                storage.set_trial_user_attr(trial_id, HEARTBEAT_KEY, time.time())
            except optuna.exceptions.UpdateFinishedTrialError:  # finished (or marked stale): nothing to renew
                return
            except Exception as err:  # a storage hiccup (network, lock): try again at the next beat
                LOG.warning("heartbeat of trial id %s failed (%s); retrying", trial_id, err)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def recover_stale_trials(study: optuna.Study, stale_after: float = DEFAULTS["stale_after"]) -> list[int]:
    """Mark RUNNING trials whose worker is gone as FAILED and re-enqueue their Arch once; return their numbers.

    A worker is gone when it ran on this host and its PID is dead, or when its lease (heartbeat, else the trial's
    start) is older than `stale_after` seconds (any host; hosts' clocks are assumed to agree to well within that).
    """
    host, now = host_id(), time.time()
    marked = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        attrs = t.user_attrs
        pid, beat = attrs.get(PID_KEY), attrs.get(HEARTBEAT_KEY)
        if beat is None and t.datetime_start is not None:
            beat = t.datetime_start.timestamp()
        if attrs.get(HOST_KEY) == host and isinstance(pid, int) and not pid_alive(pid):
            reason = "stale: worker died"
        elif isinstance(beat, (int, float)) and now - beat > stale_after:
            reason = f"stale: no heartbeat from {attrs.get(HOST_KEY)} pid {pid} for {now - beat:.0f} s"
        else:
            continue
        try:  # whoever tells FAIL first re-enqueues; a concurrent recoverer (or the trial finishing) wins the race
            study._storage.set_trial_user_attr(t._trial_id, FAIL_REASON_KEY, reason)
            study.tell(t.number, state=TrialState.FAIL)
        except (optuna.exceptions.UpdateFinishedTrialError, RuntimeError, ValueError):
            continue
        marked.append(t.number)
        requeue(study, t, "stale")
    return marked


def requeue(study: optuna.Study, t: FrozenTrial | optuna.Trial, why: str) -> bool:
    """Enqueue the params of a trial that did not finish (stale, interrupted) again, keeping its baseline/enqueued
    marks; at most MAX_REQUEUES times along a chain. Returns whether it was enqueued."""
    frozen = study._storage.get_trial(t._trial_id)
    attrs = frozen.user_attrs
    params = attrs.get(ARCH_KEY) or frozen.system_attrs.get("fixed_params") or frozen.params
    requeues = int(attrs.get(REQUEUES_KEY, 0)) + 1
    if not params or requeues > MAX_REQUEUES:
        return False
    keep = {k: attrs[k] for k in ORIGIN_KEYS if attrs.get(k)}
    # not enqueue_trial(skip_if_exists=True): it matches the unfinished trial itself and would never re-enqueue
    study.enqueue_trial(params, user_attrs={REQUEUED_FROM_KEY: frozen.number, REQUEUES_KEY: requeues,
                                            REQUEUE_REASON_KEY: why} | keep)
    return True
