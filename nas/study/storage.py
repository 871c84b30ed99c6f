"""Where a study lives and how it starts: storage URL -> Optuna storage, the sampler, the environment record, and
creating (frozen baseline latency, baseline enqueued as trial 0) or loading a study.

Default storage: an Optuna journal file, `results/NAME/study.log` (`JournalStorage` on `nas.study.journal.JournalFile`,
which repairs a record torn by a crash or a full disk and names the line of a corrupt one): several
worker processes on one machine share it safely through a file lock (appends only, no "database is locked"), which
SQLite under concurrent writers does not do reliably (Optuna itself advises against SQLite for parallel workers).
Its lock is `nas.files.FileLock` on `study.log.flock`: the kernel releases it when a holder dies (Optuna's default
symlink lock stayed behind a SIGKILLed writer and stalled every other process for its 30 s grace period). Any Optuna
RDB URL (PostgreSQL/MySQL) serves workers on many machines.
"""

from __future__ import annotations

import json
import logging
import socket
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import optuna
import torch

from nas.data import load_data_config
from nas.device import device_label
from nas.files import FileLock
from nas.latency import NOISY_SPREAD, Latency
from nas.study.attrs import (
    BASELINE_KEY,
    BASELINE_LATENCY_KEY,
    BASELINE_LATENCY_MS_KEY,
    BASELINE_LATENCY_TRIES_KEY,
    BASELINE_LATENCY_WARNING_KEY,
    BASELINE_PARAMS_KEY,
    ENQUEUED_KEY,
    ENVIRONMENT_KEY,
    SETTINGS_HISTORY_KEY,
    SETTINGS_KEY,
)
from nas.study.journal import JournalFile, StorageError, io_error
from nas.study.settings import (
    SETTINGS_FORMAT,
    StudyError,
    StudySettings,
    load_baseline,
    load_enqueue,
    settings_json,
    upgrade_stored,
)
from nas.study.trial import time_latency  # the one place a study's timing is defined
from pruning.reparam import fuse_model
from space.builder import build_model
from space.searchspace import load_space

LOG = logging.getLogger("repnas.study")
DIRECTIONS = ("maximize", "minimize")  # the study's objectives: mAP50-95 up, latency_ms down
METRIC_NAMES = ("mAP50-95", "latency_ms")  # their names, as optuna-dashboard and Optuna's plots label them
BASELINE_REMEASURES = 3  # a noisy baseline measurement at creation (p90/median > NOISY_SPREAD) is repeated this often


def journal_path(settings: StudySettings) -> Path:
    return settings.folder / "study.log"


