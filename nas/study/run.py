"""Running a study: `prepare_study` (resolve settings, create or load), `run_search` (the coordinator), and the
worker loop `work` (claim a trial, run it, tell it, export) that every worker process runs."""

from __future__ import annotations

import logging
import os
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from nas.data import DataConfig, load_data_config
from nas.device import resolve_device
from nas.files import write_text_atomic
from nas.study.attrs import BASELINE_PARAMS_KEY, FAIL_REASON_KEY, PRUNED_REASON_KEY, REQUEUED_FROM_KEY, counts
from nas.study.leases import MAX_REQUEUES, Heartbeat, claim_trial, recover_stale_trials, requeue
from nas.study.report import clean_weights, export_files, proxy_summary, trial_line
from nas.study.settings import (
    DEVICE_PROXY,
    SearchStopped,
    StudySettings,
    check_settings,
    demo_settings,
    merge_settings,
    resolve_settings,
    trial_folder,
)
from nas.study.storage import create_or_load_study, load_stored, make_sampler, mask_url, storage_failure
from nas.study.trial import run_trial
from pruning.reparam import fuse_model
from space.builder import build_model
from space.errors import shorten
from space.searchspace import Arch, Space, load_space

LOG = logging.getLogger("repnas.study")
MAX_REASON = 300  # characters of a failed trial's stored reason (cut at a word, "…"); the traceback is in its folder


def prepare_study(settings: StudySettings, *, force: bool = False, enqueue: Sequence[str] = (),
                  latency_threads: int | None = None,
                  measure: Callable | None = None) -> tuple[StudySettings, optuna.Study]:
    """Resolve `settings` against the stored ones and create or load the study (no trial is run).

    A new study without `data` is the demo (`DEMO` settings, its synthetic set). A new study's proxy and latency
    settings are stored resolved; `latency_threads`: the CPU threads its trials will be timed with (None: torch's
    current count). `measure`: how a new study's frozen baseline is timed (None: `measure_baseline` in this
    process; `run_search` passes `measure_baseline_in_worker` when trials run in GPU worker processes). Raises
    StudyError (or the loader's error) for bad or changed settings before writing anything.
    """
    from nas.synth import DEMO_DATA, default_dataset

    stored = load_stored(settings)
    if stored is None and settings.data is None:
        settings = demo_settings(settings)
    settings = merge_settings(settings, stored, force=force)
    if settings.data is None:  # only a new study without --data: a stored study always names its data
        settings = replace(settings, data=str(default_dataset(DEMO_DATA).resolve()))
    if stored is None:
        settings = resolve_settings(settings, latency_threads=latency_threads)
    elif settings.latency_imgsz is None:
        settings = replace(settings, latency_imgsz=load_space(settings.space).imgsz)
    check_settings(settings)  # bad input fails here, before anything is written
    if measure is None:
        return settings, create_or_load_study(settings, enqueue=enqueue)
    return settings, create_or_load_study(settings, enqueue=enqueue, measure=measure)


def device_proxy_line(settings: StudySettings, given_proxy: dict) -> str | None:
    """What a new --data study says once when its device type's proxy defaults (DEVICE_PROXY) filled keys the user
    did not give; None when none did."""
    kind = resolve_device(settings.device).type
    filled = [k for k in DEVICE_PROXY.get(kind, {}) if k not in given_proxy]
    if not filled:
        return None
    options = " ".join(f"--{k.replace('_', '-')}" for k in filled)
    return (f"study {settings.name}: proxy {proxy_summary(settings.proxy)} ({', '.join(filled)}: the {kind.upper()} "
            f"defaults of nas.study.settings.DEVICE_PROXY, chosen in benchmarks/RESULTS.md 'Proxy fidelity'; "
            f"{options} to change)")


