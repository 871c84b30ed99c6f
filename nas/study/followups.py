"""Results that arrive after a trial finished: confirmation runs at a longer budget, latency on other hardware, ...

Optuna refuses writes to a finished trial (`UpdateFinishedTrialError`), and one study attr holding a shared dict
loses updates when two workers write it at once. So every later result is a trial of its own in a companion study
of the same storage, `NAME:followups` (':' is never in a study name, so it cannot collide with one). Each follow-up
trial records its target trial, a kind ("confirm", "latency", ...) and a key (e.g. "epochs=40,seed=1"), holds a
lease while it runs (`nas.study.leases`: host, PID, heartbeat; `recover_stale_trials(companion(study))` fails the
ones whose worker died), and carries its result when COMPLETE. Creating a trial is atomic in every Optuna storage,
so concurrent writers never lose each other's results. A finished result is also mirrored into the main study as
one study attr per key, `followup:KIND:TRIAL:KEY`, for readers that only see study attrs (optuna-dashboard).
"""

from __future__ import annotations

import optuna
from optuna.trial import TrialState

from nas.study.attrs import FAIL_REASON_KEY, FOLLOWUP_KEY_PREFIX
from nas.study.settings import StudyError

COMPANION_SUFFIX = ":followups"
TARGET_KEY = "followup_target"  # the main study's trial number the result belongs to
KIND_KEY = "followup_kind"
KEY_KEY = "followup_key"
RESULT_KEY = "followup_result"


def companion(study: optuna.Study) -> optuna.Study:
    """The study's companion of follow-up trials (created on first use, in the same storage)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    name = study.study_name + COMPANION_SUFFIX
    try:  # loading first: a create attempt on an existing study still appends a record to a journal
        return optuna.load_study(study_name=name, storage=study._storage)
    except KeyError:
        return optuna.create_study(study_name=name, storage=study._storage, load_if_exists=True,
                                   direction="minimize")


def _check(kind: str, key: str) -> None:
    for name, value in (("kind", kind), ("key", key)):
        if not isinstance(value, str) or not value or ":" in value:
            raise StudyError(f"follow-up {name} {value!r} must be a non-empty string without ':'")


def start_followup(study: optuna.Study, target: int, kind: str, key: str) -> optuna.Trial:
    """A RUNNING follow-up trial for trial `target` of `study`, leased to this process.

    The trial is created with its target, kind, key and lease in one storage write (a template trial), so a process
    killed while claiming never leaves a RUNNING follow-up that names nothing and holds no lease. Raises StudyError
    when `target` is not a finished trial of `study` or `kind`/`key` are not plain names.
    """
    import os
    import time

    from optuna.trial import create_trial

    from nas.study.attrs import HEARTBEAT_KEY, HOST_KEY, PID_KEY
    from nas.study.leases import host_id

    _check(kind, key)
    trials = study.get_trials(deepcopy=False)
    if not 0 <= target < len(trials) or not trials[target].state.is_finished():
        raise StudyError(f"study {study.study_name!r} has no finished trial {target} to add a {kind} result to")
    comp = companion(study)
    template = create_trial(state=TrialState.RUNNING, user_attrs={
        TARGET_KEY: target, KIND_KEY: kind, KEY_KEY: key, HOST_KEY: host_id(), PID_KEY: os.getpid(),
        HEARTBEAT_KEY: time.time()})
    return optuna.Trial(comp, comp._storage.create_new_trial(comp._study_id, template_trial=template))


def finish_followup(study: optuna.Study, trial: optuna.Trial, result: dict) -> None:
    """Record `result` (JSON-serialisable) on the follow-up trial, tell it COMPLETE, and mirror it into `study`."""
    trial.set_user_attr(RESULT_KEY, result)
    companion(study).tell(trial, 0.0)
    attrs = trial.user_attrs
    study.set_user_attr(f"{FOLLOWUP_KEY_PREFIX}{attrs[KIND_KEY]}:{attrs[TARGET_KEY]}:{attrs[KEY_KEY]}", result)


def fail_followup(study: optuna.Study, trial: optuna.Trial, reason: str) -> None:
    """Tell a follow-up trial FAIL with its reason (nothing is mirrored)."""
    trial.set_user_attr(FAIL_REASON_KEY, reason)
    companion(study).tell(trial, state=TrialState.FAIL)


def add_result(study: optuna.Study, target: int, kind: str, key: str, result: dict) -> None:
    """Add a result that needs no running time (a measurement already made) to finished trial `target`."""
    finish_followup(study, start_followup(study, target, kind, key), result)


def followups(study: optuna.Study, kind: str | None = None) -> dict[int, dict[str, dict]]:
    """The COMPLETE follow-up results of `study` (of one `kind`, or all as "KIND:KEY"): target trial -> key ->
    result; for a key recorded twice the later trial wins."""
    out: dict[int, dict[str, dict]] = {}
    try:
        trials = optuna.load_study(study_name=study.study_name + COMPANION_SUFFIX,
                                   storage=study._storage).get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    except KeyError:  # no follow-up yet
        return out
    for t in trials:
        a = t.user_attrs
        if kind is not None and a.get(KIND_KEY) != kind:
            continue
        key = a[KEY_KEY] if kind is not None else f"{a[KIND_KEY]}:{a[KEY_KEY]}"
        out.setdefault(a[TARGET_KEY], {})[key] = a[RESULT_KEY]
    return out
