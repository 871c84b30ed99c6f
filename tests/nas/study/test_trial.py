"""One trial (nas/study/trial.py): its phases called one by one on an in-memory study, and the same rules seen
through whole tiny studies (budgets, the CUDA out-of-memory retry, early stopping)."""

from __future__ import annotations

import copy
import hashlib
from dataclasses import replace
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from optuna.trial import TrialState

import nas.study
from nas.study import SearchStopped, counts, run_search, trial_records
from nas.study.trial import (
    Candidate,
    TrialRecorder,
    TrialRejected,
    phase_budget,
    phase_build,
    phase_cost,
    phase_latency,
    phase_latency_budgets,
)
from pruning.reparam import fuse_model
from space.builder import build_model
from space.cost import is_deploy
from space.searchspace import Arch, Space, arch_cost, load_space, parse_space
from tests.studyfixtures import BASELINE, TINY_SPACE, tiny_settings
from tests.studyfixtures import load as _load

# ---------------------------------------------------------------------------------------------------------------
# the phases, called one by one on a real trial of an in-memory study

WIDER = dict(BASELINE, P5_width=16)  # one step up from the baseline, the smallest Arch of TINY_SPACE


def _space(**budgets) -> Space:
    return parse_space(copy.deepcopy(TINY_SPACE) | ({"budgets": budgets} if budgets else {}))


def _recorder(tmp_path: Path, params: dict, study: optuna.Study | None = None) -> TrialRecorder:
    """A TrialRecorder of a RUNNING trial whose Arch params are `params` (enqueued, so the sampler returns them)."""
    study = study or optuna.create_study(directions=["maximize", "minimize"])
    study.enqueue_trial(params)
    trial = study.ask()
    return TrialRecorder(trial, tmp_path / "trials" / str(trial.number), tmp_path / "trials")


def _built(tmp_path: Path, params: dict, space: Space, *, baseline: bool = False) -> tuple[TrialRecorder, Candidate]:
    rec, c = _recorder(tmp_path, params), Candidate(baseline=baseline, imgsz=64)
    phase_build(rec, c, space, 2, 0)
    phase_cost(rec, c, space)
    return rec, c


def test_build_cost_and_budget_record_the_arch_its_cost_and_model_yaml(tmp_path):
    space = _space()
    rec, c = _built(tmp_path, WIDER, space)
    phase_budget(rec, c, space)  # no budgets: nothing rejected
    attrs = rec.trial.user_attrs
    assert attrs["arch"] == WIDER == c.arch.to_params()
    params, gflops = arch_cost(c.arch, 64, 2)  # deploy figures, counted independently on a meta model
    assert attrs["params"] == params and attrs["gflops_deploy"] == pytest.approx(gflops)
    assert attrs["params_train"] > attrs["params"] and attrs["gflops"] > attrs["gflops_deploy"]
    assert attrs["gflops_imgsz"] == 64 and is_deploy(c.deployed)
    model_yaml = tmp_path / "trials" / "0" / "model.yaml"
    assert attrs["files"] == {"model.yaml": {"path": "0/model.yaml",
                                             "sha256": hashlib.sha256(model_yaml.read_bytes()).hexdigest()}}
    assert Arch.from_model_yaml(yaml.safe_load(model_yaml.read_text()), space, "model.yaml") == c.arch
    assert any(f"built {WIDER}: {params:,} params" in line for line in rec.log)


def test_build_rejects_an_arch_already_trained_in_the_study(tmp_path):
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.add_trial(optuna.trial.create_trial(values=[0.1, 1.0], user_attrs={"arch": WIDER}))
    rec, c = _recorder(tmp_path, WIDER, study), Candidate(baseline=False, imgsz=64)
    with pytest.raises(TrialRejected, match="duplicate"):
        phase_build(rec, c, _space(), 2, 0)
    assert rec.trial.user_attrs["pruned_reason"] == "duplicate"
    assert not (tmp_path / "trials" / "1" / "model.yaml").exists()


