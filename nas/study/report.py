"""What a study shows: trial records for the Pareto files, one printed line per trial, `repnas show`, exports, and
weight clean-up (`--keep-weights`, `repnas clean`)."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from nas.device import device_label
from nas.pareto import FORMATS, TrialRecord, export_pareto
from nas.study.attrs import (
    ARCH_KEY,
    BASELINE_KEY,
    BASELINE_LATENCY_KEY,
    BASELINE_LATENCY_MS_KEY,
    BASELINE_LATENCY_TRIES_KEY,
    BASELINE_LATENCY_WARNING_KEY,
    DEVICE_KEY,
    FAIL_REASON_KEY,
    FILES_KEY,
    GFLOPS_DEPLOY_KEY,
    GFLOPS_IMGSZ_KEY,
    LATENCY_MEASURED_MS_KEY,
    LATENCY_MS_KEY,
    LATENCY_RATIO_KEY,
    MAP50_95_KEY,
    MAP50_KEY,
    PARAMS_KEY,
    PRUNE_FRACTION_KEY,
    REJECTED_KEY,
    SECONDS_KEY,
    SETTINGS_KEY,
    counts,
    pruned_reason,
    stop_rule,
)
from nas.study.settings import StudySettings, stored_backend, trial_folder
from nas.study.storage import journal_path, load_study, stored_settings
from space.searchspace import STAGE_NAMES

LOG = logging.getLogger("repnas.study")
WEIGHT_FILES = ("weights.pt", "fused.pt", "pruned/weights.pt")


def trial_records(study: optuna.Study, settings: StudySettings,
                  confirmed: dict[int, dict] | None = None, profile: str | None = None) -> list[TrialRecord]:
    """One TrialRecord per trial, for the Pareto files (early-stopped trials keep their partial mAP off the table),
    with the confirmed mAP50-95 of the longest `repnas confirm` budget where there is one.

    `profile`: rank on that latency profile (`repnas relatency`): each trial's latency objective, measured median,
    ratio and device are the profile's (none for a trial the profile has not timed), and `study_pareto` says whether
    the trial is on the front the study ranked with its own latency. Raises StudyError for an unknown profile."""
    from nas.pareto import pareto_mask
    from nas.study.confirm import confirmed_for_records
    from nas.study.relatency import check_profile_name, profile_results

    if confirmed is None:  # trial -> its row at the longest confirmed budget
        _, confirmed = confirmed_for_records(study)
    timed, on_study_front = {}, {}
    if profile is not None:
        check_profile_name(study, profile)
        timed = profile_results(study, profile)
        done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.values]
        if done:
            mask = pareto_mask([t.values[0] for t in done], [t.values[1] for t in done])
            on_study_front = {t.number: bool(m) for t, m in zip(done, mask)}
    records = []
    for t in study.get_trials(deepcopy=False):
        attrs = t.user_attrs
        arch = attrs.get(ARCH_KEY) or {}
        stages = tuple((arch.get(f"{n}_depth"), arch.get(f"{n}_width"), bool(arch.get(f"{n}_se")))
                       for n in STAGE_NAMES) if arch else ()
        model_yaml = attrs.get(FILES_KEY, {}).get("model.yaml", {}).get("path")
        if model_yaml:
            model_yaml = os.path.relpath(settings.trials_root / model_yaml, settings.folder)
        latency = {"latency_ms": attrs.get(LATENCY_MS_KEY), "latency_ratio": attrs.get(LATENCY_RATIO_KEY),
                   "latency_measured_ms": attrs.get(LATENCY_MEASURED_MS_KEY),
                   "device": device_label(attrs[DEVICE_KEY]) if DEVICE_KEY in attrs else ""}
        if profile is not None:
            r = timed.get(t.number)
            latency = {"latency_ms": r and r["latency_ms"], "latency_ratio": r and r["ratio"],
                       "latency_measured_ms": r and r["median_ms"],
                       "device": device_label(r["device"]) if r and r.get("device") else "",
                       "study_pareto": on_study_front.get(t.number, False)}
        records.append(TrialRecord(
            number=t.number, state=t.state.name, map50_95=attrs.get(MAP50_95_KEY), map50=attrs.get(MAP50_KEY),
            params=attrs.get(PARAMS_KEY),
            gflops_deploy=attrs.get(GFLOPS_DEPLOY_KEY), stages=stages, yaml_path=model_yaml,
            is_baseline=bool(attrs.get(BASELINE_KEY)), pruned=attrs.get(PRUNE_FRACTION_KEY),
            head_width=arch.get("head_width"), head_depth=arch.get("head_depth"), **latency,
            **({"confirmed_map50_95": confirmed[t.number]["map50_95"], "confirmed_std": confirmed[t.number]["std"],
                "confirmed_runs": confirmed[t.number]["runs"]} if t.number in confirmed else {}),
        ))
    return records


def why(t: FrozenTrial) -> str:
    """Why a trial ended as it did, in words: its failure, budget, early-stopping rule or other reason ('' if none)."""
    a = t.user_attrs
    return a.get(FAIL_REASON_KEY) or a.get(REJECTED_KEY) or stop_rule(t) or pruned_reason(t) or ""


def trial_line(t: FrozenTrial) -> str:
    """One printed line per finished trial; its deploy GFLOPs column names the image size they were counted at
    (`GFLOPs@640`: the latency input size, not the training imgsz)."""
    a = t.user_attrs

    def num(key: str, fmt: str) -> str:
        value = a.get(key, a.get(f"partial_{key}"))
        return format(value, fmt) if value is not None else "-"

    seconds = sum((a.get(SECONDS_KEY) or {}).values())
    gflops = f"GFLOPs@{a[GFLOPS_IMGSZ_KEY]}" if a.get(GFLOPS_IMGSZ_KEY) else "GFLOPs"
    reason = why(t)
    return (f"trial {t.number:>4} {t.state.name:<8} mAP50-95 {num(MAP50_95_KEY, '.4f'):>7} "
            f"mAP50 {num(MAP50_KEY, '.4f'):>7} latency {num(LATENCY_MS_KEY, '.3f'):>8} ms "
            f"ratio {num(LATENCY_RATIO_KEY, '.3f'):>6} {gflops} {num(GFLOPS_DEPLOY_KEY, '.3f'):>8} {seconds:>7.1f} s"
            + (f"  {reason}" if reason else ""))


def export_files(study: optuna.Study, settings: StudySettings, out_dir: str | Path | None = None,
                 formats: Sequence[str] | str = FORMATS, profile: str | None = None) -> dict[str, Path]:
    """Write the study's Pareto files into `out_dir` (default: the study folder; with a `profile`, its subfolder
    profiles/PROFILE); return format -> path. `profile`: rank on that latency profile (`trial_records`)."""
    from nas.study.confirm import confirmed_for_records
    from nas.study.relatency import check_profile_name

    budget, confirmed = confirmed_for_records(study)  # read once: this runs after every trial
    records = trial_records(study, settings, confirmed, profile)
    if profile is None:
        warning = study.user_attrs.get(BASELINE_LATENCY_WARNING_KEY)
        return export_pareto(records, out_dir or settings.folder, formats,
                             title=f"repnas study {settings.name}: mAP50-95 vs latency",
                             confirmed_budget=budget,
                             baseline_latency_ms=study.user_attrs.get(BASELINE_LATENCY_MS_KEY),
                             latency_setup=latency_setup(settings), warnings=[warning] if warning else [])
    stored = check_profile_name(study, profile)
    warning = stored.get("warning")
    setup = (f"{stored['imgsz']}x{stored['imgsz']} px, batch {stored['batch']}, {stored['backend']} backend "
             f"(latency profile {profile}, `repnas relatency`)")
    return export_pareto(records, out_dir or settings.folder / "profiles" / profile, formats,
                         title=f"repnas study {settings.name}: mAP50-95 vs latency on profile {profile}",
                         confirmed_budget=budget, baseline_latency_ms=stored.get("baseline_latency_ms"),
                         latency_setup=setup, warnings=[warning] if warning else [])


def latency_setup(settings: StudySettings) -> str:
    """How the study times latency, in words: "640x640 px, batch 1, cudagraph backend, fp16, channels_last, 10
    warm-up + 100 timed passes in 5 rounds" (CPU threads are in the device's label)."""
    lat = settings.latency or {}
    size = settings.latency_imgsz
    parts = [f"{size}x{size} px" if size else "the space's input size", f"batch {settings.latency_batch or 1}",
             f"{stored_backend(lat)} backend"]
    if lat.get("device_type") == "cuda":
        parts.append("fp16" if lat.get("half") else "fp32")
        parts += [name for name, key in (("channels_last", "channels_last"), ("cudnn.benchmark", "cudnn_benchmark"))
                  if lat.get(key)]
    if "iters" in lat:
        rounds, iters = lat.get("rounds"), lat["iters"]
        parts.append(f"{lat.get('warmup')} warm-up + {iters} timed pass{'' if iters == 1 else 'es'} in {rounds} "
                     f"round{'' if rounds == 1 else 's'}")
    return ", ".join(parts)


