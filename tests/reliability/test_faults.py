"""Injected trial faults fail their trial with its reason, never the study, and `repnas show` counts them by reason.

One tiny study (3 trials that count, 1 epoch at 64 px) runs in this process. Trials 1..5 are five distinct
enqueued Archs, and each gets one fault, injected through monkeypatch only while that trial runs:

    nan      the training loss becomes NaN (fit raises TrainingDiverged)
    loader   the dataset's __getitem__ raises (a corrupt image)
    oom      CUDA out of memory at every batch size: the half-batch retry fails as well
    build    the model fails to build
    disk     the disk fills while weights.pt is written (ENOSPC from the atomic write; no partial file is left)

Trial 6 diverges too, at its second batch: its message differs from trial 1's only in figures, and `repnas show`
counts the two as one reason ("2 x TrainingDiverged: loss became nan at epoch #, batch # ...").

The one-time OOM that succeeds at half the batch is tests/nas/study/test_trial.py's
test_cuda_out_of_memory_retries_once_at_half_the_batch.
"""

from __future__ import annotations

import errno
import os
from collections import Counter
from dataclasses import replace
from pathlib import Path

import optuna
import torch
from optuna.trial import TrialState

import nas.data
import nas.files
import nas.study
import nas.train
from nas.cli import main
from nas.study import counts, prepare_study, run_search
from tests.nas.conftest import assets, settings  # noqa: F401  (fixtures: tiny space, data, baseline)
from tests.studyfixtures import BASELINE

# fault -> (trial number, the start of the trial's fail_reason)
FAULTS = {
    "nan": (1, "TrainingDiverged: loss became nan at epoch 1, batch 1"),
    "loader": (2, "OSError: image file is truncated: images/train/3.jpg"),
    "oom": (3, "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"),
    "build": (4, "ValueError: injected: this Arch does not build"),
    "disk": (5, f"OSError: [Errno {errno.ENOSPC}] {os.strerror(errno.ENOSPC)}"),
}
NAN_AGAIN = (6, "TrainingDiverged: loss became nan at epoch 1, batch 2")
TRIALS = 3
# what the "failed:" line of `repnas show` says for each kind
SHOWN = {kind: f"1 x {reason}" for kind, (_, reason) in FAULTS.items()} | {
    "nan": "2 x TrainingDiverged: loss became nan at epoch #, batch # (box/obj/cls [#, #, #])"}


