"""`repnas confirm`: retrain chosen trials of a finished study at a longer budget and/or other seeds, and measure
how well the proxy ranked them (Kendall τ-b, Spearman ρ, top-k overlap, seed-to-seed τ, the confirmed Pareto front).

Every confirmation run is a follow-up trial (`nas.study.followups`, kind "confirm", key
"epochs=E,imgsz=I,seed=S") of the trial it retrains: claimed under the study's ask lock (and, across hosts on an
RDB storage, released again when an earlier claim of the same run exists), leased with a heartbeat, told COMPLETE
with its result only after its files are in place. A killed confirmation leaves a RUNNING follow-up whose worker
is gone; the next `repnas confirm` fails it as stale and runs it again, and keeps every run that finished.

Files of one run: TRIALS/N/confirm/epochs=E,imgsz=I,seed=S/{weights.pt, epochs.csv, metrics.json}, each written
atomically, their sha256 in the result.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np
import optuna
import torch
from optuna.trial import TrialState

from nas.data import DataConfig, load_data_config
from nas.fidelity import MIN_N, agreement, seed_to_seed_tau, top_k_overlap
from nas.files import state_dict_bytes, write_bytes_atomic, write_text_atomic
from nas.pareto import pareto_mask
from nas.study.attrs import ARCH_KEY, BASELINE_KEY, FAIL_REASON_KEY, LATENCY_MS_KEY, PRUNE_FRACTION_KEY
from nas.study.followups import (
    COMPANION_SUFFIX,
    KEY_KEY,
    KIND_KEY,
    TARGET_KEY,
    companion,
    fail_followup,
    finish_followup,
    followups,
    start_followup,
)
from nas.study.leases import Heartbeat, _ask_lock, recover_stale_trials
from nas.study.settings import DEFAULTS, StudyError, StudySettings, proxy_config, trial_folder
from nas.train import epochs_csv, fit, seed_everything
from space.builder import build_model
from space.searchspace import Arch, load_space

LOG = logging.getLogger("repnas.study")
KIND = "confirm"
SUMMARY_KEY_PREFIX = "confirm:"  # study attr "confirm:epochs=E,imgsz=I" -> the stored summary of that budget
DEFAULT_FACTOR = 4
TOP_K = 3


@dataclass(frozen=True)
class ConfirmPlan:
    """Which trials to retrain (`trials`, main-study numbers), at which budget (`epochs`, `imgsz` px) and seeds."""

    trials: tuple[int, ...]
    epochs: int
    imgsz: int
    seeds: tuple[int, ...]

    @classmethod
    def from_dict(cls, d: dict) -> ConfirmPlan:
        """From `asdict(plan)` after a JSON round trip (lists back to tuples)."""
        return cls(tuple(d["trials"]), int(d["epochs"]), int(d["imgsz"]), tuple(d["seeds"]))

    @property
    def budget(self) -> str:
        return f"epochs={self.epochs},imgsz={self.imgsz}"

    def key(self, seed: int) -> str:
        """The follow-up key (and folder name) of one run."""
        return f"{self.budget},seed={seed}"

    def tasks(self) -> list[tuple[int, int]]:
        """(trial, seed) runs, seed-major: every trial once before any trial twice (a partial run ranks all)."""
        return [(t, s) for s in self.seeds for t in self.trials]


def parse_key(key: str) -> dict[str, int]:
    """{"epochs": E, "imgsz": I, "seed": S} from a key 'epochs=E,imgsz=I,seed=S'."""
    return {k: int(v) for k, v in (part.split("=", 1) for part in key.split(","))}


def _finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """COMPLETE trials with a proxy mAP50-95 and a latency."""
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.values and LATENCY_MS_KEY in t.user_attrs]


def select_trials(study: optuna.Study, *, trials: Sequence[int] = (), front: bool = False,
                  spread: int | None = None) -> tuple[int, ...]:
    """The trials to confirm: `trials` (numbers), the proxy Pareto `front`, and/or `spread` K trials spread evenly
    over the latency range (by latency rank, the fastest and slowest included); the baseline always. With no
    choice given, the front. Sorted by latency.

    Raises StudyError for a number that is not a COMPLETE trial, a trial ranked as a pruned model (confirm
    retrains architectures), or a study without finished trials.
    """
    done = {t.number: t for t in _finished(study)}
    if not done:
        raise StudyError(f"study {study.study_name!r} has no COMPLETE trial to confirm yet; run the search first")
    for number in trials:
        if number not in done:
            state = next((t.state.name for t in study.get_trials(deepcopy=False) if t.number == number), "absent")
            raise StudyError(f"--trials {number}: trial {number} of study {study.study_name!r} is {state}, not "
                             "COMPLETE; choose COMPLETE trials (see `repnas show`)")
    chosen = set(trials)
    if front or (not trials and not spread):
        chosen |= {t.number for t in study.best_trials if t.number in done}
    by_latency = sorted(done, key=lambda n: (done[n].user_attrs[LATENCY_MS_KEY], n))
    if spread:
        picks = np.unique(np.round(np.linspace(0, len(by_latency) - 1, min(spread, len(by_latency)))).astype(int))
        chosen |= {by_latency[i] for i in picks}
    chosen |= {n for n, t in done.items() if t.user_attrs.get(BASELINE_KEY)}
    pruned = sorted(n for n in chosen if done[n].user_attrs.get(PRUNE_FRACTION_KEY) is not None)
    if pruned:
        raise StudyError(f"trials {pruned} of study {study.study_name!r} are ranked as pruned models (prune_to): "
                         "confirm retrains architectures only; confirm a study searched without --prune-to")
    return tuple(n for n in by_latency if n in chosen)


def make_plan(study: optuna.Study, settings: StudySettings, *, trials: Sequence[int] = (), front: bool = False,
              spread: int | None = None, epochs: int | None = None, factor: float | None = None,
              imgsz: int | None = None, seeds: Sequence[int] = ()) -> ConfirmPlan:
    """A ConfirmPlan from `repnas confirm`'s options: `epochs`, else `factor` x the proxy's epochs (default 4x);
    `imgsz` default the proxy's; `seeds` default the proxy's seed."""
    proxy = proxy_config(settings)
    if epochs is None:
        epochs = max(1, round((factor or DEFAULT_FACTOR) * proxy.epochs))
    return ConfirmPlan(select_trials(study, trials=trials, front=front, spread=spread), int(epochs),
                       int(imgsz or proxy.imgsz), tuple(dict.fromkeys(seeds)) or (proxy.seed,))


def _claims(study: optuna.Study, states: tuple[TrialState, ...] | None = None) -> list[optuna.trial.FrozenTrial]:
    """The study's confirmation follow-up trials (in `states`; None: all), read in one snapshot."""
    try:
        trials = optuna.load_study(study_name=study.study_name + COMPANION_SUFFIX, storage=study._storage).get_trials(
            deepcopy=False, states=states)
    except KeyError:  # no follow-up yet
        return []
    return [t for t in trials if t.user_attrs.get(KIND_KEY) == KIND]