def export_study(name: str, out_dir: str | Path | None = None, formats: Sequence[str] | str = FORMATS, *,
                 storage: str | None = None, results: str = "results", profile: str | None = None) -> dict[str, Path]:
    """`repnas export`: write the study's Pareto files (default into results/NAME/, with a latency `profile` into
    results/NAME/profiles/PROFILE/); return format -> path."""
    study = load_study(name, storage=storage, results=results)
    return export_files(study, stored_settings(study, name, storage, results), out_dir, formats, profile)


def weights_to_keep(study: optuna.Study, keep: int) -> set[int]:
    """Trials whose weights `--keep-weights keep` keeps: the Pareto front and the top-`keep` by mAP50-95.

    Safe to apply at any time: a trial once dominated stays dominated, and one that leaves the top-k never re-enters.
    """
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.values]
    front = {t.number for t in study.best_trials} if done else set()
    top = sorted(done, key=lambda t: (-t.values[0], t.number))[:keep]
    return front | {t.number for t in top}


def clean_weights(study: optuna.Study, settings: StudySettings, keep: int) -> list[Path]:
    """Delete weight files of finished trials outside `weights_to_keep`; return the removed paths."""
    kept = weights_to_keep(study, keep)
    root = settings.trials_root.resolve()
    removed = []
    for t in study.get_trials(deepcopy=False):
        if t.number in kept or t.state in (TrialState.RUNNING, TrialState.WAITING):
            continue
        folder = trial_folder(settings, t.number)
        if not folder.resolve().is_relative_to(root):  # a symlinked trial folder: never delete outside the study
            LOG.warning("weights cleaning: %s leads outside %s; left alone", folder, root)
            continue
        for name in WEIGHT_FILES:
            path = folder / name
            if path.is_file() and not path.is_symlink():
                path.unlink(missing_ok=True)  # another worker may clean at the same moment
                removed.append(path)
    return removed


