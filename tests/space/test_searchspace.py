from pathlib import Path

import optuna
import pytest
import torch
import yaml
from optuna.trial import FixedTrial

from space.builder import build_model
from space.cost import cfg_cost, count_params
from space.errors import SpaceConfigError
from space.searchspace import (
    SE_MIN_WIDTH,
    Arch,
    Stage,
    arch_cost,
    load_space,
    parse_space,
    sample_arch,
    seed_arch,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _space_dict(**changes):
    d = {
        "imgsz": 320,
        "stages": {
            "P1": {"depth": [1], "width": [16, 32]},
            "P2": {"depth": [1, 2], "width": [32], "se": [False, True]},
            "P3": {"depth": [2], "width": [64, 96], "se": [False, True]},
            "P4": {"depth": [2, 4], "width": [128], "se": True},
            "P5": {"depth": [1], "width": [256], "se": False},
        },
        "head": {"width": [0.5, 1.0], "depth": [1, 2]},
    }
    d.update(changes)
    return d


def test_seed_arch_reproduces_the_seed_yaml(seed_yaml):
    space = load_space()
    arch = seed_arch(space)
    reference = yaml.safe_load(seed_yaml.read_text())
    ours = arch.to_yaml(nc=80)
    for key in ("nc", "depth_multiple", "width_multiple", "anchors", "backbone", "head"):
        assert ours[key] == reference[key], key
    assert count_params(build_model(ours)) == 13_906_045
    assert Arch.from_params(arch.to_params(), space) == arch  # a point of the default space
    assert arch_cost(arch, 640, deploy=False) == (13_906_045, pytest.approx(47.8, abs=0.05))


def test_default_space_spans_4x_cheaper_to_2x_costlier_than_the_seed():
    space = load_space()
    seed_gflops = arch_cost(seed_arch(space), space.imgsz)[1]
    cheapest = Arch(tuple(Stage(min(s.depth), min(s.width)) for s in space.stages), min(space.head_width),
                    min(space.head_depth))
    costliest = Arch(tuple(Stage(max(s.depth), max(s.width), True in s.se) for s in space.stages),
                     max(space.head_width), max(space.head_depth))
    assert arch_cost(cheapest, space.imgsz)[1] <= seed_gflops / 4
    assert arch_cost(costliest, space.imgsz)[1] >= seed_gflops * 2


@pytest.mark.slow  # over 10 s (the not-slow suite aims at ~6 min on 2 cores)
def test_fifty_sampled_archs_build_run_and_round_trip():
    space = load_space()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(50):
        trial = study.ask()
        arch = sample_arch(trial, space)
        seen.add(arch)
        assert Arch.from_params(trial.params, space) == arch
        assert all(not s.se or s.width >= SE_MIN_WIDTH for s in arch.stages)
        cfg = arch.to_yaml(nc=4)
        model = build_model(cfg).eval()
        with torch.no_grad():
            for h, w in ((64, 64), (96, 64)):
                pred, _ = model(torch.zeros(1, 3, h, w))
                assert pred.shape == (1, 3 * (h * w // 64 + h * w // 256 + h * w // 1024), 9)
        text_cfg = yaml.safe_load(arch.to_yaml_text(nc=4))
        assert text_cfg == cfg
        assert count_params(build_model(text_cfg, device="meta")) == count_params(model)
        assert arch_cost(arch, 64, nc=4, deploy=False)[0] == count_params(model)
    assert len(seen) == 50


def test_stage_rows_follow_yolov5_repeat_semantics():
    arch = Arch((Stage(1, 32), Stage(3, 48, True), Stage(2, 64), Stage(1, 128), Stage(4, 256)), 0.5, 2)
    cfg = arch.to_yaml(nc=1)
    bb = cfg["backbone"]
    assert bb[0] == [-1, 1, "RepVGGBlock", [32, 3, 2]]  # depth 1: one stride-2 row, no repeat row
    assert bb[1] == [-1, 1, "RepVGGBlock", [48, 3, 2, 1, 1, 1, "zeros", False, True]]
    assert bb[2] == [-1, 2, "RepVGGBlock", [48, 3, 1, 1, 1, 1, "zeros", False, True]]
    assert len(bb) == 8
    head = cfg["head"]
    assert head[2][0] == [-1, 5] and head[6][0] == [-1, 4]  # P4 and P3 outputs, recomputed
    assert head[9][0] == [-1, 12] and head[12][0] == [-1, 8]
    assert head[-1][0] == [15, 18, 21]
    assert head[0][3] == [128, 1, 1] and head[3] == [-1, 2, "C3", [128, False]]  # 256 * 0.5, C3 depth 2
    model = build_model(cfg)
    assert isinstance(model.model[1].se, torch.nn.Module) and len(model.model[2]) == 2


def test_se_is_only_offered_at_32_channels_or_more():
    space = parse_space(_space_dict())
    arch = sample_arch(FixedTrial({"P1_width": 16, "P2_depth": 1, "P2_se": True, "P3_width": 64, "P3_se": True,
                                   "P4_depth": 2, "head_width": 1.0, "head_depth": 1}), space)
    assert not arch.stages[0].se and arch.stages[1].se and arch.stages[3].se  # P4 se fixed on
    assert arch.stages[4].se is False


def test_fixed_trial_and_from_params_validate_values():
    space = parse_space(_space_dict())
    params = {"P1_width": 32, "P2_depth": 2, "P2_se": False, "P3_width": 96, "P3_se": False, "P4_depth": 4,
              "head_width": 0.5, "head_depth": 2}
    arch = sample_arch(FixedTrial(params), space)
    assert Arch.from_params(params, space) == arch
    with pytest.raises(SpaceConfigError, match=r"param P3_width=80 is not in the space's choices \[64, 96\]"):
        Arch.from_params(params | {"P3_width": 80}, space)
    with pytest.raises(SpaceConfigError, match=r"params lack 'P4_depth'"):
        Arch.from_params({k: v for k, v in params.items() if k != "P4_depth"}, space)
    with pytest.raises(SpaceConfigError, match=r"params \['lr'\] are not dimensions of this space"):
        Arch.from_params(params | {"lr": 0.1}, space)


def test_extras_are_sampled_and_round_trip():
    space = parse_space(_space_dict(extras={"prune_fraction": [0.0, 0.25, 0.5],
                                            "lr_scale": {"low": 0.5, "high": 2.0, "log": True},
                                            "keep": {"low": 8, "high": 64, "step": 8}}))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(10):
        trial = study.ask()
        arch = sample_arch(trial, space)
        assert arch.extra("prune_fraction") in (0.0, 0.25, 0.5)
        assert 0.5 <= arch.extra("lr_scale") <= 2.0 and arch.extra("keep") % 8 == 0
        assert Arch.from_params(trial.params, space) == arch


def test_seed_arch_takes_extras_defaults():
    seed_only = {"P1": {"depth": [1], "width": [64]}, "P2": {"depth": [2], "width": [64]},
                 "P3": {"depth": [4], "width": [128]}, "P4": {"depth": [14], "width": [256]},
                 "P5": {"depth": [1], "width": [512]}}
    space = parse_space(_space_dict(stages=seed_only, head={"width": [1.0], "depth": [1]},
                                    extras={"prune_fraction": {"choices": [0.0, 0.5], "default": 0.5},
                                            "keep": {"low": 8, "high": 64, "step": 8}}))
    assert dict(seed_arch(space).extras) == {"prune_fraction": 0.5, "keep": 8}


def test_seed_arch_outside_a_space_is_an_error():
    with pytest.raises(SpaceConfigError, match=r"the seed design is not a point of this space: .*P1_width=64"):
        seed_arch(parse_space(_space_dict()))


def test_budget_violation_names_the_budget():
    space = parse_space(_space_dict(budgets={"max_params": 1e6, "max_gflops": 5}))
    assert space.budget_violation(500_000, 4.0) is None
    assert space.budget_violation(2_000_000, 4.0) == "params 2,000,000 > max_params 1,000,000"
    assert space.budget_violation(500_000, 6.5) == "GFLOPs 6.50 > max_gflops 5 at 320px"


def test_cfg_cost_and_arch_cost_agree():
    arch = seed_arch()
    cost = cfg_cost(arch.to_yaml(80), 320)
    assert arch_cost(arch, 320) == (cost.params_deploy, cost.gflops_deploy)
    assert arch_cost(arch, 320, deploy=False) == (cost.params, cost.gflops)


SPACE_ERRORS = {
    "stages missing": ({"head": {}}, r"field 'stages': None must map exactly P1, P2, P3, P4, P5"),
    "stage order": ({"stages": {"P2": {}, "P1": {}}}, r"field 'stages': \['P2', 'P1'\] must map exactly"),
    "zero depth": (_space_dict(stages=_space_dict()["stages"] | {"P3": {"depth": [0, 2], "width": [64]}}),
                   r"field 'stages.P3.depth': 0 must be an integer in 1..64"),
    "width not /8": (_space_dict(stages=_space_dict()["stages"] | {"P3": {"depth": [2], "width": [60]}}),
                     r"field 'stages.P3.width': 60 is not a multiple of 8 \(YOLOv5 would build 64\)"),
    "fixed SE on narrow": (_space_dict(stages=_space_dict()["stages"] | {"P1": {"depth": [1], "width": [16],
                                                                                "se": True}}),
                           r"field 'stages.P1.se': True needs every width >= 32"),
    "se not bool": (_space_dict(stages=_space_dict()["stages"] | {"P1": {"depth": [1], "width": [32],
                                                                         "se": "yes"}}),
                    r"field 'stages.P1.se': 'yes' must be true, false or \[false, true\]"),
    "head width": (_space_dict(head={"width": [0], "depth": [1]}), r"field 'head.width': \[0\] must be distinct"),
    "imgsz": (_space_dict(imgsz=100), r"field 'imgsz': 100 must be a multiple of 32"),
    "budget": (_space_dict(budgets={"max_gflops": -1}), r"field 'budgets.max_gflops': -1 must be a positive"),
    "unknown field": (_space_dict(stagez={}), r"field 'stagez': 'stagez' is not a space field"),
    "extra collides": (_space_dict(extras={"P1_depth": [1]}), r"field 'extras.P1_depth'.*collides"),
    "extra range": (_space_dict(extras={"f": {"low": 2, "high": 1}}),
                    r"`low <= high` must hold, but got \(low=2, high=1\)"),
    "repeated choice": (_space_dict(stages=_space_dict()["stages"] | {"P3": {"depth": [2, 2], "width": [64]}}),
                        r"field 'stages.P3.depth': \[2, 2\] repeats a choice"),
}


@pytest.mark.parametrize("case", list(SPACE_ERRORS))
def test_bad_space_errors(case):
    data, pattern = SPACE_ERRORS[case]
    with pytest.raises(SpaceConfigError, match=pattern) as info:
        parse_space(data, "my_space.yaml")
    assert str(info.value).startswith("my_space.yaml: ")


def test_load_space_names_the_file(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("stages: 3\n")
    with pytest.raises(SpaceConfigError, match=rf"^{path}: field 'stages'"):
        load_space(path)


def test_the_small_space_is_the_default_spaces_cheap_corner_narrowed(tmp_path, monkeypatch):
    from space.searchspace import builtin_spaces

    assert {"default", "small"} <= set(builtin_spaces())
    small, default = load_space("small"), load_space("default")
    for s, d in zip(small.stages, default.stages):
        assert set(s.depth) <= set(d.depth) and set(s.se) <= set(d.se)
        assert min(s.width) == min(d.width) // 2 and max(s.width) <= min(d.width)
    assert set(small.head_width) <= set(default.head_width) and set(small.head_depth) <= set(default.head_depth)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "small").mkdir()  # a folder of that name here: still the built-in (a path must be a file)
    assert load_space("small").source == small.source
    (tmp_path / "my.yaml").write_text(Path(small.source).read_text())
    assert load_space("my.yaml").source.endswith("my.yaml")


def test_seed_names_the_seed_design_unless_a_file_has_that_name(tmp_path, monkeypatch):
    from space.searchspace import is_seed_source, model_yaml_source

    monkeypatch.chdir(tmp_path)
    assert model_yaml_source("seed", nc=3) == seed_arch().to_yaml(3)
    assert count_params(build_model(model_yaml_source("seed"), device="meta")) == 13_906_045  # the seed YAML's count
    assert model_yaml_source("my.yaml") == "my.yaml" and not is_seed_source(None)
    (tmp_path / "seed").write_text("nc: 1\n")
    assert model_yaml_source("seed") == "seed" and not is_seed_source(Path("seed"))  # the file wins