def open_tasks(study: optuna.Study, plan: ConfirmPlan, first: int = 0) -> list[tuple[int, int]]:
    """The plan's (trial, seed) runs nobody finished, is running, or failed in this run (follow-up numbers from
    `first` on): what is left to claim. One read of the follow-ups: a run told COMPLETE between two reads would
    otherwise look neither running nor done."""
    taken = set()
    for t in _claims(study):
        if t.state in (TrialState.COMPLETE, TrialState.RUNNING) or (t.state == TrialState.FAIL and t.number >= first):
            taken.add((t.user_attrs[TARGET_KEY], t.user_attrs[KEY_KEY]))
    return [(n, s) for n, s in plan.tasks() if (n, plan.key(s)) not in taken]


def claim_task(study: optuna.Study, settings: StudySettings, plan: ConfirmPlan,
               first: int = 0) -> tuple[int, int, optuna.Trial] | None:
    """Claim the next open run as a leased follow-up trial: (trial, seed, follow-up trial), or None.

    Under the study's ask lock (this machine's journal) claiming is atomic. Across hosts (RDB storage) two workers
    may claim one run at once: the later claim (higher follow-up number) is then failed as "surplus" and the next
    open run is tried."""
    while True:
        with _ask_lock(settings):
            left = open_tasks(study, plan, first)
            if not left:
                return None
            number, seed = left[0]
            ft = start_followup(study, number, KIND, plan.key(seed))
        rivals = [t for t in _claims(study, (TrialState.RUNNING, TrialState.COMPLETE))
                  if t.user_attrs.get(TARGET_KEY) == number and t.user_attrs.get(KEY_KEY) == plan.key(seed)
                  and t.number < ft.number]
        if not rivals:
            return number, seed, ft
        fail_followup(study, ft, "surplus: another worker claimed this run first")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def run_one(study: optuna.Study, settings: StudySettings, plan: ConfirmPlan, number: int, seed: int,
            data_cfg: DataConfig) -> dict:
    """Train trial `number`'s Arch from scratch at the plan's budget with `seed`, write its files, return the
    result: map50_95, map50 (last validation, EMA weights, in [0, 1]), curve [[epoch, mAP50-95, mAP50], ...],
    loss_sum (sum over epochs of box+obj+cls), train_seconds, files {name: {path, sha256}}."""
    trial = study.get_trials(deepcopy=False)[number]
    arch = Arch.from_params(trial.user_attrs[ARCH_KEY], load_space(settings.space))
    cfg = replace(proxy_config(settings), epochs=plan.epochs, imgsz=plan.imgsz, seed=seed, quiet=True)
    seed_everything(seed)  # before building: the initial weights follow the seed
    model = build_model(arch.to_yaml(data_cfg.nc))
    result = fit(model, data_cfg, cfg)
    folder = trial_folder(settings, number) / "confirm" / plan.key(seed)
    curve = [[h["epoch"], h["map50_95"], h["map50"]] for h in result.history if h.get("map50_95") is not None]
    metrics = {"trial": number, "key": plan.key(seed), "map50_95": result.metrics.map50_95,
               "map50": result.metrics.map50, "epochs": len(result.history), "imgsz": plan.imgsz, "seed": seed,
               "train_seconds": result.seconds, "curve": curve,
               "loss_sum": float(sum(h["box"] + h["obj"] + h["cls"] for h in result.history)),
               "proxy": cfg.to_dict()}
    files = {"weights.pt": state_dict_bytes(result.model), "epochs.csv": epochs_csv(result.history).encode(),
             "metrics.json": json.dumps(metrics, indent=2, default=str).encode()}
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        write_bytes_atomic(folder / name, data)
    rel = os.path.relpath(folder, settings.trials_root)
    return {k: metrics[k] for k in ("map50_95", "map50", "epochs", "imgsz", "seed", "train_seconds", "curve",
                                    "loss_sum")} | {
        "files": {name: {"path": f"{rel}/{name}", "sha256": _sha256(data)} for name, data in files.items()}}