def clean_study(name: str, keep: int | None = None, *, storage: str | None = None,
                results: str = "results") -> tuple[list[Path], set[int]]:
    """`repnas clean`: delete weights outside the front and the top-`keep` (default: the study's keep_weights)."""
    study = load_study(name, storage=storage, results=results)
    settings = stored_settings(study, name, storage, results)
    keep = keep if keep is not None else (settings.keep_weights or 0)
    return clean_weights(study, settings, keep), weights_to_keep(study, keep)


def summary_line(study: optuna.Study) -> str:
    """One line: trials by state, how many were rejected or duplicates, the size of the Pareto front."""
    trials = study.get_trials(deepcopy=False)
    by_state = {s: sum(t.state == s for t in trials) for s in TrialState}
    rejected = sum(t.state == TrialState.PRUNED and not counts(t) for t in trials)
    front = len(study.best_trials) if by_state[TrialState.COMPLETE] else 0
    return (f"study {study.study_name}: {len(trials)} trials, {by_state[TrialState.COMPLETE]} complete, "
            f"{by_state[TrialState.FAIL]} failed, {rejected} rejected or duplicate; {front} on the Pareto front")


def _reason_template(reason: str) -> str:
    """A failure reason with its figures written as '#': `repnas show` counts failures that differ only in them
    (the batch where a loss became NaN, the bytes CUDA tried to allocate, a dead worker's PID) as one reason."""
    return re.sub(r"\d+(?:\.\d+)?(?:e[+-]?\d+)?", "#", reason)