def test_budget_rejects_an_over_budget_arch_but_never_the_baseline(tmp_path):
    smallest = arch_cost(Arch.from_params(BASELINE, _space()), 64, 2)[0]
    space = _space(max_params=smallest)  # only the smallest Arch fits
    rec, c = _built(tmp_path / "candidate", WIDER, space)
    with pytest.raises(TrialRejected, match=r"over budget: params [\d,]+ > max_params"):
        phase_budget(rec, c, space)
    attrs = rec.trial.user_attrs
    assert attrs["constraints"] == [1.0] and attrs["pruned_reason"] == "rejected"
    assert attrs["rejected"] == f"params {c.cost.params_deploy:,} > max_params {smallest:,}"
    assert rec.trial.study.trials[0].constraints == {"budget": 1.0}
    rec, c = _built(tmp_path / "baseline", WIDER, space, baseline=True)  # the same Arch as the study's baseline
    phase_budget(rec, c, space)
    assert "rejected" not in rec.trial.user_attrs and "constraints" not in rec.trial.user_attrs


def test_latency_budgets_reject_over_max_latency_ratio_but_never_the_baseline(tmp_path, assets):
    space = _space()
    baseline_fused = fuse_model(build_model(Arch.from_params(BASELINE, space).to_yaml(2)))
    for ratio, baseline, rejected in ((0.01, False, True), (1000.0, False, False), (0.01, True, False)):
        settings = tiny_settings(assets, latency_batch=1, max_latency_ratio=ratio)
        folder = tmp_path / f"{ratio}-{baseline}"
        rec, c = _built(folder, WIDER, space, baseline=baseline)
        rec.trial.study.set_user_attr("baseline_latency_ms", 2.0)  # the frozen figure objectives are scaled by
        phase_latency(rec, c, settings, baseline_fused)
        attrs = rec.trial.user_attrs
        assert attrs["latency_ms"] == pytest.approx(attrs["latency_ratio"] * 2.0) and attrs["latency_measured_ms"] > 0
        if not rejected:
            phase_latency_budgets(rec, c, settings)
            assert "rejected" not in attrs, (ratio, baseline)
            continue
        with pytest.raises(TrialRejected, match=r"over budget: latency ratio [\d.]+ > max_latency_ratio 0.01"):
            phase_latency_budgets(rec, c, settings)
        violation = c.lat.latency_ratio / 0.01 - 1
        assert rec.trial.user_attrs["constraints"] == [pytest.approx(violation)] and violation > 0
        assert rec.trial.study.trials[0].constraints == {"latency": pytest.approx(violation)}
        assert rec.trial.user_attrs["pruned_reason"] == "rejected"


def test_the_recorder_keeps_a_phases_seconds_only_when_it_ends_normally(tmp_path):
    rec = _recorder(tmp_path, BASELINE)
    with rec.phase("build"):
        pass
    with pytest.raises(RuntimeError), rec.phase("train"):
        raise RuntimeError("the phase failed")
    assert set(rec.seconds) == {"build"} and rec.seconds["build"] >= 0
    rec.note("a line")
    rec.save_log()
    assert (tmp_path / "trials" / "0" / "trial.log").read_text().endswith(" a line\n")
    assert set(rec.trial.user_attrs["files"]) == {"trial.log"}


# ---------------------------------------------------------------------------------------------------------------
# the same rules through whole tiny studies


