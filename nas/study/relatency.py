"""`repnas relatency`: re-time a finished study's trials on this machine, without retraining, as a named latency
profile.

Latency needs no weights, so every COMPLETE trial's deploy network is rebuilt from what its folder still holds
(pruned/channels.json for a trial ranked pruned, else model.yaml, else its Arch params from the study) and timed
interleaved with the study's baseline network rebuilt the same way, on this machine's device, backend, input size
and batch. As in a study, a profile freezes its baseline latency when it starts (`measure_baseline`: timed against
itself, re-measured while noisy) and a trial's profile latency is its measured ratio x that frozen figure.

Storage: the profile's definition (device, backend, size, batch, threads, versions, host, frozen baseline) is the
study user attr `latency_profile:NAME`, written once; each trial's result is a follow-up of kind "latency" keyed by
the profile's name (`nas.study.followups`: one storage write per result, never a write to the finished trial).
A killed run loses at most the trial it was timing; running it again times the trials the profile lacks. Machines
add profiles of their own names side by side. `repnas show/export --profile NAME` rank on a profile.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import optuna
import torch
import yaml
from optuna.trial import FrozenTrial, TrialState

from nas.device import device_label, resolve_device
from nas.latency import BACKENDS, LatencyConfig, device_info
from nas.study.attrs import ARCH_KEY, BASELINE_KEY, PRUNE_FRACTION_KEY
from nas.study.followups import add_result, companion, fail_followup, followups, start_followup
from nas.study.leases import host_id
from nas.study.settings import StudyError, StudySettings, trial_folder
from nas.study.storage import environment, measure_baseline
from nas.study.trial import time_latency
from pruning.portable import pruned_network
from pruning.reparam import fuse_model
from space.builder import build_model
from space.errors import RepnasError
from space.searchspace import Arch, load_space

LOG = logging.getLogger("repnas.study")
KIND = "latency"
PROFILE_KEY_PREFIX = "latency_profile:"
NAME_RULE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,79}")


@dataclass(frozen=True)
class Profile:
    """Where and how a profile times: `device` (a resolved device string), `backend` (a `nas.latency.BACKENDS`
    name), `imgsz` (px, square) and `batch`, `threads` (CPU: torch's and ONNX Runtime's intra-op threads)."""

    name: str
    device: str
    backend: str
    imgsz: int
    batch: int
    threads: int | None

    def settings(self, study_settings: StudySettings) -> StudySettings:
        """The study's settings with this profile's device and latency settings (the device's LatencyConfig
        defaults with this backend and threads), as `time_latency` and `measure_baseline` take them."""
        dev = resolve_device(self.device)
        cfg = LatencyConfig.for_device(dev, backend=self.backend, threads=self.threads)
        latency = {k: v for k, v in asdict(cfg).items()} | {"device_type": dev.type}
        return replace(study_settings, device=self.device, latency=latency, latency_imgsz=self.imgsz,
                       latency_batch=self.batch)

    def describe(self) -> dict:
        return {"device": self.device, "backend": self.backend, "imgsz": self.imgsz, "batch": self.batch,
                "threads": self.threads}


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def make_profile(settings: StudySettings, *, name: str | None = None, device: str | None = None,
                 backend: str | None = None, imgsz: int | None = None, batch: int | None = None,
                 threads: int | None = None) -> Profile:
    """The profile to time: `device` (default: this machine's, 'auto'), `backend` (default: the device's, as for a
    new study), `imgsz`/`batch` (default: the study's latency input), `threads` (CPU; default torch's count now).
    `name` defaults to one made of the device, threads, backend, size and batch. Raises StudyError for a bad name
    or a backend the device cannot run (the device errors of `resolve_device`)."""
    dev = resolve_device(device or "auto")
    if backend is not None and backend not in BACKENDS:
        raise StudyError(f"--latency-backend {backend!r} is unknown; use one of {', '.join(BACKENDS)}")
    backend = backend or LatencyConfig.for_device(dev).backend
    if dev.type not in BACKENDS[backend].device_types:
        raise StudyError(f"--latency-backend {backend} runs on {', '.join(BACKENDS[backend].device_types)}, not on "
                         f"{dev}; pick another backend or device")
    if dev.type == "cpu" and threads is None:
        threads = torch.get_num_threads()
    imgsz = imgsz or settings.latency_imgsz or load_space(settings.space).imgsz
    batch = batch or settings.latency_batch or 1
    if name is None:
        label = device_label(device_info(dev, threads if dev.type == "cpu" else None))
        name = f"{_slug(label)}-{backend}-{imgsz}px-b{batch}"[:80].strip("-")
    if not NAME_RULE.fullmatch(name):
        raise StudyError(f"--profile {name!r}: a profile name is 1 to 80 letters, digits, '.', '_' or '-', starting "
                         "with a letter or digit")
    device_text = str(dev) if dev.type != "cuda" else f"cuda:{dev.index or 0}"
    return Profile(name, device_text, backend, int(imgsz), int(batch), threads if dev.type == "cpu" else None)


def _study_nc(study: optuna.Study, settings: StudySettings) -> int:
    """The study's class count: from any trial's model.yaml, else its data.yaml. Raises StudyError when neither is
    readable."""
    for t in study.get_trials(deepcopy=False):
        path = trial_folder(settings, t.number) / "model.yaml"
        if path.is_file():
            nc = (yaml.safe_load(path.read_text()) or {}).get("nc")
            if isinstance(nc, int) and nc > 0:
                return nc
    try:
        from nas.data import load_data_config

        return load_data_config(settings.data).nc
    except Exception as err:  # any reason the data.yaml is unreadable here
        raise StudyError(f"study {settings.name!r}: no trial folder holds a model.yaml and its data.yaml "
                         f"({settings.data}) is unreadable here ({err}); the class count is unknown") from None


def deploy_network(study: optuna.Study, settings: StudySettings, t: FrozenTrial, nc: int) -> tuple[torch.nn.Module,
                                                                                                     str]:
    """Trial `t`'s deploy network (weights as initialised: latency does not depend on them) and where it came from:
    pruned/channels.json for a trial ranked pruned, else its model.yaml, else its Arch params. Raises RepnasError
    when a pruned trial's plan is gone (its structure cannot be rebuilt) or nothing describes the network."""
    folder = trial_folder(settings, t.number)
    if t.user_attrs.get(PRUNE_FRACTION_KEY) is not None:
        if not (folder / "pruned" / "channels.json").is_file():
            raise StudyError(f"trial {t.number} was ranked pruned but {folder / 'pruned' / 'channels.json'} is gone; "
                             "its pruned structure cannot be rebuilt")
        return pruned_network(folder / "pruned"), "pruned/channels.json"
    if (folder / "model.yaml").is_file():
        return fuse_model(build_model(folder / "model.yaml").eval()), "model.yaml"
    params = t.user_attrs.get(ARCH_KEY)
    if not params:
        raise StudyError(f"trial {t.number}: neither {folder / 'model.yaml'} nor its Arch params are there")
    arch = Arch.from_params(params, load_space(settings.space), where=f"trial {t.number}")
    return fuse_model(build_model(arch.to_yaml(nc)).eval()), "Arch params (model.yaml gone)"


