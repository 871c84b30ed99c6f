"""`repnas prune` and `repnas export-model` on trials of a tiny study."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from nas.cli import main
from nas.source import SourceError, load_source
from nas.study import run_search
from pruning.portable import load_pruned


@pytest.fixture
def study(settings):
    wide = dict(settings.proxy, epochs=1)
    run_search(replace(settings, trials=2, proxy=wide))
    return settings


def test_prune_a_study_trial_writes_prune_json_and_a_loadable_model(study, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert main(["prune", "tiny:0", "--target-flops", "60%", "--round-to", "4", "--imgsz", "64",
                 "--finetune-epochs", "1", "--device", "cpu", "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "GFLOPs deploy at 64" in text and "mAP50 (after 1 fine-tuning epochs)" in text and "latency ratio" in text
    report = json.loads((out / "prune.json").read_text())
    assert report["gflops_after"] == pytest.approx(0.6 * report["gflops_before"], rel=0.02)
    assert report["params_after"] < report["params_before"]
    for key in ("map50_95_before", "map50_before", "map50_95_pruned", "map50_pruned", "map50_95_finetuned",
                "map50_finetuned"):
        assert 0 <= report[key] <= 1, key
    assert report["latency"]["latency_ratio"] > 0 and report["finetune_epochs"] == 1
    model = load_pruned(out)
    x = torch.rand(1, 3, 64, 64)
    again = load_source(str(out)).model
    assert torch.equal(model(x)[0], again(x)[0])
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return  # the ONNX test below says how to install them
    assert main(["export-model", str(out), "--onnx", str(tmp_path / "pruned.onnx"), "--imgsz", "64"]) == 0
    assert "onnxruntime vs PyTorch: max abs diff" in capsys.readouterr().out


def test_export_model_onnx_matches_pytorch(study, tmp_path, capsys):
    pytest.importorskip("onnxruntime", reason="ONNX export needs the onnx extra: pip install -e '.[onnx]'")
    pytest.importorskip("onnx", reason="ONNX export needs the onnx extra: pip install -e '.[onnx]'")
    out = tmp_path / "model.onnx"
    assert main(["export-model", "tiny:1", "--onnx", str(out), "--imgsz", "64"]) == 0
    assert out.is_file() and "onnxruntime vs PyTorch: max abs diff" in capsys.readouterr().out


def test_bad_sources_and_targets_exit_2(study, tmp_path, capsys):
    assert main(["prune", "tiny:9", "--target-flops", "50%"]) == 2
    assert main(["prune", "tiny:0", "--target-flops", "150%"]) == 2
    assert main(["prune", "nothing-here.yaml", "--target-flops", "50%"]) == 2
    err = capsys.readouterr().err
    assert "tiny:9: study 'tiny' has trials 0..1" in err and "above 100%" in err
    assert "no such study trial, folder or model YAML" in err
    folder = tmp_path / "results/tiny/trials/0"
    (folder / "fused.pt").write_bytes((folder / "fused.pt").read_bytes() + b"x")  # damaged after the study
    with pytest.raises(SourceError, match=r"sha256 .* differs from the .* recorded by the study"):
        load_source("tiny:0")


def test_target_below_what_grouped_convs_allow_exits_2_naming_them(tmp_path, monkeypatch, capsys):
    import yaml

    from pruning.reparam import fuse_model
    from space.builder import build_model
    from tests.pruning.test_channel import grouped_yaml

    monkeypatch.chdir(tmp_path)
    (tmp_path / "grouped.yaml").write_text(yaml.safe_dump(grouped_yaml(nc=2)))
    torch.manual_seed(0)
    torch.save(fuse_model(build_model(grouped_yaml(nc=2))).state_dict(), tmp_path / "fused.pt")
    assert main(["prune", "grouped.yaml", "--weights", "fused.pt", "--target-flops", "20%", "--imgsz", "64",
                 "--importance", "l2", "--no-eval", "--device", "cpu", "--out", "out", "--quiet"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("repnas prune: error: target='20%' ("), lines
    assert "below the smallest reachable" in lines[0] and "deploy GFLOPs" in lines[0]
    assert "grouped convolutions are never pruned" in lines[0] and "model.2.rbr_reparam" in lines[0]
    assert "Traceback" not in captured.err and not (tmp_path / "out").exists()


def test_an_unreachable_target_fails_before_any_evaluation(monkeypatch):
    from nas import prune
    from pruning.channel import PruneError
    from pruning.reparam import fuse_model
    from space.builder import build_model
    from tests.pruning.test_channel import grouped_yaml

    evaluated = []
    monkeypatch.setattr(prune, "_map", lambda *a: evaluated.append(a) or (0.0, 0.0))
    model = fuse_model(build_model(grouped_yaml(nc=2)))
    with pytest.raises(PruneError, match="grouped convolutions are never pruned"):
        prune.prune_job(model, object(), "20%", imgsz=64, importance="l2", device="cpu", measure=False)
    assert evaluated == []


def test_search_with_prune_to_ranks_pruned_models(settings, tmp_path):
    from nas.pareto import pareto_table
    from nas.study import trial_records

    study = run_search(replace(settings, trials=2, prune_to=0.6, prune_finetune_epochs=1,
                               space=str(_wide_space(tmp_path)), baseline=str(tmp_path / "wide-base.yaml")))
    pruned = [t for t in study.trials if t.user_attrs.get("prune_fraction")]
    assert pruned and not study.trials[0].user_attrs.get("prune_fraction")  # the baseline stays as designed
    for t in pruned:
        a = t.user_attrs
        assert a["gflops_deploy"] == pytest.approx(0.6 * a["gflops_deploy_unpruned"], rel=0.02)
        assert {"pruned/channels.json", "pruned/weights.pt"} <= set(a["files"])
        assert a["prune"]["map50_95_finetuned"] == a["map50_95"] == t.values[0]
        model = load_pruned(tmp_path / "results/tiny/trials" / str(t.number) / "pruned")
        assert model(torch.rand(1, 3, 64, 64))[0].shape[-1] == 5 + 2
    table = pareto_table(trial_records(study, settings))
    assert sorted(table["pruned"].dropna().tolist()) == [0.6] * len(pruned)


def _wide_space(tmp_path):
    """The tiny space with widths 16|32, so that a 60% FLOPs target leaves channel multiples of 8 to cut."""
    import yaml

    from tests.nas.conftest import BASELINE, TINY_SPACE

    space = dict(TINY_SPACE, stages={n: {"depth": [1], "width": [16, 32], "se": False} for n in TINY_SPACE["stages"]})
    path = tmp_path / "wide.yaml"
    path.write_text(yaml.safe_dump(space))
    base = {k: (16 if k.endswith("_width") and k.startswith("P") else v) for k, v in BASELINE.items()}
    (tmp_path / "wide-base.yaml").write_text(yaml.safe_dump(base))
    return path
