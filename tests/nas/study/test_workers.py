"""Worker processes (nas/study/workers.py): two workers share one study, and --devices is refused where there is
no CUDA."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from optuna.trial import TrialState

from nas.cli import main
from nas.study import counts, run_search
from tests.studyfixtures import files_intact as _files_intact
from tests.studyfixtures import load as _load


def test_two_workers_run_six_distinct_trials(settings, tmp_path):
    lines: list[str] = []
    study = run_search(replace(settings, trials=6), workers=2, report=lines.append)
    study = _load(settings)
    counted = [t for t in study.trials if counts(t)]
    assert len(counted) == 6 and len({t.number for t in counted}) == 6
    assert not [t for t in study.trials if t.state == TrialState.RUNNING]
    assert not [t for t in study.trials if t.user_attrs.get("pruned_reason") == "surplus"]  # the local lock
    assert len({t.user_attrs["pid"] for t in study.trials}) == 2  # both workers ran trials
    assert {line.split("]")[0] for line in lines} == {"[worker 0", "[worker 1"}
    _files_intact(study, tmp_path / "results/tiny/trials")


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
