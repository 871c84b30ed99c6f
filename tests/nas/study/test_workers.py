"""Worker processes (nas/study/workers.py): two workers share one study and say each trial's phases through the
coordinator, and --devices is refused where there is no CUDA."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
import torch
from optuna.trial import TrialState

from nas.cli import main
from nas.study import counts, run_search
from tests.studyfixtures import files_intact as _files_intact
from tests.studyfixtures import load as _load


@pytest.mark.slow  # over 10 s (the not-slow suite aims at ~6 min on 2 cores)
def test_two_workers_run_six_distinct_trials(settings, tmp_path):
    lines: list[str] = []
    study = run_search(replace(settings, trials=6, quiet=False), workers=2, report=lines.append)
    study = _load(settings)
    counted = [t for t in study.trials if counts(t)]
    assert len(counted) == 6 and len({t.number for t in counted}) == 6
    assert not [t for t in study.trials if t.state == TrialState.RUNNING]
    assert not [t for t in study.trials if t.user_attrs.get("pruned_reason") == "surplus"]  # the local lock
    assert len({t.user_attrs["pid"] for t in study.trials}) == 2  # both workers ran trials
    assert {line.split("]")[0] for line in lines} == {"[worker 0", "[worker 1"}
    _files_intact(study, tmp_path / "results/tiny/trials")
    # through the coordinator, whole lines: one as each phase of a trial starts, one per validation epoch
    for t in counted:
        worker = next(line.split("]")[0] for line in lines if line.endswith(f"trial {t.number:>4} phase build"))
        said = [line.split("] ", 1)[1] for line in lines if line.startswith(worker + "]")
                and line.split("] ", 1)[1].startswith(f"trial {t.number:>4} ")]
        phases = [line.split()[3] for line in said if line.split()[2] == "phase"]
        assert phases == ["build", "latency", "train", "train", "fuse", "eval"], said
        assert re.fullmatch(rf"trial {t.number:>4} phase train \(epoch 1/1: box [\d.]+ obj [\d.]+ cls [\d.]+; "
                            r"mAP50-95 [\d.]+ mAP50 [\d.]+; \d+ s\)", said[3]), said
        assert said[-1].split()[2] == t.state.name  # the trial's result line ends its lines
    assert not [line for line in lines if "\r" in line or "it/s" in line]  # no progress bars


def test_a_quiet_search_says_only_its_trials(settings):
    lines: list[str] = []
    run_search(replace(settings, trials=1), report=lines.append)  # StudySettings.quiet: True unless the CLI says
    assert len(lines) == 1 and lines[0].startswith("trial    0 COMPLETE")


def test_cli_refuses_devices_without_cuda_and_bad_values(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["search", "--devices", "0,1"]) == 2
    for argv in (["search", "--devices", "a,b"], ["search", "--max-latency-ms", "-3"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "no CUDA device is available here" in err and "'a,b' is not a comma-separated list of CUDA indices" in err
    assert "'-3' is not a positive number" in err