def default_workers(settings: StudySettings, *, demo: bool, devices: Sequence[str] = ()) -> int:
    """Workers when --workers is not given: 1; the demo on a CPU, one single-threaded worker per core, up to 2.

    The demo's small models at 64 px train faster as one single-threaded process per core than as one process
    using every core (its threads mostly wait on each other at these sizes; see benchmarks/RESULTS.md)."""
    if demo and not devices and resolve_device(settings.device).type == "cpu":
        return min(2, os.cpu_count() or 1)
    return 1


def worker_threads(settings: StudySettings, workers: int, devices: Sequence[str] = ()) -> int | None:
    """CPU threads per worker process when `workers` share this CPU (no oversubscription); None on GPUs or for one
    in-process worker (torch's own count)."""
    if workers > 1 and not devices and resolve_device(settings.device).type == "cpu":
        return max(1, (os.cpu_count() or 1) // workers)
    return None


def run_search(settings: StudySettings, *, report: Callable[[str], None] | None = None, workers: int | None = None,
               devices: Sequence[str] = (), force: bool = False, enqueue: Sequence[str] = ()) -> optuna.Study:
    """Run (or resume) a study until `settings.trials` trials count; export the Pareto files after every trial.

    `workers` > 1 (or any `devices`, CUDA indices: worker i uses devices[i % len]) runs that many worker processes
    against the storage, each seeing only its GPU (`nas.study.workers.worker_env`); this process coordinates (None:
    `default_workers`) and, when those workers run on GPUs, has a new study's baseline timed by a process set up as
    worker 0 (`measure_baseline_in_worker`), so the coordinator itself never touches a GPU. One in-process worker on
    `cuda:N` makes N this process's current device (pinned-memory threads follow it). Returns the study. Raises
    StudyError for bad or changed settings, SearchStopped after `max_failures` failed trials in this run or when
    the sampler keeps proposing Archs that are over budget or already trained. Ctrl-C fails the running trial(s)
    ("interrupted") and re-raises.
    """
    report = report or (lambda line: None)
    stored = load_stored(settings)
    demo = settings.data is None and stored is None
    if workers is None:  # this run's --workers, else the study's stored layout, else the default
        workers = settings.workers or (stored or {}).get("workers") or default_workers(settings, demo=demo,
                                                                                       devices=devices)
    settings = replace(settings, workers=workers)  # the next resume's default (--devices are each host's own)
    n = max(workers, len(devices))
    threads = worker_threads(settings, n, devices)
    in_process = n <= 1 and not devices
    measure = None
    gpu_workers = bool(devices) or (not in_process and resolve_device(settings.device).type == "cuda")
    if stored is None and gpu_workers:  # a new study whose trials are timed in GPU worker processes
        from nas.study.workers import measure_baseline_in_worker, worker_gpu

        measure = partial(measure_baseline_in_worker, gpu=worker_gpu(settings, devices, 0), threads=threads)
    given_proxy = settings.proxy or {}
    settings, study = prepare_study(settings, force=force, enqueue=enqueue, latency_threads=threads,
                                    measure=measure)
    if stored is None and not demo and not settings.quiet:  # quiet: the trials' lines only
        said = device_proxy_line(settings, given_proxy)
        if said:
            report(said)
    stale = recover_stale_trials(study, settings.stale_after)
    requeued = {t.user_attrs.get(REQUEUED_FROM_KEY) for t in study.get_trials(deepcopy=False, states=(
        TrialState.WAITING,))} if stale else set()
    for number in stale:  # requeue() enqueues nothing for a trial killed before its Arch was sampled
        for tmp in trial_folder(settings, number).glob(".*.tmp"):  # what a write cut short by the kill left
            tmp.unlink(missing_ok=True)
        report(f"trial {number:>4} FAILED   stale: its worker is gone; " + (
            "its Arch is enqueued again" if number in requeued else
            f"its Arch is not enqueued again (none sampled yet, or tried {MAX_REQUEUES + 1} times)"))
    first = run_start(study)
    counted = sum(counts(t) for t in study.get_trials(deepcopy=False))
    if counted >= settings.trials:  # nothing to run: say how to ask for more
        report(finished_line(settings, counted))
    elif in_process:
        device = resolve_device(settings.device)
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)  # the current device: pinned-memory threads and caches land there, not on 0
        study.sampler = make_sampler(settings, len(study.get_trials(deepcopy=False)))  # each run: its own draws
        work(context(settings, study, first), report)
    else:
        from nas.study.workers import run_workers

        run_workers(settings, n, devices, first, report)
    # Once more at the end of every run: a process killed after telling its last trial but before (or while)
    # writing the Pareto files left them behind the study, and a resume with no trial left to run must repair them.
    safe("Pareto export", export_files, study, settings)
    counted = sum(counts(t) for t in study.get_trials(deepcopy=False))
    running = sum(t.state == TrialState.RUNNING for t in study.get_trials(deepcopy=False))
    if counted < settings.trials and running:
        report(f"{counted} of {settings.trials} trials counted; {running} still RUNNING in other workers")
    return study


