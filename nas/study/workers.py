"""Worker processes: `run_workers` starts N `python -m nas.study --worker SPEC` processes on one storage, relays
their lines and stops them with the coordinator; `worker_main` is a worker's entry point. A worker dies with its
coordinator (Linux parent-death signal, and the heartbeat thread's check of the parent).

A worker on a GPU sees only that GPU: its environment sets CUDA_VISIBLE_DEVICES, so its GPU is its cuda:0 and
nothing it does (CUDA contexts, pinned-memory threads, events, caches) can land on another; a worker of a CPU study
sees no GPU at all. `measure_baseline_in_worker` times a new study's frozen baseline in a process set up exactly as
worker 0 (its GPU, its threads), so the baseline is timed where, and as, the trials are.
"""

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

from nas.device import resolve_device
from nas.latency import Latency
from nas.study.attrs import counts
from nas.study.leases import EXIT_ORPHANED, pid_alive
from nas.study.run import context, work, worker_threads
from nas.study.settings import SearchStopped, StudyError, StudySettings
from nas.study.storage import load_study, make_sampler
from space.errors import RepnasError

EXIT_STOPPED = 3  # a worker's exit code when it gave up (SearchStopped)
BASELINE_LINE = "baseline latency: "  # the line a baseline-timing worker prints its measurements on (JSON)


def cuda_visible(index: str) -> str:
    """The CUDA_VISIBLE_DEVICES entry for this process's CUDA device `index` (a --devices value): the index itself,
    or, when this process's own CUDA_VISIBLE_DEVICES narrows the GPUs, its entry at that position (an index, UUID or
    MIG id). Raises StudyError for an index beyond the GPUs this process sees."""
    own = os.environ.get("CUDA_VISIBLE_DEVICES")
    if own is None:
        return str(int(index))
    entries = [e.strip() for e in own.split(",") if e.strip()]
    if int(index) >= len(entries):
        raise StudyError(f"--devices {index}: this process sees {len(entries)} GPU(s) (CUDA_VISIBLE_DEVICES={own!r}); "
                         f"use an index below {len(entries)}")
    return entries[int(index)]


def worker_gpu(settings: StudySettings, devices: Sequence[str], index: int) -> str | None:
    """Worker `index`'s GPU as this process numbers it: devices[index mod len] with --devices, else the study
    device's index when it is CUDA (0 for "cuda" and "auto"), None on a CPU."""
    if devices:
        return devices[index % len(devices)]
    device = resolve_device(settings.device)
    return str(device.index or 0) if device.type == "cuda" else None


def worker_env(gpu: str | None) -> dict[str, str]:
    """A worker's environment: this one's, with CUDA_VISIBLE_DEVICES naming only its GPU (`cuda_visible`), or no GPU
    at all for a CPU worker (so not even a pinned-memory buffer makes a CUDA context on GPU 0)."""
    return dict(os.environ) | {"CUDA_VISIBLE_DEVICES": "" if gpu is None else cuda_visible(gpu)}


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
    gpus = [worker_gpu(settings, devices, i) for i in range(n)]
    # own sessions: a terminal's Ctrl-C reaches this process only, which forwards one SIGINT to each worker
    procs = [subprocess.Popen(_worker_command(settings, i, None if gpu is None else "cuda:0", first, threads, job),
                              env=worker_env(gpu), stdout=subprocess.PIPE, text=True, bufsize=1,
                              start_new_session=True)
             for i, gpu in enumerate(gpus)]

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
    if (spec.get("job") or {}).get("baseline"):
        return _baseline_worker(spec, settings)
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


def measure_baseline_in_worker(fused: torch.nn.Module, settings: StudySettings, *, gpu: str | None,
                               threads: int | None) -> tuple[Latency, list[Latency], str | None]:
    """`nas.study.storage.measure_baseline`, run in a process set up as worker 0 is (`worker_env(gpu)`: its GPU as
    its cuda:0; `threads` torch threads) rather than in the coordinator, whose current device is GPU 0 whatever
    --devices says. Same signature and returns as `measure_baseline`; `fused` is not sent: the worker builds the
    baseline from `settings` as the coordinator did (latency needs no weights). Its stderr passes through. Raises
    StudyError when the worker fails, with its last line."""
    spec_settings = replace(settings, quiet=True)
    command = _worker_command(spec_settings, 0, None if gpu is None else "cuda:0", 0, threads, {"baseline": True})
    proc = subprocess.run(command, env=worker_env(gpu), stdout=subprocess.PIPE, text=True, check=False)
    found = [line[len(BASELINE_LINE):] for line in proc.stdout.splitlines() if line.startswith(BASELINE_LINE)]
    if proc.returncode != 0 or not found:
        last = (proc.stdout.strip().splitlines() or ["(no output; see its error above)"])[-1]
        raise StudyError(f"study {settings.name!r}: timing the baseline in a worker process on "
                         f"{'GPU ' + gpu if gpu is not None else 'the CPU'} failed (exit code {proc.returncode}): "
                         f"{last}")
    data = json.loads(found[-1])
    return Latency.from_dict(data["frozen"]), [Latency.from_dict(t) for t in data["tries"]], data["warning"]


def _baseline_worker(spec: dict, settings: StudySettings) -> int:
    """A worker that times a new study's baseline (`measure_baseline_in_worker`) and prints the result."""
    from nas.data import load_data_config
    from nas.study.settings import load_baseline
    from nas.study.storage import measure_baseline
    from pruning.reparam import fuse_model
    from space.builder import build_model
    from space.searchspace import load_space

    if spec["device"]:
        settings = replace(settings, device=spec["device"])
    try:
        baseline = load_baseline(settings.baseline, load_space(settings.space))
        fused = fuse_model(build_model(baseline.to_yaml(load_data_config(settings.data).nc)))
        frozen, tries, warning = measure_baseline(fused, settings)
    except RepnasError as err:  # e.g. a CUDA graph that cannot be captured: one line for the coordinator
        print(f"{type(err).__name__}: {' '.join(str(err).split())}", flush=True)
        return 2
    except KeyboardInterrupt:
        return 130
    print(BASELINE_LINE + json.dumps({"frozen": frozen.to_dict(), "tries": [t.to_dict() for t in tries],
                                      "warning": warning}), flush=True)
    return 0