def _complete(study: optuna.Study) -> list[FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.values]


def stored_profile(study: optuna.Study, name: str) -> dict | None:
    """A profile's stored definition (None when the study has none of that name)."""
    return study.user_attrs.get(PROFILE_KEY_PREFIX + name)


def profiles(study: optuna.Study) -> dict[str, dict]:
    """Every profile the study holds: name -> definition."""
    return {k[len(PROFILE_KEY_PREFIX):]: v for k, v in study.user_attrs.items() if k.startswith(PROFILE_KEY_PREFIX)}


def profile_results(study: optuna.Study, name: str) -> dict[int, dict]:
    """Trial number -> its result in profile `name` (latency_ms, median_ms, p90_ms, ratio, ...)."""
    return {number: keys[name] for number, keys in followups(study, KIND).items() if name in keys}


def run_relatency(study: optuna.Study, settings: StudySettings, profile: Profile,
                  report: Callable[[str], None] = print) -> dict:
    """Time every COMPLETE trial the profile lacks against the baseline; return a summary
    {"profile", "timed", "failed", "done", "total", "changed"}.

    The first run of a profile freezes its baseline latency (`measure_baseline`) and stores the definition; a later
    run with other settings under the same name raises StudyError (give another --profile). A trial that cannot be
    rebuilt or timed (a CUDA graph that cannot be captured, a plan gone) is recorded as a failed follow-up with its
    reason and the others go on.
    """
    wanted = profile.describe()
    stored = stored_profile(study, profile.name)
    if stored is not None:
        have = {k: stored.get(k) for k in wanted}
        if have != wanted:
            raise StudyError(f"latency profile {profile.name!r} of study {settings.name!r} was timed with {have}, not "
                             f"{wanted}; give another --profile NAME for these settings")
    psettings = profile.settings(settings)
    trials = _complete(study)
    baseline_trial = next((t for t in trials if t.user_attrs.get(BASELINE_KEY)), None)
    if baseline_trial is None:
        raise StudyError(f"study {settings.name!r} has no complete baseline trial to time the others against")
    nc = _study_nc(study, settings)
    baseline_net, _ = deploy_network(study, settings, baseline_trial, nc)
    if stored is None:
        report(f"profile {profile.name}: timing the baseline (trial {baseline_trial.number}) on {profile.device}, "
               f"backend {profile.backend}, {profile.imgsz} px, batch {profile.batch}")
        lat, tries, warning = measure_baseline(baseline_net, psettings)
        stored = wanted | {"baseline_latency_ms": lat.median_ms, "baseline": lat.to_dict(),
                           "baseline_tries": [t.median_ms for t in tries], "warning": warning,
                           "device_info": lat.device, "versions": environment(), "host": host_id(),
                           "created": time.time()}
        stored_again = stored_profile(study, profile.name)  # another machine may have started it meanwhile
        if stored_again is not None:
            stored = stored_again
        else:
            study.set_user_attr(PROFILE_KEY_PREFIX + profile.name, json.loads(json.dumps(stored, default=str)))
        report(f"profile {profile.name}: baseline {stored['baseline_latency_ms']:.3f} ms frozen"
               + (f" ({warning})" if warning else ""))
    baseline_ms = float(stored["baseline_latency_ms"])
    done = profile_results(study, profile.name)
    todo = [t for t in trials if t.number not in done]
    report(f"profile {profile.name}: {len(done)} of {len(trials)} trials timed, {len(todo)} to time")
    timed = failed = 0
    for t in todo:
        try:
            network, source = deploy_network(study, settings, t, nc)
            lat = time_latency(network, psettings, baseline_net)
        except (RepnasError, RuntimeError, OSError) as err:
            reason = f"{type(err).__name__}: {' '.join(str(err).split())}"
            fail_followup(study, start_followup(study, t.number, KIND, profile.name), reason)
            report(f"trial {t.number:>4} profile {profile.name}: FAILED {reason}")
            failed += 1
            continue
        result = {"latency_ms": lat.latency_ratio * baseline_ms, "median_ms": lat.median_ms, "p90_ms": lat.p90_ms,
                  "ratio": lat.latency_ratio, "reference_median_ms": lat.reference_median_ms, "backend": lat.backend,
                  "device": lat.device, "conditions": lat.conditions, "network": source}
        add_result(study, t.number, KIND, profile.name, json.loads(json.dumps(result, default=str)))
        timed += 1
        report(f"trial {t.number:>4} profile {profile.name}: latency {result['latency_ms']:.3f} ms (measured "
               f"{lat.median_ms:.3f} ms, ratio {lat.latency_ratio:.3f}; study {t.values[1]:.3f} ms)")
    return {"profile": profile.name, "timed": timed, "failed": failed, "done": len(done) + timed,
            "total": len(trials), "changed": front_changes(study, profile.name)}