def confirm_work(study: optuna.Study, settings: StudySettings, plan: ConfirmPlan, report: Callable[[str], None],
                 first: int = 0, parent_pid: int | None = None) -> None:
    """One worker's loop: claim an open run, train it, record it; until nothing is left to claim. A failing run
    is told FAIL with its reason (and a traceback file) and the loop goes on."""
    data_cfg = load_data_config(settings.data)
    stale_after = settings.stale_after or DEFAULTS["stale_after"]
    while True:
        claimed = claim_task(study, settings, plan, first)
        if claimed is None:
            if recover_stale_trials(companion(study), stale_after):
                continue
            return
        number, seed, ft = claimed
        try:
            with Heartbeat(companion(study), ft._trial_id, parent_pid=parent_pid):
                result = run_one(study, settings, plan, number, seed, data_cfg)
        except KeyboardInterrupt:
            fail_followup(study, ft, "interrupted")
            raise
        except Exception as err:
            reason = " ".join(f"{type(err).__name__}: {err}".split())[:300]
            folder = trial_folder(settings, number) / "confirm" / plan.key(seed)
            with contextlib.suppress(OSError):  # (a full disk must not stop the loop)
                folder.mkdir(parents=True, exist_ok=True)
                write_text_atomic(folder / "traceback.txt", traceback.format_exc())
            with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):  # taken for dead meanwhile
                fail_followup(study, ft, reason)
            report(f"trial {number:>4} confirm {plan.key(seed)} FAILED {reason}")
            continue
        try:
            finish_followup(study, ft, result)
        except optuna.exceptions.UpdateFinishedTrialError:
            report(f"trial {number:>4} confirm {plan.key(seed)}: lost its lease (marked stale); result dropped")
            continue
        report(f"trial {number:>4} confirm {plan.key(seed)}: mAP50-95 {result['map50_95']:.4f} "
               f"mAP50 {result['map50']:.4f} in {result['train_seconds']:.0f} s")


