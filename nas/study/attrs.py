"""The study's record schema: one named constant per user-attr key, written and read through that name (Optuna's
style: `_CONSTRAINTS_KEY = "constraints"`), and the rule for which finished trials count toward `--trials`.

Trial states: COMPLETE (objectives told), FAIL (`FAIL_REASON_KEY` says why), PRUNED with one of the reason keys
below in `PRUNED_REASON_KEY` (Optuna's PRUNED state covers them all; channel pruning is another matter, see
`PRUNE_FRACTION_KEY`), RUNNING (holds a lease: host, pid, heartbeat), WAITING (enqueued).
"""

from __future__ import annotations

from optuna.trial import FrozenTrial, TrialState

# --- study attrs ------------------------------------------------------------------------------------------------
SETTINGS_KEY = "settings"  # the study's settings as JSON (nas.study.settings.settings_json); set last at creation
SETTINGS_HISTORY_KEY = "settings_history"  # [{"time", "settings"}] replaced by a forced change or a format upgrade
BASELINE_LATENCY_MS_KEY = "baseline_latency_ms"  # the frozen baseline latency (ms) every objective is scaled by
BASELINE_LATENCY_KEY = "baseline_latency"  # its full measurement (nas.latency.Latency.to_dict())
BASELINE_LATENCY_TRIES_KEY = "baseline_latency_tries"  # [{"median_ms", "p90_ms"}] of each measurement at creation
BASELINE_LATENCY_WARNING_KEY = "baseline_latency_warning"  # why the frozen figure may read high (set only then)
BASELINE_PARAMS_KEY = "baseline_params"  # the baseline's Arch params
ENVIRONMENT_KEY = "environment"  # versions that produced the numbers (repnas, git, python, torch, cuda, ...)
FOLLOWUP_KEY_PREFIX = "followup:"  # followup:KIND:TRIAL:KEY -> a result added after the trial finished

# --- trial attrs: where the trial came from ---------------------------------------------------------------------
BASELINE_KEY = "baseline"  # True on the baseline trial (and its re-enqueued copies)
ENQUEUED_KEY = "enqueued"  # True on a --enqueue candidate
REQUEUED_FROM_KEY = "requeued_from"  # the number of the trial whose Arch this one retries
REQUEUES_KEY = "requeues"  # how many times this Arch was enqueued again along its chain
REQUEUE_REASON_KEY = "requeue_reason"  # "stale", "interrupted"
ORIGIN_KEYS = (BASELINE_KEY, ENQUEUED_KEY)  # marks a re-enqueued trial keeps

# --- trial attrs: lease (nas.study.leases) -------------------------------------------------------------------------
HOST_KEY = "host"
PID_KEY = "pid"
HEARTBEAT_KEY = "heartbeat"  # time.time() of the last renewal

# --- trial attrs: what was built and what it costs -------------------------------------------------------------
ARCH_KEY = "arch"  # the Arch params
PARAMS_KEY = "params"  # deploy params of the ranked network (pruned when pruned)
PARAMS_TRAIN_KEY = "params_train"  # params as built (train-time)
GFLOPS_KEY = "gflops"  # GFLOPs as built, at GFLOPS_IMGSZ_KEY
GFLOPS_DEPLOY_KEY = "gflops_deploy"  # deploy GFLOPs of the ranked network
GFLOPS_IMGSZ_KEY = "gflops_imgsz"
PRUNE_FRACTION_KEY = "prune_fraction"  # deploy-FLOPs fraction the fused model was channel-pruned to
PRUNE_LATENCY_TARGET_KEY = "prune_latency_target"  # --prune-to-latency: the ratio of its own latency it was pruned to
PRUNE_LATENCY_SEARCH_KEY = "prune_latency_search"  # the timed candidates [[fraction asked, achieved, ratio], ...]
PARAMS_UNPRUNED_KEY = "params_unpruned"
GFLOPS_DEPLOY_UNPRUNED_KEY = "gflops_deploy_unpruned"
CONSTRAINTS_KEY = "constraints"  # [violation]: > 0 over a budget (mirrors optuna's own constraint record)

