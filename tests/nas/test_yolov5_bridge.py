"""The repnas side of the YOLOv5 bridge (nas/yolov5.py): the script is standalone, a bundle is written from every kind
of source with both forms and a check output, and pruned models convert exactly when YOLOv5's rows can express them.
The YOLOv5 side (the script run against the real YOLOv5 code) is tests/yolov5/."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys

import pytest
import torch
import yaml

from nas.files import state_dict_bytes
from nas.source import SourceError, read_state
from nas.yolov5 import (
    BUNDLE_FORMAT,
    BridgeError,
    PlanNotExpressible,
    _expansion,
    bridge_script,
    export_bundle,
    express_pruned,
)
from pruning.channel import dependency_graph, sync_channel_attributes
from pruning.portable import load_pruned, save_pruned
from pruning.reparam import fuse_model
from space.builder import MODULES, build_model
from tests.conftest import randomize_batchnorm, tiny_yaml


def _bridge_module():
    """The bridge script as a module (it imports torch and yaml only; YOLOv5 is imported when a command runs)."""
    import importlib.util
    import pathlib

    import nas

    path = pathlib.Path(nas.__file__).parent / "yolov5_bridge.py"
    spec = importlib.util.spec_from_file_location("yolov5_bridge_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _saved_model(tmp_path, cfg=None, *, fused=False):
    """(train-time model with random BatchNorm stats, its YAML path, its weights path)."""
    cfg = cfg or tiny_yaml(2)
    model = randomize_batchnorm(build_model(cfg)).eval()
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(cfg))
    weights = tmp_path / ("fused.pt" if fused else "weights.pt")
    weights.write_bytes(state_dict_bytes(fuse_model(model) if fused else model))
    return model, tmp_path / "model.yaml", weights


def test_the_script_imports_neither_repnas_nor_its_heavy_dependencies():
    tree = ast.parse(bridge_script())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module and node.level == 0}
    assert not imported & {"nas", "space", "pruning", "torch_pruning", "optuna", "thop", "tests"}
    assert imported <= {"__future__", "argparse", "copy", "datetime", "importlib", "inspect", "json", "logging",
                        "math", "os", "pickle", "sys", "pathlib", "torch", "yaml", "numpy"}  # numpy: YOLOv5's own


def test_nothing_in_the_package_imports_the_script():
    """The script runs in the user's YOLOv5 environment (it imports YOLOv5's modules to build checkpoints); repnas
    only prints its text."""
    import pathlib

    import nas

    root = pathlib.Path(nas.__file__).resolve().parents[1]
    files = [p for pkg in ("nas", "space", "pruning") for p in (root / pkg).rglob("*.py")]
    imports = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                imports += [(path, alias.name) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                imports += [(path, f"{node.module}.{alias.name}") for alias in node.names]
    assert len(files) > 15 and len(imports) > 100
    assert [(path.name, name) for path, name in imports if "yolov5_bridge" in name] == []


def test_the_script_agrees_with_repnas_on_the_bundle_format_and_the_module_registry():
    bridge = _bridge_module()
    assert bridge.BUNDLE_FORMAT == BUNDLE_FORMAT
    assert set(bridge.REPNAS_MODULES) == set(MODULES)  # from-yolov5 refuses exactly what repnas cannot build
    assert bridge.REPVGG_DEFAULTS[1:] == (3, 1, 1, 1, 1, "zeros", False, False)  # the design document's signature


def test_the_scripts_deploy_rows_and_their_inverse():
    bridge = _bridge_module()
    cfg = tiny_yaml(2)
    deploy = bridge.deploy_cfg(cfg)
    rows = deploy["backbone"]
    assert rows[0][3] == [16, 3, 2, 1, 1, 1, "zeros", True]
    assert rows[4][3] == [64, 3, 2, 1, 1, 1, "zeros", True, True]  # SE stays on
    assert bridge.train_cfg(deploy) == cfg
    blocks = [{k for k in model.state_dict() if ".rbr" in k} for model in (build_model(deploy),
                                                                            fuse_model(build_model(cfg)))]
    assert blocks[0] == blocks[1] and all(".rbr_reparam." in k for k in blocks[0])


def test_bundle_of_a_yaml_with_train_time_weights_holds_both_forms_and_a_check(tmp_path):
    model, model_yaml, weights = _saved_model(tmp_path)
    bundle = export_bundle(str(model_yaml), tmp_path / "b", weights=str(weights))
    meta = json.loads((tmp_path / "b" / "bridge.json").read_text())
    assert meta["format"] == BUNDLE_FORMAT and meta["nc"] == 2 and meta["names"] == ["0", "1"]
    assert bundle.forms == meta["forms"] == {"train": "weights.pt", "deploy": "fused.pt"} and not meta["pruned"]
    assert any("--data" in note for note in bundle.notes)  # default names, and how to get real ones
    train, fused = read_state(tmp_path / "b" / "weights.pt"), read_state(tmp_path / "b" / "fused.pt")
    assert all(torch.equal(train[k], v) for k, v in model.state_dict().items()) and train.keys() == \
        model.state_dict().keys()
    assert fused.keys() == fuse_model(model).state_dict().keys()
    written = yaml.safe_load((tmp_path / "b" / "model.yaml").read_text())
    assert written["backbone"] == tiny_yaml(2)["backbone"] and written["head"] == tiny_yaml(2)["head"]
    check = torch.load(tmp_path / "b" / "check.pt", weights_only=True)
    with torch.no_grad():
        assert torch.allclose(model(check["images"])[0], check["output"], rtol=1e-4, atol=1e-4)
    assert (tmp_path / "b" / "bridge.py").read_text() == bridge_script()


def test_bundle_of_fused_weights_holds_the_deploy_form_only(tmp_path):
    _, model_yaml, weights = _saved_model(tmp_path, fused=True)
    bundle = export_bundle(str(model_yaml), tmp_path / "b", weights=str(weights))
    assert bundle.forms == {"train": None, "deploy": "fused.pt"} and not (tmp_path / "b" / "weights.pt").exists()


def test_bundle_of_a_train_folder_takes_the_names_of_the_data_it_was_trained_on(tmp_path, assets):
    from nas.data import load_data_config

    folder = tmp_path / "run"
    folder.mkdir()
    _saved_model(folder)
    (folder / "metrics.json").write_text(json.dumps({"data": str(assets["data"]), "proxy": {"imgsz": 64}}))
    bundle = export_bundle(str(folder), tmp_path / "b")
    assert bundle.names == list(load_data_config(assets["data"]).names) and not bundle.notes
    assert bundle.forms["train"] == "weights.pt"
    assert json.loads((tmp_path / "b" / "bridge.json").read_text())["train_imgsz"] == 64


def test_bundle_refuses_names_of_a_dataset_with_another_class_count(tmp_path, assets):
    _, model_yaml, weights = _saved_model(tmp_path, tiny_yaml(5))
    with pytest.raises(BridgeError, match=r"the weights have nc=5, --data .* has 2 classes; give --data"):
        export_bundle(str(model_yaml), tmp_path / "b", weights=str(weights), data=str(assets["data"]))


def test_bundle_refuses_a_folder_whose_train_time_and_fused_weights_are_of_different_runs(tmp_path):
    folder = tmp_path / "trial"
    folder.mkdir()
    _saved_model(folder, fused=True)
    other = randomize_batchnorm(build_model(tiny_yaml(2)), seed=1)
    (folder / "weights.pt").write_bytes(state_dict_bytes(other))
    with pytest.raises(BridgeError, match=r"weights\.pt: fused, these train-time weights differ .* different runs"):
        export_bundle(str(folder), tmp_path / "b")


def test_bundle_refuses_what_the_source_loader_refuses(tmp_path):
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(tiny_yaml(2)))
    with pytest.raises(SourceError, match=r"needs --weights"):
        export_bundle(str(tmp_path / "model.yaml"), tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_bundle_of_a_study_trial_uses_its_checked_files(tmp_path, assets):
    from nas.data import load_data_config
    from nas.study import run_search
    from tests.studyfixtures import tiny_settings

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REPNAS_CACHE_DIR", str(tmp_path / "cache"))
        run_search(tiny_settings(assets, trials=1, results=str(tmp_path / "res")))
    bundle = export_bundle("tiny:0", tmp_path / "b", results=str(tmp_path / "res"))
    assert bundle.description.startswith("tiny:0 (") and bundle.forms["train"] == "weights.pt"
    assert bundle.names == list(load_data_config(assets["data"]).names)
    folder = tmp_path / "res" / "tiny" / "trials" / "0"
    assert torch.equal(read_state(tmp_path / "b" / "fused.pt")["model.0.rbr_reparam.weight"],
                       read_state(folder / "fused.pt")["model.0.rbr_reparam.weight"])


# ---------------------------------------------------------------------------------------------------------------
# Pruned models


def prune_first_channels(model: torch.nn.Module, keep: dict[str, int]) -> torch.nn.Module:
    """A copy of the fused `model` whose convs named in `keep` keep that many output channels (the first ones), every
    coupled conv resized by torch-pruning's dependency graph: a pruning plan chosen by hand."""
    import copy

    import torch_pruning as tp

    model = copy.deepcopy(model).eval()
    dg = dependency_graph(model, torch.rand(1, 3, 64, 64))
    for name, channels in keep.items():
        conv = model.get_submodule(name)
        dg.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=list(range(channels, conv.out_channels))).prune()
    sync_channel_attributes(model)
    return model