def _failure_lines(trials: list[FrozenTrial]) -> list[str]:
    from collections import Counter

    lines = []
    rejected = Counter(pruned_reason(t) for t in trials if t.state == TrialState.PRUNED and not counts(t))
    if rejected:
        lines.append("  rejected before training: " + ", ".join(f"{n} {r}" for r, n in rejected.most_common()))
    groups: dict[str, set[str]] = {}  # template -> the distinct reasons it stands for
    failures: Counter = Counter()
    for t in trials:
        if t.state == TrialState.FAIL:
            reason = str(t.user_attrs.get(FAIL_REASON_KEY, "unknown"))
            failures[_reason_template(reason)] += 1
            groups.setdefault(_reason_template(reason), set()).add(reason)
    if failures:  # a group shows its one message, or its template when its messages differ in their figures,
        # up to its first "; " (this line's separator; the advice after it is in the trial's traceback.txt)
        shown = {key: (next(iter(group)) if len(group) == 1 else key).split("; ")[0][:80]
                 for key, group in groups.items()}
        lines.append("  failed: " + "; ".join(f"{n} x {shown[key]}" for key, n in failures.most_common()))
    return lines


def _confirm_lines(study: optuna.Study) -> list[str]:
    """What `repnas confirm` stored for the longest budget: its rank agreement, top-k, seed-to-seed τ, front."""
    from nas.study.confirm import SUMMARY_KEY_PREFIX, budgets, confirm_summary, failed_runs

    found = budgets(study)
    lines = []
    if found:
        summary = study.user_attrs.get(SUMMARY_KEY_PREFIX + found[0]) or confirm_summary(study, found[0])
        lines.append(f"confirmed at {found[0]} ({sum(r['runs'] for r in summary['trials'])} runs, "
                     f"`repnas confirm`): {summary['agreement_line']}")
        lines.append(f"  confirmed front: trials {summary['confirmed_front']}; proxy-front trials that survived: "
                     f"{summary['survived']} of {summary['proxy_front']}")
    failed = failed_runs(study)
    if failed:
        lines.append(f"confirmation runs failed (run `repnas confirm` again to retry): {len(failed)}, e.g. trial "
                     f"{failed[0][0]} {failed[0][1]}: {failed[0][2]}")
    return lines


def _settings_lines(settings: StudySettings) -> list[str]:
    """The stored settings `repnas show` prints, each value labelled."""
    baseline = settings.baseline or "the space's seed design"
    kind, threads = (settings.latency or {}).get("device_type"), (settings.latency or {}).get("threads")
    if kind == "cpu":  # threads unset: a study of repnas 0.1.0, timed with each process's own
        where = f"CPU, {threads} thread{'' if threads == 1 else 's'} in every process" if threads else (
            "CPU, each process's own threads")
    else:
        where = "CUDA" if kind == "cuda" else "the study's device"
    return [
        f"  data: {settings.data}",
        f"  space: {settings.space}",
        f"  baseline: {baseline}",
        f"  trials: {settings.trials} to count; sampler {settings.sampler}, seed {settings.seed}",
        f"  device: {settings.device}",
        f"  proxy: {proxy_summary(settings.proxy or {})}",
        f"  latency: {latency_setup(settings)}, interleaved with the baseline; on {where}",
    ]


def _flat(values: dict, prefix: str = "") -> dict:
    out: dict = {}
    for key, value in values.items():
        out |= _flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value}
    return out


_PROXY_HEADLINE = ("epochs", "imgsz", "batch", "optimizer", "lr0", "val_every", "seed", "device", "quiet")