def run_confirm(study: optuna.Study, settings: StudySettings, plan: ConfirmPlan, *,
                report: Callable[[str], None] | None = None, workers: int = 1,
                devices: Sequence[str] = ()) -> dict:
    """Run the plan's open runs (in this process, or `workers` worker processes / one per device), then compute,
    store (study attr "confirm:BUDGET") and return the summary (`confirm_summary`).

    Raises StudyError when workers failed while runs are left."""
    report = report or (lambda line: None)
    comp = companion(study)
    for number in recover_stale_trials(comp, settings.stale_after or DEFAULTS["stale_after"]):
        report(f"confirmation {number} (follow-up trial) FAILED stale: its worker is gone; it runs again")
    first = len(comp.get_trials(deepcopy=False))
    n = max(workers, len(devices))
    left = open_tasks(study, plan, first)
    report(f"confirm study {settings.name}: {len(plan.trials)} trials x {len(plan.seeds)} seeds at {plan.epochs} "
           f"epochs, {plan.imgsz} px: {len(plan.tasks()) - len(left)} runs done, {len(left)} to run")
    if left and n <= 1:
        if devices:
            settings = replace(settings, device=f"cuda:{devices[0]}")
        confirm_work(study, settings, plan, report, first)
    elif left:
        from nas.study.workers import run_workers

        run_workers(settings, n, devices, first, report, job={"confirm": asdict(plan)})
    summary = confirm_summary(study, plan.budget)
    study.set_user_attr(SUMMARY_KEY_PREFIX + plan.budget, summary)
    return summary


def plan_done(study: optuna.Study, plan: ConfirmPlan) -> bool:
    """Whether every run of the plan has a COMPLETE result."""
    done = followups(study, KIND)
    return all(plan.key(s) in done.get(n, {}) for n, s in plan.tasks())


def budgets(study: optuna.Study) -> list[str]:
    """The confirmation budgets ('epochs=E,imgsz=I') with at least one result, longest (epochs, imgsz) first."""
    found = {key.rsplit(",seed=", 1)[0] for runs in followups(study, KIND).values() for key in runs}
    return sorted(found, key=lambda b: (parse_key(b)["epochs"], parse_key(b)["imgsz"]), reverse=True)


def confirmed_runs(study: optuna.Study, budget: str) -> dict[int, dict[int, dict]]:
    """trial -> seed -> result, for the runs of one budget."""
    out: dict[int, dict[int, dict]] = {}
    for number, runs in followups(study, KIND).items():
        for key, result in runs.items():
            if key.rsplit(",seed=", 1)[0] == budget:
                out.setdefault(number, {})[parse_key(key)["seed"]] = result
    return out