def storage_for(settings: StudySettings, *, create: bool = True,
                repair: bool = False) -> optuna.storages.BaseStorage:
    """The study's storage: the given URL's database, or the journal file results/NAME/study.log.

    With `create=False` a missing journal file raises StudyError (saying how to start the study) instead of
    being created. `repair`: a process about to write (search, resume) moves a torn last journal record aside now,
    under the journal's lock, once the file has been read (a corrupt record stops it first, nothing written); every
    append does so anyway (`nas.study.journal`), and readers (`show`, `export`) never do. Raises StorageError (one
    line, exit 2) for a database that cannot be reached or has an older schema, or a journal that cannot be read.
    """
    if settings.storage:
        return _open_database(settings.storage)
    from optuna.storages.journal import JournalStorage

    path = journal_path(settings)
    if not create and not path.is_file():
        raise StudyError(f"no study {settings.name!r}: {path} does not exist; start it with "
                         f"`repnas search --study {settings.name}` (or pass --storage URL)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise io_error(path.parent, "create the study folder", err) from None
    journal = JournalFile(path, FileLock(path.with_name(path.name + ".flock")), study=settings.name)
    storage = JournalStorage(journal)  # reads every record: a corrupt one raises here, before anything is written
    if repair:
        journal.repair()
    return storage


def mask_url(url: str) -> str:
    """A storage URL as it may be printed: its password as ***."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy parses: printed as given, less anything between :// and @
        head, sep, rest = url.partition("://")
        return head + sep + (f"***@{rest.rpartition('@')[2]}" if "@" in rest else rest)


def _reason(err: BaseException) -> str:
    """A database error in one short line: the driver's error and its first line."""
    cause = getattr(err, "orig", None) or err
    first = (str(cause).strip().splitlines() or [""])[0]
    return f"{type(cause).__name__}: {first}"[:300]


def _open_database(url: str) -> optuna.storages.BaseStorage:
    """Optuna's RDB storage on `url`, or a StorageError saying why not and what to do."""
    import sqlalchemy.exc

    shown = mask_url(url)
    try:
        return optuna.storages.get_storage(url)
    except ImportError as err:
        raise StorageError(f"storage {shown}: its database driver is not installed "
                           f"({_reason(err.__cause__ or err)}); install it (PostgreSQL: `pip install -e "
                           '".[postgres]"`, which brings psycopg2)') from None
    except (sqlalchemy.exc.ArgumentError, ValueError) as err:
        raise StorageError(f"storage {shown} is not a database URL ({_reason(err)}); use e.g. "
                           "postgresql+psycopg2://USER:PASSWORD@HOST:PORT/DATABASE, or leave --storage out for the "
                           "journal file results/NAME/study.log") from None
    except RuntimeError as err:
        if "optuna storage upgrade" in str(err):
            raise StorageError(f"storage {shown}: its schema was set up by an older Optuna than the installed "
                               f"{optuna.__version__}; back the database up, then upgrade it with `optuna storage "
                               f"upgrade --storage {shown}`" + (" (your password in place of ***)" if shown != url
                                                               else "") + " and run again") from None
        if "pip install -U optuna" in str(err):
            raise StorageError(f"storage {shown}: its schema is newer than the installed Optuna {optuna.__version__};"
                               " upgrade Optuna (`pip install -U optuna`) and run again") from None
        raise
    except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as err:
        raise StorageError(f"storage {shown}: cannot connect to the database ({_reason(err.__cause__ or err)}); "
                           "check that its server runs and the URL (host, port, user, password, database), then run "
                           "again") from None


def storage_failure(err: BaseException, storage: str | None = None) -> StorageError | None:
    """`err` as the one-line StorageError it stands for when it is the storage failing during a run (a lost database
    connection: Optuna's StorageInternalError or SQLAlchemy's errors; the journal's own StorageError); None for any
    other error. `storage`: the URL given (None: the journal file)."""
    if isinstance(err, StorageError):
        return err
    sqlalchemy_exc = sys.modules.get("sqlalchemy.exc")
    if isinstance(err, optuna.exceptions.StorageInternalError):
        cause = err.__cause__ or err
    elif sqlalchemy_exc is not None and isinstance(err, sqlalchemy_exc.SQLAlchemyError):
        cause = err
    else:
        return None
    return StorageError(f"storage {mask_url(storage) if storage else '(journal file)'}: failed during the run "
                        f"({_reason(cause)}); the study keeps every write that completed before. Once the database is "
                        "reachable again, run the command again (`repnas resume NAME --storage URL` continues a "
                        "search; trials left RUNNING are failed as stale and run again)")


def make_sampler(settings: StudySettings, stream: int = 0) -> optuna.samplers.BaseSampler:
    """The study's sampler. Optuna 5 samplers read `trial.set_constraint` values (constraints_func is deprecated):
    an over-budget trial sets "budget" = 1.0, so TPE learns where the infeasible region is (NSGA-II and random
    ignore it). `stream` makes each worker process (and each resumed run) draw its own random sequence: the seed is
    settings.seed + 9973 x stream."""
    trials, seed = settings.trials, settings.seed + 9973 * stream
    if settings.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=max(4, min(50, trials // 3)), seed=seed)
    if settings.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # `group` is experimental
        return optuna.samplers.TPESampler(multivariate=True, group=True, seed=seed,
                                          n_startup_trials=max(3, trials // 4))


def load_stored(settings: StudySettings) -> dict | None:
    """The stored settings of an existing study (as stored: any format), or None when there is no study yet
    (nothing is created then)."""
    if not settings.storage and not journal_path(settings).is_file():
        return None
    try:
        study = optuna.load_study(study_name=settings.name, storage=storage_for(settings))
    except KeyError:
        return None
    raw = study.user_attrs.get(SETTINGS_KEY)
    return json.loads(raw) if raw else None


def load_study(name: str, *, storage: str | None = None, results: str = "results") -> optuna.Study:
    """An existing study by name (default storage results/NAME/study.log), or a StudyError."""
    settings = StudySettings(name=name, storage=storage, results=results)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.load_study(study_name=name, storage=storage_for(settings, create=False))
    except KeyError:
        raise StudyError(f"no study {name!r} in {storage or journal_path(settings)}") from None


def stored_settings(study: optuna.Study, name: str, storage: str | None = None,
                    results: str = "results") -> StudySettings:
    """The settings a study holds, in today's names and format (older studies are upgraded as they are read)."""
    raw = study.user_attrs.get(SETTINGS_KEY)
    stored = upgrade_stored(json.loads(raw)) if raw else {}
    known = {k: v for k, v in stored.items() if k in StudySettings.__dataclass_fields__ and
             k not in ("name", "storage", "results", "quiet")}
    return StudySettings(name=name, storage=storage, results=results, **known)


def environment() -> dict:
    """Versions that produced a study's numbers: repnas (and its git commit), Python, torch, CUDA, cuDNN, optuna."""
    import platform
    import subprocess
    from importlib import metadata

    try:
        version = metadata.version("repnas")
    except metadata.PackageNotFoundError:
        version = None
    try:
        git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        git = None
    cudnn = torch.backends.cudnn.version() if torch.cuda.is_available() else None
    return {"repnas": version, "git": git, "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "cudnn": cudnn, "optuna": optuna.__version__, "host": socket.gethostname()}


def _record_settings(study: optuna.Study, settings: StudySettings, why: str) -> None:
    """Replace a study's stored settings, keeping the old ones in its settings history."""
    history = list(study.user_attrs.get(SETTINGS_HISTORY_KEY, []))
    history.append({"time": time.time(), "why": why, "settings": json.loads(study.user_attrs[SETTINGS_KEY])})
    study.set_user_attr(SETTINGS_HISTORY_KEY, history)
    study.set_user_attr(SETTINGS_KEY, settings_json(settings))


def name_objectives(study: optuna.Study) -> None:
    """Store the objectives' names (`study.set_metric_names`: the study system attr "study:metric_names") unless
    the study holds them already: at creation, and on resume for a study made before repnas stored them."""
    if study.metric_names != list(METRIC_NAMES):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # experimental since Optuna 3.2
            study.set_metric_names(list(METRIC_NAMES))


def measure_baseline(fused: torch.nn.Module, settings: StudySettings) -> tuple[Latency, list[Latency], str | None]:
    """The baseline latency a new study freezes, timed exactly as its trials are (`time_latency`: the same device,
    backend, LatencyConfig and threads, size and batch, interleaved, here against a copy of itself), so trial 0's
    measured median matches it. A noisy measurement (p90/median > NOISY_SPREAD: a busy machine) is repeated up to
    BASELINE_REMEASURES times. Returns the measurement to freeze (the first quiet one; else the lowest median, the
    least disturbed), every measurement, and a warning for the study when none was quiet (the study proceeds)."""
    tries = [time_latency(fused, settings, fused)]
    while tries[-1].noisy and len(tries) <= BASELINE_REMEASURES:
        LOG.info("baseline latency: p90/median %.2f > %g, measuring again (%d of %d)", tries[-1].spread,
                 NOISY_SPREAD, len(tries), BASELINE_REMEASURES)
        tries.append(time_latency(fused, settings, fused))
    if not tries[-1].noisy:
        return tries[-1], tries, None
    frozen = min(tries, key=lambda t: t.median_ms)
    spreads = ", ".join(f"{t.spread:.2f}" for t in tries)
    warning = (f"the baseline latency was noisy in all {len(tries)} measurements at creation (p90/median {spreads}; "
               f"a quiet machine stays below {NOISY_SPREAD:g}): the frozen {frozen.median_ms:.3f} ms (the lowest "
               "median) may read high, and every trial's latency_ms (ratio x that figure) with it; latency_ratio and "
               "latency_measured_ms do not depend on it. For objectives that read as latency, create the study again "
               "on a quiet machine")
    return frozen, tries, warning


def create_or_load_study(settings: StudySettings, *, enqueue: Sequence[str] = (),
                         measure: Callable[[torch.nn.Module, StudySettings], tuple[Latency, list[Latency], str | None]]
                         | None = None) -> optuna.Study:
    """Create the study (frozen baseline latency measured, baseline enqueued as trial 0) or load it.

    `settings` must be merged and resolved (`nas.study.run.prepare_study` does that). The objectives get their names
    (`name_objectives`; an older study's on its first resume). A loaded study whose stored settings differ from
    `settings` (a forced change, or an older format) gets them replaced, the old ones kept in its settings history.
    `enqueue`: YAMLs of known candidates to enqueue (after the baseline). `measure`: how the frozen baseline is timed
    (None: `measure_baseline` in this process; `nas.study.run.run_search` passes
    `nas.study.workers.measure_baseline_in_worker` when the trials run in GPU worker processes, so the baseline is
    timed on worker 0's GPU, backend and threads, and the coordinator never touches a GPU). Raises StudyError when
    another process created the study meanwhile with other settings.
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=storage_for(settings, repair=True), study_name=settings.name,
                                load_if_exists=True, directions=list(DIRECTIONS),
                                sampler=make_sampler(settings))
    space = load_space(settings.space)
    extra = [load_enqueue(path, space) for path in enqueue]  # all checked before anything is written
    name_objectives(study)
    if SETTINGS_KEY in study.user_attrs:
        stored, wanted = json.loads(study.user_attrs[SETTINGS_KEY]), json.loads(settings_json(settings))
        if stored != wanted:
            old_format = stored.get("format", 1) < SETTINGS_FORMAT
            _record_settings(study, settings, "format upgrade" if old_format else "settings changed")
    else:
        data_cfg = load_data_config(settings.data)
        baseline = load_baseline(settings.baseline, space)
        fused = fuse_model(build_model(baseline.to_yaml(data_cfg.nc)))
        lat, tries, warning = (measure or measure_baseline)(fused, settings)  # frozen for the study's life
        if SETTINGS_KEY in study.user_attrs:  # another host created it while this one measured (read afresh)
            if study.user_attrs[SETTINGS_KEY] != settings_json(settings):
                raise StudyError(f"study {settings.name!r} was created by another process while this one measured "
                                 "its baseline, with other settings; run the same command again to join it with "
                                 "the stored settings (or use another --study name)")
            LOG.info("study %s was created by another process meanwhile: joining it, its baseline latency %.3f ms "
                     "is kept", settings.name, study.user_attrs[BASELINE_LATENCY_MS_KEY])
        else:
            study.set_user_attr(BASELINE_LATENCY_MS_KEY, lat.median_ms)
            study.set_user_attr(BASELINE_LATENCY_KEY, lat.to_dict())
            study.set_user_attr(BASELINE_LATENCY_TRIES_KEY, [{"median_ms": t.median_ms, "p90_ms": t.p90_ms}
                                                             for t in tries])
            if warning:
                study.set_user_attr(BASELINE_LATENCY_WARNING_KEY, warning)
            study.set_user_attr(BASELINE_PARAMS_KEY, baseline.to_params())
            study.set_user_attr(ENVIRONMENT_KEY, environment())
            study.enqueue_trial(baseline.to_params(), user_attrs={BASELINE_KEY: True}, skip_if_exists=True)
            study.set_user_attr(SETTINGS_KEY, settings_json(settings))  # last: without it, not yet created
            LOG.info("created study %s: baseline latency %.3f ms (median; p90 %.3f ms) at %dx%d px, batch %d, on %s",
                     settings.name, lat.median_ms, lat.p90_ms, *lat.imgsz, lat.batch, device_label(lat.device))
            if warning:
                LOG.warning("warning: %s", warning)
    for params in extra:
        study.enqueue_trial(params, user_attrs={ENQUEUED_KEY: True}, skip_if_exists=True)
    return study