def proxy_summary(proxy: dict) -> str:
    """A study's proxy settings in words: the main ones, then those that differ from ProxyConfig's defaults as
    `--proxy KEY=VALUE` would set them ("1 epoch at 64 px, batch 8, AdamW lr0 0.002, validated every 5 epochs,
    seed 0; differs from the defaults in: fraction=0.5 loss.obj=2")."""
    from dataclasses import asdict

    from nas.train import ProxyConfig

    defaults = _flat(asdict(ProxyConfig()))
    p = defaults | _flat(proxy)
    epochs, every = p["epochs"], p["val_every"]
    head = (f"{epochs} epoch{'' if epochs == 1 else 's'} at {p['imgsz']} px, batch {p['batch']}, {p['optimizer']} "
            f"lr0 {p['lr0']:g}, validated every " + ("epoch" if every == 1 else f"{every} epochs")
            + f", seed {p['seed']}")
    changed = [f"{k}={v}" for k, v in p.items() if k not in _PROXY_HEADLINE and defaults.get(k) != v]
    return head + ("; differs from the defaults in: " + " ".join(changed) if changed else
                   "; every other setting at its default")


def _num(value: object, fmt: str, size: int) -> str:
    """A table cell of `repnas show`: the number right-aligned in `size` characters, '-' when missing."""
    import pandas as pd

    return f"{'-':>{size}}" if pd.isna(value) else f"{value:>{size}{fmt}}"


def _profile_lines(study: optuna.Study, profile: str | None) -> list[str]:
    """The latency profiles the study holds, and with `profile` how its front differs from the study's."""
    from nas.study.relatency import failed_timings, front_changes, profile_results, profiles

    have = profiles(study)
    if profile is None:
        return [f"latency profiles (`repnas show {study.study_name} --profile NAME`): {', '.join(sorted(have))}"] \
            if have else []
    stored = have[profile]
    timed = len(profile_results(study, profile))
    done = len([t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.values])
    changed = front_changes(study, profile)
    lines = [f"latency profile {profile}: {stored['device']}, {stored['backend']} backend, {stored['imgsz']} px, "
             f"batch {stored['batch']}; baseline {stored['baseline_latency_ms']:.3f} ms frozen; {timed} of {done} "
             "complete trials timed (`repnas relatency`); the front below is ranked on it",
             f"  against the study's own front: kept {changed['kept']}, entered {changed['entered']}, left "
             f"{changed['left']}"]
    failed = failed_timings(study, profile)
    if failed:
        lines.append(f"  not timed: {len(failed)}, e.g. trial {failed[0][0]}: {failed[0][1]}")
    return lines


def _baseline_latency_lines(study: optuna.Study) -> list[str]:
    """The frozen baseline latency: median and p90, where it was timed, after how many measurements, and the
    warning a noisy machine left."""
    attrs = study.user_attrs
    baseline_ms = attrs.get(BASELINE_LATENCY_MS_KEY)
    if baseline_ms is None:
        return []
    lat = attrs.get(BASELINE_LATENCY_KEY) or {}
    tries = attrs.get(BASELINE_LATENCY_TRIES_KEY) or []
    line = f"  baseline latency (frozen at creation): {baseline_ms:.3f} ms median"
    if lat.get("p90_ms") is not None:
        line += f", p90 {lat['p90_ms']:.3f} ms"
    if lat.get("device"):
        line += f", on {device_label(lat['device'])}"
    if len(tries) > 1:
        line += f" ({len(tries)} measurements)"
    warning = attrs.get(BASELINE_LATENCY_WARNING_KEY)
    return [line] + ([f"  warning: {warning}"] if warning else [])