# --- trial attrs: latency -----------------------------------------------------------------------------------------
LATENCY_MS_KEY = "latency_ms"  # the objective: ratio x the frozen baseline latency
LATENCY_MEASURED_MS_KEY = "latency_measured_ms"  # this trial's own measured median
LATENCY_P90_MS_KEY = "latency_p90_ms"
LATENCY_RATIO_KEY = "latency_ratio"  # median / the baseline's median, timed interleaved
LATENCY_REMEASURED_KEY = "latency_remeasured"  # True when the pruned plan changed and it was timed again
DEVICE_KEY = "device"  # nas.latency.device_info of the timing device

# --- trial attrs: training and results ----------------------------------------------------------------------------
PROXY_KEY = "proxy"  # the ProxyConfig the trial trained with
OOM_RETRY_KEY = "oom_retry"
CURVE_KEY = "curve"  # [[epoch, mAP50-95, mAP50], ...] at validation epochs
STOPPED_EPOCH_KEY = "stopped_epoch"
STOP_RULE_KEY = "stop_rule"  # the early-stopping rule's sentence for an early-stopped trial
PARTIAL_MAP50_95_KEY = "partial_map50_95"
PARTIAL_MAP50_KEY = "partial_map50"
FUSION_ERROR_KEY = "fusion_error"
MAP50_95_KEY = "map50_95"
MAP50_KEY = "map50"
MAP50_95_UNPRUNED_KEY = "map50_95_unpruned"
MAP50_UNPRUNED_KEY = "map50_unpruned"
PRUNE_KEY = "prune"  # the pruning job's report (nas.prune.PruneReport.to_dict() less its channels)
SECONDS_KEY = "seconds"  # wall seconds per phase
FILES_KEY = "files"  # {name: {"path": "N/name", "sha256": ...}}, paths relative to the trials root

# --- trial attrs: why a trial ended as it did -------------------------------------------------------------------
FAIL_REASON_KEY = "fail_reason"
REJECTED_KEY = "rejected"  # the budget sentence of an over-budget trial
PRUNED_REASON_KEY = "pruned_reason"  # one of the reason keys below

# Reason keys (values of PRUNED_REASON_KEY):
REASON_REJECTED = "rejected"  # over a budget (params, deploy GFLOPs, latency): no training spent; does not count
REASON_DUPLICATE = "duplicate"  # an Arch already trained (or training) in this study; does not count
REASON_SURPLUS = "surplus"  # asked after --trials were busy (a race between hosts); released, does not count
REASON_EARLY_STOP = "early_stop"  # training stopped by the early-stopping rule (STOP_RULE_KEY says why); counts
NOT_COUNTED = (REASON_REJECTED, REASON_DUPLICATE, REASON_SURPLUS)


def pruned_reason(trial: FrozenTrial) -> str | None:
    """A PRUNED trial's reason key. Studies written by repnas 0.1.0 stored the early-stopping rule's sentence
    itself as the reason: any value that is not a known key reads as REASON_EARLY_STOP."""
    reason = trial.user_attrs.get(PRUNED_REASON_KEY)
    if trial.state != TrialState.PRUNED:
        return reason
    return reason if reason in NOT_COUNTED or reason is None else REASON_EARLY_STOP


def stop_rule(trial: FrozenTrial) -> str | None:
    """The early-stopping sentence of an early-stopped trial (stored under STOP_RULE_KEY, or as the reason itself
    by repnas 0.1.0)."""
    reason = trial.user_attrs.get(PRUNED_REASON_KEY)
    return trial.user_attrs.get(STOP_RULE_KEY) or (reason if reason not in (*NOT_COUNTED, REASON_EARLY_STOP)
                                                   else None)


def counts(trial: FrozenTrial) -> bool:
    """Whether a finished trial counts toward --trials: COMPLETE, or PRUNED by the early-stopping rule."""
    if trial.state == TrialState.COMPLETE:
        return True
    return trial.state == TrialState.PRUNED and trial.user_attrs.get(PRUNED_REASON_KEY) not in NOT_COUNTED


def busy(trial: FrozenTrial) -> bool:
    """Counted, or running (it may yet count): what a claim weighs against --trials."""
    return counts(trial) or trial.state == TrialState.RUNNING