def test_over_budget_archs_are_rejected_before_training_and_do_not_count(settings, assets, monkeypatch):
    space = dict(TINY_SPACE, budgets={"max_params": arch_cost(Arch.from_params(BASELINE, load_space(assets["space"])),
                                                               64, 2)[0]})
    tight = assets["root"] / "tight.yaml"
    tight.write_text(yaml.safe_dump(space))
    real_fit, calls = nas.study.trial.fit, []
    monkeypatch.setattr(nas.study.trial, "fit", lambda *a, **k: calls.append(1) or real_fit(*a, **k))
    with pytest.raises(SearchStopped, match="over budget or already trained"):
        run_search(replace(settings, space=str(tight), trials=2))
    study = optuna.load_study(study_name="tiny", storage=nas.study.storage_for(settings))
    assert len(calls) == 1 and study.trials[0].state == TrialState.COMPLETE  # the baseline only
    rejected = [t for t in study.trials if t.user_attrs.get("rejected")]
    assert rejected and all(t.state == TrialState.PRUNED and not counts(t) for t in rejected)
    assert all("max_params" in t.user_attrs["rejected"] and t.constraints == {"budget": 1.0} for t in rejected)
    assert not any((Path("results/tiny/trials") / str(t.number) / "weights.pt").exists() for t in rejected)


def test_cuda_out_of_memory_retries_once_at_half_the_batch(settings, monkeypatch):
    real_fit, batches = nas.study.trial.fit, []

    def fit(model, data, cfg, callbacks=()):
        batches.append(cfg.batch)
        if len(batches) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_fit(model, data, cfg, callbacks)

    monkeypatch.setattr(nas.study.trial, "fit", fit)
    study = run_search(replace(settings, trials=1))
    t = study.trials[0]
    assert t.state == TrialState.COMPLETE and batches == [8, 4]
    assert t.user_attrs["oom_retry"] == "CUDA out of memory at batch 8; retried at batch 4"
    assert t.user_attrs["proxy"]["batch"] == 4


@pytest.mark.slow  # over 10 s (the not-slow suite aims at ~6 min on 2 cores)
def test_latency_budget_rejects_before_training(settings, monkeypatch):
    real_fit, calls = nas.study.trial.fit, []
    monkeypatch.setattr(nas.study.trial, "fit", lambda *a, **k: calls.append(1) or real_fit(*a, **k))
    with pytest.raises(SearchStopped, match="over budget or already trained"):
        run_search(replace(settings, trials=2, max_latency_ratio=0.01))
    study = _load(settings)
    assert len(calls) == 1 and study.trials[0].state == TrialState.COMPLETE  # the baseline is never rejected
    assert all(t.state == TrialState.PRUNED and not counts(t) for t in study.trials[1:])
    rejected = [t for t in study.trials if t.user_attrs.get("pruned_reason") == "rejected"]  # others: duplicates
    assert rejected and all(t.user_attrs["rejected"].startswith("latency ratio ") and "> max_latency_ratio 0.01" in
               t.user_attrs["rejected"] and t.constraints["latency"] > 0 for t in rejected)


def test_early_stopped_trials_are_pruned_with_partial_metrics_and_count(settings, monkeypatch):
    stops = []

    def rule(epoch, map50_95, latency_ms, epochs, finished, cfg):
        if epoch == 1 and finished:
            stops.append(epoch)
            return "early stop at epoch 1: test rule"
        return None

    monkeypatch.setattr(nas.study.trial, "should_stop", rule)
    proxy = dict(settings.proxy, epochs=2, val_every=1)
    study = run_search(replace(settings, trials=3, proxy=proxy))
    assert study.trials[0].state == TrialState.COMPLETE and len(study.trials[0].user_attrs["curve"]) == 2
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED]
    assert len(pruned) == 2 == len(stops) and all(counts(t) for t in pruned)
    for t in pruned:
        assert t.user_attrs["stopped_epoch"] == 1 and t.user_attrs["pruned_reason"] == "early_stop"
        assert t.user_attrs["stop_rule"].startswith("early stop")
        assert t.user_attrs["partial_map50_95"] == t.user_attrs["curve"][0][1]
        assert "weights.pt" not in t.user_attrs["files"] and "metrics.json" in t.user_attrs["files"]
    records = {r.number: r for r in trial_records(study, settings)}
    assert all(records[t.number].map50_95 is None for t in pruned)  # partial mAP stays off the Pareto table
