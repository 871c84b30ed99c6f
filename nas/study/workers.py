"""Worker processes: `run_workers` starts N `python -m nas.study --worker SPEC` processes on one storage, relays
their lines and stops them with the coordinator; `worker_main` is a worker's entry point. A worker dies with its
coordinator (Linux parent-death signal, and the heartbeat thread's check of the parent)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import fields, replace

import torch

from nas.study.attrs import counts
from nas.study.leases import EXIT_ORPHANED, pid_alive
from nas.study.run import context, work, worker_threads
from nas.study.settings import SearchStopped, StudyError, StudySettings
from nas.study.storage import load_study, make_sampler

EXIT_STOPPED = 3  # a worker's exit code when it gave up (SearchStopped)


def _worker_command(settings: StudySettings, index: int, device: str | None, first: int,
                    threads: int | None, job: dict | None = None) -> list[str]:
    spec = {"settings": {f.name: getattr(settings, f.name) for f in fields(StudySettings)}, "index": index,
            "device": device, "first": first, "parent": os.getpid(), "threads": threads, "job": job}
    return [sys.executable, "-m", "nas.study", "--worker", json.dumps(spec)]


def run_workers(settings: StudySettings, n: int, devices: Sequence[str], first: int,
                report: Callable[[str], None], job: dict | None = None) -> None:
    """Start `n` worker processes, relay their lines, wait; stop them all on Ctrl-C or when this process exits.

    A worker's lines are plain, each prefixed `[worker i]` here: a finished trial's line and, unless the settings
    are quiet, one as each of its phases starts and one per validation or fine-tuning epoch (`TrialRecorder`);
    workers draw no progress bars, which would garble the one terminal they share.

    `job`: None for search trials; {"confirm": ConfirmPlan fields} for `repnas confirm` runs (`first`: then the
    first follow-up trial number of this run). Raises StudyError when a worker failed while the study still lacks
    trials (or runs), SearchStopped when one gave up."""
    threads = worker_threads(settings, n, devices)
    # own sessions: a terminal's Ctrl-C reaches this process only, which forwards one SIGINT to each worker
    procs = [subprocess.Popen(_worker_command(settings, i, f"cuda:{devices[i % len(devices)]}" if devices else None,
                                              first, threads, job), stdout=subprocess.PIPE, text=True, bufsize=1,
                              start_new_session=True)
             for i in range(n)]

    def relay(i: int, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            report(f"[worker {i}] {line.rstrip()}")

    relays = [threading.Thread(target=relay, args=(i, p), daemon=True) for i, p in enumerate(procs)]
    for thread in relays:
        thread.start()
    try:
        codes = [p.wait() for p in procs]
    except BaseException:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        deadline = time.time() + 30
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
        raise
    finally:
        for thread in relays:
            thread.join(timeout=5)
    study = load_study(settings.name, storage=settings.storage, results=settings.results)
    if job is not None:
        from nas.study.confirm import ConfirmPlan, plan_done

        plan = ConfirmPlan.from_dict(job["confirm"])
        if not plan_done(study, plan) and any(code != 0 for code in codes):
            raise StudyError(f"study {settings.name!r}: confirm worker exit codes {codes} (see their lines above); "
                             f"run `repnas confirm {settings.name}` again to finish the runs left")
        return
    if sum(counts(t) for t in study.get_trials(deepcopy=False)) >= settings.trials:
        return  # the study has its trials, whatever a worker said on its way out
    if any(code not in (0, EXIT_STOPPED) for code in codes):
        raise StudyError(f"study {settings.name!r}: worker exit codes {codes} (see their lines above); resume with "
                         f"`repnas resume {settings.name}`")
    if any(code == EXIT_STOPPED for code in codes):
        raise SearchStopped(f"study {settings.name!r} stopped: a worker gave up (see its lines above)")


def _die_with_parent() -> None:
    """Linux: ask the kernel to SIGKILL this process when its parent dies (no orphaned workers)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # elsewhere the heartbeat thread notices the parent is gone


def worker_main(spec_json: str) -> int:
    """Entry point of a worker process started by `run_workers`; returns its exit code."""
    spec = json.loads(spec_json)
    _die_with_parent()
    if not pid_alive(spec["parent"]):
        return EXIT_ORPHANED
    settings = StudySettings(**spec["settings"])
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    study = load_study(settings.name, storage=settings.storage, results=settings.results)  # made by the coordinator
    if spec.get("job"):
        return _confirm_worker(spec, settings, study)
    study.sampler = make_sampler(settings, 1 + spec["index"] + len(study.get_trials(deepcopy=False)))
    if spec["device"]:
        settings = replace(settings, device=spec["device"])  # this worker's GPU, not the study's setting
    try:
        work(context(settings, study, spec["first"]), lambda line: print(line, flush=True), spec["parent"])
    except SearchStopped as err:
        print(f"stopped: {err}", flush=True)
        return EXIT_STOPPED
    except KeyboardInterrupt:
        return 130
    return 0


def _confirm_worker(spec: dict, settings: StudySettings, study) -> int:
    """A `repnas confirm --workers N` worker: claim and run confirmation runs until none is left."""
    from nas.study.confirm import ConfirmPlan, confirm_work

    plan = ConfirmPlan.from_dict(spec["job"]["confirm"])
    if spec["device"]:
        settings = replace(settings, device=spec["device"])
    try:
        confirm_work(study, settings, plan, lambda line: print(line, flush=True), spec["first"], spec["parent"])
    except KeyboardInterrupt:
        return 130
    return 0