def _prune(cfg: dict, keep: dict[str, int], folder):
    """A pruned-model folder of `cfg` (random BatchNorm, fused) pruned by `prune_first_channels`, loaded back."""
    save_pruned(prune_first_channels(fuse_model(randomize_batchnorm(build_model(cfg))), keep), folder)
    return load_pruned(folder)


def test_an_expressible_plan_becomes_explicit_yolov5_rows_with_the_same_parameters(tmp_path):
    keep = {"model.0.rbr_reparam": 8, "model.8.conv": 24,  # a RepVGG block and a Conv
            "model.11.cv1.conv": 8, "model.11.cv2.conv": 8, "model.11.m.0.cv1.conv": 8,  # C3: one hidden width
            "model.11.m.0.cv2.conv": 8}
    pruned = _prune(tiny_yaml(2), keep, tmp_path / "pruned")
    cfg = express_pruned(pruned, "pruned", "pruned")
    rows = cfg["backbone"] + cfg["head"]
    assert cfg["width_multiple"] == cfg["depth_multiple"] == 1.0
    assert rows[0][3] == [8, 3, 2] and rows[8][3] == [24, 1, 1] and rows[11][3] == [32, False, 1, 0.25]
    rebuilt = build_model(cfg, deploy=True)
    rebuilt.load_state_dict(pruned.state_dict())  # strict: the same tensors under the same names
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x)[0], pruned(x)[0])
    bundle = export_bundle(str(tmp_path / "pruned"), tmp_path / "b")
    assert bundle.pruned and bundle.forms == {"train": None, "deploy": "fused.pt"}
    assert yaml.safe_load((tmp_path / "b" / "model.yaml").read_text())["backbone"][0][3] == [8, 3, 2]


