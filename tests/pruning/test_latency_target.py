"""Pruning to a measured latency target: the search over the FLOPs fraction against a latency model the test
controls (so the figures are exact), importance computed once, unreachable targets refused in one line (the CLI job
with its independent re-measurement: tests/nas/test_prune_cli.py)."""

from __future__ import annotations

import pytest
import torch

import pruning.latency_target as lt
from nas.prune import LatencyTarget
from pruning.channel import PruneError, make_importance, prune_to_flops
from pruning.latency_target import TableImportance, importance_table, prune_to_latency
from pruning.reparam import fuse_model
from space.builder import build_model
from space.cost import count_gflops
from tests.conftest import SEED_YAML

IMGSZ = 160


@pytest.fixture(scope="module")
def seed_fused():
    if not SEED_YAML.exists():
        pytest.skip(f"{SEED_YAML} is absent (set REPNAS_SHARED to the shared folder)")
    torch.manual_seed(0)
    return fuse_model(build_model(SEED_YAML, nc=3)).eval()


def affine_latency(model, overhead: float = 0.3):
    """A latency model with a fixed overhead: ratio = overhead + (1 - overhead) x FLOPs fraction of `model`."""
    full = count_gflops(model, IMGSZ)
    return lambda candidate: overhead + (1 - overhead) * count_gflops(candidate, IMGSZ) / full


def test_search_reaches_the_target_of_a_latency_model_with_overhead(seed_fused):
    found = prune_to_latency(seed_fused, 0.6, affine_latency(seed_fused), IMGSZ)
    assert abs(found.ratio / 0.6 - 1) <= lt.SEARCH_TOLERANCE
    # FLOPs alone would have missed: with 30% overhead, 0.6x latency needs ~0.43 of the FLOPs, not 0.6
    assert found.fraction == pytest.approx((0.6 - 0.3) / 0.7, abs=0.03)
    assert len(found.evaluations) <= 4  # the secant is exact on an affine model, up to channel rounding
    assert count_gflops(found.result.model, IMGSZ) == pytest.approx(found.fraction * count_gflops(seed_fused, IMGSZ))
    assert found.result.importance == "l2"


def test_the_source_is_not_changed_and_candidates_start_from_it(seed_fused):
    before = {k: v.clone() for k, v in seed_fused.state_dict().items()}
    prune_to_latency(seed_fused, 0.7, affine_latency(seed_fused, 0.0), IMGSZ)
    after = seed_fused.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_importance_is_computed_once_for_every_candidate(seed_fused, monkeypatch):
    calls = []
    real = make_importance("l2")

    def counting(name, seed=0):
        def score(group):
            calls.append(group)
            return real(group)
        return score

    monkeypatch.setattr(lt, "make_importance", counting)
    found = prune_to_latency(seed_fused, 0.6, affine_latency(seed_fused), IMGSZ)
    assert len(found.evaluations) >= 2
    scored = len(calls)  # one pass over the groups, whatever the number of timed candidates
    assert scored == len(importance_table(seed_fused, "l2", IMGSZ))


def test_table_importance_prunes_the_channels_the_table_ranks_lowest(seed_fused):
    table = importance_table(seed_fused, "l2", IMGSZ)
    direct = prune_to_flops(seed_fused, 0.5, IMGSZ, importance="l2", steps=1)
    work = fuse_model(build_model(SEED_YAML, nc=3)).eval()
    work.load_state_dict(seed_fused.state_dict())
    via_table = prune_to_flops(work, 0.5, IMGSZ, importance=TableImportance(table, work), steps=1, inplace=True)
    x = torch.rand(1, 3, 64, 64)
    assert via_table.plan == direct.plan
    assert torch.allclose(via_table.model(x)[0], direct.model.eval()(x)[0], atol=1e-5)


def test_a_table_from_another_network_is_refused(seed_fused):
    table = importance_table(seed_fused, "l2", IMGSZ)
    name = next(iter(table))
    table[name] = table[name][:-1]
    work = fuse_model(build_model(SEED_YAML, nc=3)).eval()
    with pytest.raises(PruneError, match="importance table has no scores for"):
        prune_to_flops(work, 0.5, IMGSZ, importance=TableImportance(table, work), steps=1, inplace=True)


def test_an_unreachable_latency_target_is_refused_with_the_reachable_ratio(seed_fused):
    # a latency floor of 0.8 (launch overhead): 0.5x cannot be reached by removing channels
    with pytest.raises(PruneError) as err:
        prune_to_latency(seed_fused, 0.5, affine_latency(seed_fused, 0.8), IMGSZ, max_evals=12)
    message = str(err.value)
    assert "cannot be reached" in message and "raise the target to at least" in message and "\n" not in message


@pytest.mark.parametrize("bad", ["1.2x", "0x", "-3ms", "fast", "0.6", "nanms", "1x"])
def test_bad_latency_targets_name_both_forms(bad):
    with pytest.raises(PruneError, match=r"'0.6x'.*'35ms'"):
        LatencyTarget.parse(bad)


def test_latency_target_forms():
    assert LatencyTarget.parse("0.6x").ratio == 0.6 and LatencyTarget.parse(" 35 ms").ms == 35.0