class _FullDisk:
    """A file whose write stores the first half of the data, then fails as a full disk does."""

    def __init__(self, f, folder: Path, seen_temp: list[Path]):
        self._f, self._folder, self._seen = f, folder, seen_temp

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()

    def write(self, data: bytes) -> int:
        self._f.write(data[: len(data) // 2])
        self._f.flush()
        self._seen.extend(self._folder.glob(".weights.pt.*.tmp"))  # the temp file exists now, half written
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_each_fault_fails_its_trial_with_its_reason_and_the_study_finishes(settings, monkeypatch, capsys,  # noqa: F811
                                                                           reliability_report):
    settings, study = prepare_study(replace(settings, trials=TRIALS, max_failures=10))
    stages = ("P1", "P2", "P3", "P4", "P5", "P1 P2")
    for widened in stages:  # trials 1..6: distinct Archs, so no fault trial is rejected as a duplicate
        study.enqueue_trial(dict(BASELINE, **{f"{stage}_width": 16 for stage in widened.split()}),
                            user_attrs={"enqueued": True})
    target = {kind: number for kind, (number, _) in FAULTS.items()}
    current: list[int | None] = [None]  # the trial run_trial is running

    real_run_trial = nas.study.run.run_trial

    def run_trial(trial, *args):
        current[0] = trial.number
        try:
            return real_run_trial(trial, *args)
        finally:
            current[0] = None

    losses: Counter = Counter()  # loss calls per trial

    class FaultyLoss(nas.train.DetectionLoss):
        def __call__(self, preds, targets):
            losses[current[0]] += 1
            if current[0] == target["oom"]:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            loss, items = super().__call__(preds, targets)
            diverges = current[0] == target["nan"] or (current[0] == NAN_AGAIN[0] and losses[current[0]] == 2)
            return (loss * float("nan"), items) if diverges else (loss, items)

    real_getitem = nas.data.YoloDataset.__getitem__

    def getitem(self, i):
        if current[0] == target["loader"]:
            raise OSError("image file is truncated: images/train/3.jpg")
        return real_getitem(self, i)

    real_build = nas.study.trial.build_model

    def build_model(*args, **kwargs):
        if current[0] == target["build"]:
            raise ValueError("injected: this Arch does not build")
        return real_build(*args, **kwargs)

    real_fit, oom_batches = nas.study.trial.fit, []

    def fit(model, data, cfg, callbacks=()):
        if current[0] == target["oom"]:
            oom_batches.append(cfg.batch)
        return real_fit(model, data, cfg, callbacks)

    real_write, temp_seen = nas.study.trial.write_bytes_atomic, []

    def write_bytes_atomic(path, data):
        if current[0] != target["disk"] or Path(path).name != "weights.pt":
            return real_write(path, data)
        real_fdopen = os.fdopen
        with monkeypatch.context() as m:  # only this write's file is on the full disk
            m.setattr(os, "fdopen", lambda fd, *a, **k: _FullDisk(real_fdopen(fd, *a, **k), Path(path).parent,
                                                                            temp_seen))
            return real_write(path, data)

    monkeypatch.setattr(nas.study.run, "run_trial", run_trial)
    monkeypatch.setattr(nas.train, "DetectionLoss", FaultyLoss)
    monkeypatch.setattr(nas.data.YoloDataset, "__getitem__", getitem)
    monkeypatch.setattr(nas.study.trial, "build_model", build_model)
    monkeypatch.setattr(nas.study.trial, "fit", fit)
    monkeypatch.setattr(nas.study.trial, "write_bytes_atomic", write_bytes_atomic)

    lines: list[str] = []
    study = run_search(settings, report=lines.append)  # no fault escapes: the study runs to its count
    trials = optuna.load_study(study_name=settings.name, storage=nas.study.storage_for(settings)).trials
    assert sum(counts(t) for t in trials) == TRIALS
    assert not [t for t in trials if t.state == TrialState.RUNNING]

    def failed_with(number: int, reason: str) -> bool:
        t = trials[number]
        return t.state == TrialState.FAIL and str(t.user_attrs.get("fail_reason", "")).startswith(reason)

    failed_right = [kind for kind, (number, reason) in FAULTS.items() if failed_with(number, reason)]
    assert main(["show", settings.name]) == 0
    screen = capsys.readouterr().out
    failed_line = next((line for line in screen.splitlines() if line.startswith("  failed: ")), "")
    shown = [kind for kind, text in SHOWN.items() if text in failed_line]
    reliability_report("faults", f"injected faults: {len(failed_right)}/{len(FAULTS)} kinds FAILED with their reason, "
                                 f"study finished ({sum(counts(t) for t in trials)} of {TRIALS} counted), show counts "
                                 f"{len(shown)} reasons")
    assert failed_right == list(FAULTS), [(t.number, t.state.name, t.user_attrs.get("fail_reason")) for t in trials]
    assert failed_with(*NAN_AGAIN)
    assert shown == list(FAULTS) and failed_line.count(" x ") == len(FAULTS), screen  # 6 failures, 5 reasons
    assert f"{len(FAULTS) + 1} FAIL" in screen and f"{TRIALS} of {TRIALS} counted" in screen
    assert all(f"trial {n:>4} FAIL" in "\n".join(lines) for n, _ in [*FAULTS.values(), NAN_AGAIN])
    assert study.trials[0].state == TrialState.COMPLETE  # the baseline before the faults

    # the OOM trial tried its batch and half of it; the message names the retry
    assert oom_batches == [8, 4]
    assert trials[target["oom"]].user_attrs["oom_retry"] == "CUDA out of memory at batch 8; retried at batch 4"
    # the full disk: the temp file existed half written, and neither it nor a weights.pt is left
    folder = nas.study.trial_folder(settings, target["disk"])
    assert len(temp_seen) == 1 and temp_seen[0].parent == folder and temp_seen[0].name.startswith(".weights.pt.")
    assert sorted(p.name for p in folder.iterdir() if "weights" in p.name) == []
    assert "weights.pt" not in trials[target["disk"]].user_attrs["files"]
    for kind in ("nan", "loader", "oom", "build", "disk"):  # each failure left its traceback for the user
        assert (nas.study.trial_folder(settings, target[kind]) / "traceback.txt").is_file()