def front_changes(study: optuna.Study, name: str) -> dict[str, list[int]]:
    """How profile `name`'s front differs from the study's: {"entered": trials on the profile's front only, "left":
    on the study's only, "kept": on both}; over the trials the profile has timed."""
    from nas.pareto import pareto_mask

    results = profile_results(study, name)
    trials = [t for t in _complete(study) if t.number in results]
    if not trials:
        return {"entered": [], "left": [], "kept": []}
    maps = [t.values[0] for t in trials]
    mine = pareto_mask(maps, [results[t.number]["latency_ms"] for t in trials])
    theirs = pareto_mask(maps, [t.values[1] for t in trials])
    numbers = [t.number for t in trials]
    return {"entered": [n for n, a, b in zip(numbers, mine, theirs) if a and not b],
            "left": [n for n, a, b in zip(numbers, mine, theirs) if b and not a],
            "kept": [n for n, a, b in zip(numbers, mine, theirs) if a and b]}


def summary_lines(summary: dict) -> list[str]:
    changed = summary["changed"]
    lines = [f"profile {summary['profile']}: {summary['done']} of {summary['total']} trials timed ({summary['timed']} "
             f"now, {summary['failed']} failed)"]
    if changed["entered"] or changed["left"]:
        lines.append(f"  front on this profile: kept {changed['kept']}; entered {changed['entered']}; left "
                     f"{changed['left']}")
    else:
        lines.append(f"  front on this profile: the study's front, unchanged ({changed['kept']})")
    lines.append(f"  show it: repnas show NAME --profile {summary['profile']}; export it: repnas export NAME --profile "
                 f"{summary['profile']}")
    return lines


def failed_timings(study: optuna.Study, name: str) -> list[tuple[int, str]]:
    """(trial, reason) of the profile's failed timings not later timed."""
    from nas.study.attrs import FAIL_REASON_KEY
    from nas.study.followups import KEY_KEY, KIND_KEY, TARGET_KEY

    done = profile_results(study, name)
    out = []
    for t in companion(study).get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        a = t.user_attrs
        if a.get(KIND_KEY) == KIND and a.get(KEY_KEY) == name and a.get(TARGET_KEY) not in done:
            out.append((a[TARGET_KEY], a.get(FAIL_REASON_KEY, "")))
    return out


def check_profile_name(study: optuna.Study, name: str, where: str = "--profile") -> dict:
    """The stored definition of profile `name`; raises StudyError naming the profiles there are."""
    stored = stored_profile(study, name)
    if stored is None:
        have = sorted(profiles(study))
        raise StudyError(f"{where} {name!r}: study {study.study_name!r} has no such latency profile; "
                         + (f"it has {', '.join(have)}" if have else "make one with `repnas relatency "
                            f"{study.study_name}`"))
    return stored