def _nan_to_none(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def confirm_summary(study: optuna.Study, budget: str) -> dict:
    """What `repnas confirm` prints and stores for one budget (JSON-serialisable):

    trials: [{trial, latency_ms, proxy_map50_95, map50_95 (mean over seeds), std (ddof=1, None for 1 seed), runs,
    per_seed, proxy_front, confirmed_front, baseline}] by latency; agreement (τ-b, ρ, n, 90% intervals, or why
    not, `nas.fidelity.agreement`) between proxy and confirmed mAP50-95; top_k overlap; seed_to_seed_tau (None
    below MIN_N trials or with one seed); confirmed_front and proxy_front trial numbers; survived (proxy-front
    trials on the confirmed front)."""
    runs = confirmed_runs(study, budget)
    finished = {t.number: t for t in _finished(study)}
    proxy_front = {t.number for t in study.best_trials} if finished else set()
    rows = []
    for number in sorted(runs, key=lambda n: (finished[n].user_attrs[LATENCY_MS_KEY], n) if n in finished else
                         (math.inf, n)):
        if number not in finished:
            continue
        t, per_seed = finished[number], runs[number]
        values = np.array([r["map50_95"] for r in per_seed.values()], dtype=float)
        rows.append({"trial": number, "latency_ms": t.user_attrs[LATENCY_MS_KEY], "proxy_map50_95": t.values[0],
                     "map50_95": float(values.mean()),
                     "std": float(values.std(ddof=1)) if len(values) > 1 else None, "runs": len(values),
                     "per_seed": {str(s): r["map50_95"] for s, r in sorted(per_seed.items())},
                     "proxy_front": number in proxy_front, "baseline": bool(t.user_attrs.get(BASELINE_KEY))})
    if rows:
        mask = pareto_mask([r["map50_95"] for r in rows], [r["latency_ms"] for r in rows])
        for r, on in zip(rows, mask):
            r["confirmed_front"] = bool(on)
    proxy = [r["proxy_map50_95"] for r in rows]
    confirmed = [r["map50_95"] for r in rows]
    agree = agreement(proxy, confirmed) if rows else agreement([], [])
    k = min(TOP_K, len(rows))
    seeds = sorted({int(s) for r in rows for s in r["per_seed"]})
    common = [r for r in rows if all(str(s) in r["per_seed"] for s in seeds)]
    s2s = None
    if len(seeds) >= 2 and len(common) >= MIN_N:
        s2s = _nan_to_none(seed_to_seed_tau([[r["per_seed"][str(s)] for s in seeds] for r in common]))
    return {"budget": budget, **parse_key(budget), "seeds": seeds, "trials": rows, "agreement": agree.to_dict(),
            "agreement_line": agree.line(), "top_k": k, "top_k_overlap": top_k_overlap(proxy, confirmed, k) if k
            else 0, "seed_to_seed_tau": s2s, "seed_to_seed_n": len(common),
            "confirmed_front": [r["trial"] for r in rows if r["confirmed_front"]],
            "proxy_front": [r["trial"] for r in rows if r["proxy_front"]],
            "survived": [r["trial"] for r in rows if r["proxy_front"] and r["confirmed_front"]]}


def summary_lines(summary: dict) -> list[str]:
    """The printed report of `confirm_summary`."""
    lines = [f"confirmed at {summary['epochs']} epochs, {summary['imgsz']} px, seeds "
             f"{', '.join(map(str, summary['seeds'])) or '-'}:",
             f"  {'trial':>5} {'latency_ms':>10} {'proxy mAP50-95':>14} {'confirmed mAP50-95':>22}  front"]
    for r in summary["trials"]:
        std = f" ± {r['std']:.4f}" if r["std"] is not None else ""
        front = ("proxy+confirmed" if r["proxy_front"] and r["confirmed_front"] else
                 "proxy only" if r["proxy_front"] else "confirmed only" if r["confirmed_front"] else "")
        lines.append(f"  {r['trial']:>5} {r['latency_ms']:>10.3f} {r['proxy_map50_95']:>14.4f} "
                     f"{r['map50_95']:>13.4f}{std:<9} {front}{' (baseline)' if r['baseline'] else ''}")
    lines.append(summary["agreement_line"])
    if summary["top_k"]:
        lines.append(f"top-{summary['top_k']} overlap: {summary['top_k_overlap']} of {summary['top_k']}")
    if len(summary["seeds"]) >= 2:
        lines.append(f"seed-to-seed τ-b: {summary['seed_to_seed_tau']:.3f} (n={summary['seed_to_seed_n']})"
                     if summary["seed_to_seed_tau"] is not None else
                     f"seed-to-seed τ-b: not computed (n={summary['seed_to_seed_n']} trials with every seed "
                     f"< {MIN_N})")
    lines.append(f"confirmed Pareto front: trials {summary['confirmed_front']}; of the proxy front "
                 f"{summary['proxy_front']}, {len(summary['survived'])} survived: {summary['survived']}")
    return lines


def confirmed_for_records(study: optuna.Study) -> tuple[str | None, dict[int, dict]]:
    """For show/export: the longest budget and its per-trial row (map50_95, std, runs, confirmed_front)."""
    found = budgets(study)
    if not found:
        return None, {}
    summary = confirm_summary(study, found[0])
    return found[0], {r["trial"]: r for r in summary["trials"]}


def failed_runs(study: optuna.Study) -> list[tuple[int, str, str]]:
    """(trial, key, reason) of failed confirmation runs that have no COMPLETE result since."""
    done = followups(study, KIND)
    return [(t.user_attrs[TARGET_KEY], t.user_attrs[KEY_KEY], t.user_attrs.get(FAIL_REASON_KEY, ""))
            for t in _claims(study, (TrialState.FAIL,))
            if t.user_attrs[KEY_KEY] not in done.get(t.user_attrs[TARGET_KEY], {})
            and not str(t.user_attrs.get(FAIL_REASON_KEY, "")).startswith("surplus")]


def check_device(devices: Sequence[str]) -> None:
    """Raise StudyError for --devices without CUDA."""
    if devices and not torch.cuda.is_available():
        raise StudyError(f"--devices {','.join(devices)}: no CUDA device is available here; drop --devices")