def finished_line(settings: StudySettings, counted: int) -> str:
    """What a run says when its study already holds its --trials counted trials: how to add more (half as many
    again, at least one), with the options that find the study."""
    have = (f"its {counted} trial{'s' if counted != 1 else ''}" if counted == settings.trials else
            f"{counted} counted trials (--trials {settings.trials})")
    more = max(counted, settings.trials) + max(1, max(counted, settings.trials) // 2)
    return (f"study {settings.name} already has {have}; add trials with "
            f"`repnas resume {settings.name} --trials {more}{location_options(settings)}`")


def location_options(settings: StudySettings) -> str:
    """The options a later command needs to find this study ('' for results/NAME/study.log); a password masked."""
    return (f" --storage {mask_url(settings.storage)}" if settings.storage else "") + (
        f" --results {settings.results}" if settings.results != "results" else "")


def run_start(study: optuna.Study) -> int:
    """The first trial number a run about to start can create or run: the lowest WAITING one, else the next."""
    trials = study.get_trials(deepcopy=False)
    return min([t.number for t in trials if t.state == TrialState.WAITING] + [len(trials)])


def _failures_since(study: optuna.Study, first: int) -> list[FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
            if t.number >= first and not str(t.user_attrs.get(FAIL_REASON_KEY, "")).startswith("stale")]


@dataclass
class Context:
    """What every trial of a run needs, loaded once per worker."""

    settings: StudySettings
    study: optuna.Study
    space: Space
    data_cfg: DataConfig
    baseline_fused: torch.nn.Module
    first: int  # trials numbered from here on were created by this run (max_failures counts their failures)


def context(settings: StudySettings, study: optuna.Study, first: int) -> Context:
    """Load the space, the data and the fused baseline once for a worker's trials."""
    space = load_space(settings.space)
    data_cfg = load_data_config(settings.data)
    baseline = Arch.from_params(study.user_attrs[BASELINE_PARAMS_KEY], space)
    return Context(settings, study, space, data_cfg, fuse_model(build_model(baseline.to_yaml(data_cfg.nc))), first)


def safe(what: str, fn: Callable, *args) -> None:
    """Run a reporting/housekeeping step; its failure is logged, never fatal to the worker."""
    try:
        fn(*args)
    except Exception as err:  # e.g. a full disk while writing the Pareto PNG: the study itself is intact
        LOG.warning("%s failed: %s: %s", what, type(err).__name__, err)


def _finish(study: optuna.Study, trial: optuna.Trial, **tell) -> bool:
    """Tell the trial's end; False when it was already finished by someone else (its lease was taken as lost)."""
    try:
        study.tell(trial, **tell)
    except (optuna.exceptions.UpdateFinishedTrialError, RuntimeError, ValueError) as err:
        if study._storage.get_trial(trial._trial_id).state.is_finished():
            return False
        raise err
    return True


def _run_one(ctx: Context, trial: optuna.Trial, parent_pid: int | None,
             report: Callable[[str], None] | None = None) -> bool:
    """Run one claimed trial and tell its end (any trial error fails the trial, not the study); False when its
    result could not be recorded because another process had taken it for dead. `report` gets its phase lines."""
    settings, study = ctx.settings, ctx.study
    try:
        with Heartbeat(study, trial._trial_id, parent_pid=parent_pid):
            values = run_trial(trial, settings, ctx.space, ctx.data_cfg, ctx.baseline_fused, report)
    except optuna.exceptions.UpdateFinishedTrialError:
        return False  # marked stale by another process while it ran: its result cannot be recorded
    except optuna.TrialPruned as reason:
        try:
            trial.set_user_attr(PRUNED_REASON_KEY, trial.user_attrs.get(PRUNED_REASON_KEY) or str(reason))
            return _finish(study, trial, state=TrialState.PRUNED)
        except optuna.exceptions.UpdateFinishedTrialError:
            return False
    except KeyboardInterrupt:
        try:
            trial.set_user_attr(FAIL_REASON_KEY, "interrupted")
            if _finish(study, trial, state=TrialState.FAIL):
                requeue(study, trial, "interrupted")  # the baseline or an enqueued candidate is not lost
        finally:
            safe("Pareto export", export_files, study, settings)
        raise
    except Exception as err:
        if storage_failure(err) is not None:
            raise  # the storage itself failed: no trial fault; the run ends, a resume fails this trial as stale
        reason = shorten(f"{type(err).__name__}: {err}", MAX_REASON)
        folder = trial_folder(settings, trial.number)
        folder.mkdir(parents=True, exist_ok=True)
        safe("traceback", write_text_atomic, folder / "traceback.txt", traceback.format_exc())
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # after an OOM the next trial should start from a clean cache
        try:
            trial.set_user_attr(FAIL_REASON_KEY, reason)
            return _finish(study, trial, state=TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            return False
    return _finish(study, trial, values=values)


def work(ctx: Context, report: Callable[[str], None], parent_pid: int | None = None) -> None:
    """One worker's loop: claim a trial, run it, tell it, export; until the study has its trials.

    Raises SearchStopped after `max_failures` failed trials of this run, or after many Archs in a row were over
    budget or duplicates."""
    settings, study = ctx.settings, ctx.study
    skipped_in_a_row, max_skipped = 0, max(20, 5 * settings.trials)
    while sum(counts(t) for t in study.get_trials(deepcopy=False)) < settings.trials:
        trial = claim_trial(study, settings)
        if trial is None:  # enough trials are running: unless one of them belongs to a dead worker, we are done
            if recover_stale_trials(study, settings.stale_after):
                continue
            return
        if not _run_one(ctx, trial, parent_pid, report):
            report(f"trial {trial.number:>4} lost its lease (marked stale by another worker); its result is dropped")
            continue
        frozen = study._storage.get_trial(trial._trial_id)
        skipped_in_a_row = 0 if counts(frozen) or frozen.state == TrialState.FAIL else skipped_in_a_row + 1
        report(trial_line(frozen))
        safe("Pareto export", export_files, study, settings)
        if settings.keep_weights is not None:
            safe("weights cleaning", clean_weights, study, settings, settings.keep_weights)
        failures = _failures_since(study, ctx.first)
        if len(failures) >= settings.max_failures:
            last = failures[-1]
            raise SearchStopped(f"study {settings.name!r} stopped: {len(failures)} trials failed in this run "
                                f"(max_failures={settings.max_failures}); last: "
                                f"{last.user_attrs.get(FAIL_REASON_KEY)}. See "
                                f"{trial_folder(settings, last.number) / 'traceback.txt'}")
        if skipped_in_a_row >= max_skipped:
            raise SearchStopped(f"study {settings.name!r} stopped: the last {skipped_in_a_row} sampled Archs were "
                                "over budget or already trained; widen the space or its budgets")