def show_study(name: str, *, storage: str | None = None, results: str = "results", profile: str | None = None) -> str:
    """`repnas show`: one screen about a study: settings, trials by state (failures by reason), the front, time
    left. `profile`: the front ranked on that latency profile (`repnas relatency`), rows that entered or left it
    marked. Raises StudyError when there is no such study or profile."""
    from collections import Counter

    import numpy as np
    import pandas as pd

    from nas.pareto import default_reference, hypervolume, pareto_table

    study = load_study(name, storage=storage, results=results)
    settings = stored_settings(study, name, storage, results)
    trials = study.get_trials(deepcopy=False)
    counted = [t for t in trials if counts(t)]
    target = settings.trials or 0
    lines = [f"study {name} ({storage or journal_path(settings)})"]
    if SETTINGS_KEY in study.user_attrs:  # (not yet while its creator measures the baseline)
        lines += _settings_lines(settings)
    lines += _baseline_latency_lines(study)
    states = Counter(t.state.name for t in trials)
    lines.append(f"trials: {len(trials)} in all, {len(counted)} of {target} counted; "
                 + ", ".join(f"{n} {s}" for s, n in sorted(states.items())))
    lines += _failure_lines(trials)
    records = trial_records(study, settings, profile=profile)
    table = pareto_table(records)
    front = table[table["pareto"]] if len(table) else table
    lines += _profile_lines(study, profile)
    if len(front):
        reference = default_reference(records)
        done = table.dropna(subset=["map50_95", "latency_ms"])
        hv = hypervolume(done["map50_95"].to_numpy(float), done["latency_ms"].to_numpy(float), reference)
        lines.append(f"Pareto front: {len(front)} trials, fastest first; hypervolume {hv:.4g} (the area the front "
                     f"dominates from the reference point mAP50-95 {reference[0]:g}, latency objective "
                     f"{reference[1]:.3f} ms)")
        confirmed = front["confirmed_runs"].fillna(0).astype(int).sum() > 0
        width = max(4, *(len(a) for a in front["arch"]))
        lines.append((f"  {'trial':>5} {'mAP50-95':>8} {'mAP50':>7} {'measured ms':>11} {'objective ms':>12} "
                      f"{'ratio':>6} {'GFLOPs':>8}  {'arch':<{width}}" + (f" {'confirmed':>17}" if confirmed else ""))
                     .rstrip())
        for _, row in front.iterrows():
            mark = " (baseline)" if row["baseline"] else (" beats baseline" if row["dominates_baseline"] else "")
            if profile is not None and not row["study_pareto"]:
                mark += " (entered: off the study's own front)"
            if confirmed and row["confirmed_runs"]:
                std = "" if pd.isna(row["confirmed_std"]) else f"±{row['confirmed_std']:.4f}"
                cell = f" {row['confirmed_map50_95']:>7.4f}{std:<8}" + (
                    "  survived" if row["confirmed_pareto"] else "  off the confirmed front")
            else:
                cell = f" {'-':>7}{'':<8}  not confirmed" if confirmed else ""
            lines.append(f"  {row['trial']:>5} {_num(row['map50_95'], '.4f', 8)} {_num(row['map50'], '.4f', 7)} "
                         f"{_num(row['latency_measured_ms'], '.3f', 11)} {_num(row['latency_ms'], '.3f', 12)} "
                         f"{_num(row['latency_ratio'], '.3f', 6)} {_num(row['gflops_deploy'], '.3f', 8)}  "
                         f"{row['arch']:<{width}}{cell}{mark}".rstrip())
        lines.append("  measured ms: the trial's own median latency; objective ms: its ratio to the baseline x the "
                     "frozen baseline latency (what the front is ranked on); GFLOPs: deployed, at the latency input "
                     "size; arch: d = blocks per stage P1..P5, w = their channels, se = squeeze-excitation (+/-), "
                     "h = head width x C3 depth (ELAN depth in a yolov7 space)")
        lines += _confirm_lines(study)
    else:
        lines.append("Pareto front: no finished trial yet")
    seconds = [(t.datetime_complete - t.datetime_start).total_seconds() for t in counted
               if t.datetime_start and t.datetime_complete]
    left = max(target - len(counted), 0)
    if left and seconds:
        eta = float(np.mean(seconds)) * left
        lines.append(f"time left: ~{eta / 60:.1f} min for {left} more trials at {np.mean(seconds):.0f} s each "
                     "(one worker)")
    elif not left:
        lines.append("time left: none, the study has its trials")
    return "\n".join(lines)
