"""The search study: Optuna trials that take one sampled Arch each through build -> cost -> budget -> latency ->
proxy training -> fusion -> evaluation (-> channel pruning), with two objectives (mAP50-95 up, latency_ms down).

One module per concern; this package re-exports their public names (`from nas.study import run_search`):

    settings.py   StudySettings, defaults, what is frozen on resume, merging, the demo, baseline/enqueue loading, checks
    attrs.py      the trial-record schema: one constant per user-attr key, reason keys, what counts toward --trials
    storage.py    storage URL -> storage (journal file + FileLock), sampler, environment record, create/load a study
    journal.py    the journal file study.log: its own scan, a torn last record moved aside, failed appends undone
    trial.py      one trial as named phases over a TrialRecorder (folder, files + sha256, phase seconds, log)
    leases.py     claims, host id, heartbeats, stale recovery, re-enqueue
    followups.py  results added after a trial finished (a companion study of follow-up trials)
    run.py        prepare_study, run_search (the coordinator), the worker loop
    workers.py    worker processes (`python -m nas.study --worker SPEC`), parent death
    report.py     trial records, printed lines, `repnas show`, exports, weight clean-up
"""

from nas.study.attrs import NOT_COUNTED, counts
from nas.study.attrs import SETTINGS_KEY as SETTINGS_ATTR
from nas.study.followups import add_result, companion, fail_followup, finish_followup, followups, start_followup
from nas.study.leases import (
    EXIT_ORPHANED,
    MAX_REQUEUES,
    Heartbeat,
    claim_trial,
    host_id,
    recover_stale_trials,
    requeue,
)
from nas.study.report import (
    WEIGHT_FILES,
    clean_study,
    clean_weights,
    export_files,
    export_study,
    show_study,
    summary_line,
    trial_line,
    trial_records,
    weights_to_keep,
)
from nas.study.run import default_workers, prepare_study, run_search
from nas.study.settings import (
    DEFAULTS,
    DEMO,
    DEVICE_PROXY,
    FROZEN,
    HEARTBEAT_S,
    STORED,
    InvalidStudyName,
    SearchStopped,
    StudyError,
    StudySettings,
    check_settings,
    check_study_name,
    demo_settings,
    device_proxy,
    latency_config,
    load_baseline,
    load_enqueue,
    merge_settings,
    proxy_config,
    settings_json,
    trial_folder,
)
from nas.study.storage import create_or_load_study, environment, load_study, make_sampler, storage_for, stored_settings
from nas.study.trial import FUSION_TOLERANCE, TrialRecorder, TrialRejected, run_trial
from nas.study.workers import EXIT_STOPPED, worker_main

__all__ = [
    "DEFAULTS", "DEMO", "DEVICE_PROXY", "EXIT_ORPHANED", "EXIT_STOPPED", "FROZEN", "FUSION_TOLERANCE", "HEARTBEAT_S",
    "MAX_REQUEUES",
    "NOT_COUNTED", "SETTINGS_ATTR", "STORED", "WEIGHT_FILES", "Heartbeat", "InvalidStudyName", "SearchStopped",
    "StudyError", "StudySettings", "TrialRecorder", "TrialRejected", "add_result", "check_settings",
    "check_study_name", "claim_trial", "clean_study", "clean_weights", "companion", "counts", "create_or_load_study",
    "default_workers", "demo_settings", "device_proxy", "environment", "export_files", "export_study", "fail_followup",
    "finish_followup", "followups", "host_id", "latency_config", "load_baseline", "load_enqueue", "load_study",
    "make_sampler", "merge_settings", "prepare_study", "proxy_config", "recover_stale_trials", "requeue",
    "run_search", "run_trial", "settings_json", "show_study", "start_followup", "storage_for", "stored_settings",
    "summary_line", "trial_folder", "trial_line", "trial_records", "weights_to_keep", "worker_main",
]