def test_explicit_rows_carry_the_multiples_and_repeats_of_the_yaml():
    cfg = tiny_yaml(2) | {"width_multiple": 0.5}
    cfg["backbone"][7] = [-1, 2, "Conv", [64, 3, 1]]  # a repeated Conv row where the SPPF was
    model = fuse_model(randomize_batchnorm(build_model(cfg))).eval()
    explicit = express_pruned(model, "model", "model")
    assert explicit["width_multiple"] == 1.0 and explicit["backbone"][7] == [-1, 2, "Conv", [32, 3, 1]]
    assert explicit["backbone"][4][3] == [32, 3, 2, 1, 1, 1, "zeros", False, True]
    build_model(explicit, deploy=True).load_state_dict(model.state_dict())  # strict: the same network


@pytest.mark.parametrize(("keep", "layer", "reason"), [
    ({"model.4.rbr_reparam": 48}, "layer 4 (RepVGGBlock)", r"SE keeps 4 squeeze neurons, but the block derives "
                                                           r"48 // 16 = 3"),
    ({"model.3.0.rbr_reparam": 24}, "layer 3 (RepVGGBlock)", r"its 2 repeated blocks have widths \[24, 32\]"),
    ({"model.11.cv1.conv": 8}, "layer 11 (C3)", r"hidden widths \[8, 16, 16, 16\] differ"),
    ({"model.8.conv": 28}, "layer 8 (Conv)", r"28 output channels are not a multiple of 8"),
], ids=["SE squeeze", "repeated row", "C3 hidden", "multiple of 8"])
def test_an_inexpressible_plan_is_refused_naming_the_first_layer_and_onnx(keep, layer, reason, tmp_path):
    _prune(tiny_yaml(2), keep, tmp_path / "pruned")
    with pytest.raises(PlanNotExpressible) as err:
        export_bundle(str(tmp_path / "pruned"), tmp_path / "b")
    message = str(err.value)
    assert "\n" not in message and f"pruned model {tmp_path / 'pruned'}: {layer}: " in message
    assert re.search(reason, message)
    assert message.endswith(f"`repnas export-model {tmp_path / 'pruned'} --onnx OUT.onnx`")
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("out", [8, 24, 40, 96, 256, 1000])
def test_expansion_gives_the_hidden_width_through_yolov5s_int_and_a_yaml_round_trip(out):
    for hidden in range(1, out + 1, max(1, out // 13)):
        e = yaml.safe_load(yaml.safe_dump(_expansion(out, hidden)))
        assert int(out * e) == hidden


def test_the_script_runs_on_its_own_file(tmp_path):
    path = tmp_path / "bridge.py"
    path.write_text(bridge_script())
    out = subprocess.run([sys.executable, "-I", str(path), "--help"], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path)
    assert out.returncode == 0 and "to-yolov5" in out.stdout and "from-yolov5" in out.stdout


class _ReadAttr:
    """Pickles as builtins.getattr(obj, name): what a crafted checkpoint would hold to read any attribute."""

    def __init__(self, obj, name):
        self.obj, self.name = obj, name

    def __reduce__(self):
        return getattr, (self.obj, self.name)


def test_a_checkpoint_may_read_a_fused_convs_forward_fuse_and_no_other_attribute(tmp_path, monkeypatch):
    """The weights-only read allows getattr only as YOLOv5's fuse() leaves it (forward = forward_fuse of a module of
    models/common.py): a file that reads any other attribute (a method's __globals__, a class's __init__) is refused
    unread, as real getattr would hand it the interpreter's internals."""
    import types

    bridge = _bridge_module()
    common = types.ModuleType("fake_yolov5_common")

    class Conv(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 1)

        def forward_fuse(self, x):
            return self.conv(x)

    Conv.__module__, Conv.__qualname__ = common.__name__, "Conv"
    common.Conv = Conv
    monkeypatch.setitem(sys.modules, common.__name__, common)
    fused = Conv()
    fused.forward = fused.forward_fuse  # as models/yolo.py BaseModel.fuse()
    torch.save({"model": fused}, tmp_path / "fused.pt")
    loaded = bridge._load_checkpoint(str(tmp_path / "fused.pt"), common, common)["model"]
    assert loaded.forward.__func__ is Conv.forward_fuse and loaded.forward.__self__ is loaded
    x = torch.randn(1, 3, 4, 4)
    assert torch.equal(loaded(x), loaded.conv(x))
    for name, crafted in {"function": _ReadAttr(_ReadAttr(fused, "forward_fuse"), "__func__"),  # then __globals__
                          "init": _ReadAttr(fused, "__init__"),
                          "class": _ReadAttr(Conv, "forward_fuse"),  # a class's, not a module instance's
                          "default": _ReadAttr(torch.nn.ReLU(), "forward_fuse")}.items():  # no such method
        torch.save({"model": fused, "x": crafted}, tmp_path / f"{name}.pt")
        with pytest.raises(bridge.BridgeError, match=r"refused unread .*getattr"):
            bridge._load_checkpoint(str(tmp_path / f"{name}.pt"), common, common)
