import json
from pathlib import Path

import pytest
import torch

from pruning.channel import PruneError, channel_plan, prune_to_flops
from pruning.finetune import insert_batchnorms
from pruning.portable import FORMAT, PrunedFileError, load_pruned, read_plan, save_pruned
from pruning.reparam import fuse_model
from space.builder import build_model
from space.errors import RepnasError
from tests.conftest import SEED_YAML, tiny_yaml


@pytest.fixture(scope="module")
def pruned():
    torch.manual_seed(0)
    return prune_to_flops(fuse_model(build_model(tiny_yaml(nc=3))), 0.5, 64)


def _outputs(model, x):
    with torch.no_grad():
        pred, maps = model.eval()(x)
        raw = model.train()(x)
    model.eval()
    return [pred, *maps, *raw]


def _assert_identical(a, b):
    for shape in ((2, 3, 64, 64), (1, 3, 96, 64)):
        x = torch.rand(*shape)
        assert all(torch.equal(u, v) for u, v in zip(_outputs(a, x), _outputs(b, x)))


def test_save_then_load_reproduces_the_outputs_exactly(pruned, tmp_path):
    folder = save_pruned(pruned.model, tmp_path / "pruned", pruned.plan,
                         info={"target_gflops": pruned.target_gflops, "gflops": pruned.gflops_after})
    assert sorted(p.name for p in folder.iterdir()) == ["channels.json", "weights.pt"]  # no temporary files left
    loaded = load_pruned(folder)
    assert not loaded.training
    assert channel_plan(loaded) == pruned.plan
    state, original = loaded.state_dict(), pruned.model.state_dict()
    assert list(state) == list(original) and all(torch.equal(state[k], original[k]) for k in state)
    _assert_identical(pruned.model, loaded)
    assert loaded.model[4].out_channels == loaded.model[4].rbr_reparam.out_channels < 64  # block records follow
    document = read_plan(folder)
    assert document["format"] == FORMAT and document["nc"] == 3 and document["info"]["gflops"] == pruned.gflops_after
    assert document["model"]["backbone"] == tiny_yaml()["backbone"]


def test_the_pruned_seed_model_round_trips(tmp_path):
    if not SEED_YAML.exists():
        pytest.skip(f"{SEED_YAML} is absent")
    torch.manual_seed(1)
    result = prune_to_flops(fuse_model(build_model(SEED_YAML, nc=80)), 0.5, 320)
    loaded = load_pruned(save_pruned(result.model, tmp_path))
    _assert_identical(result.model, loaded)


def test_save_refuses_what_it_cannot_rebuild(pruned, tmp_path):
    with pytest.raises(PruneError, match=r"fold inserted BatchNorms first"):
        save_pruned(insert_batchnorms(pruned.model, [torch.rand(2, 3, 64, 64)]), tmp_path)
    plan = json.loads(json.dumps(pruned.plan))
    plan["model.0.rbr_reparam"]["out"] += 8
    with pytest.raises(PruneError, match=r"plan does not match the model at 'model.0.rbr_reparam'"):
        save_pruned(pruned.model, tmp_path, plan)
    with pytest.raises(PruneError, match=r"not JSON-serialisable"):
        save_pruned(pruned.model, tmp_path, info={"tensor": torch.zeros(1)})
    assert not list(tmp_path.iterdir())


class _Payload:
    """Unpickling this calls Path.touch(marker): proof that a pickle ran code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_a_pickled_payload_is_refused_and_never_runs(pruned, tmp_path):
    folder = save_pruned(pruned.model, tmp_path / "pruned")
    marker = tmp_path / "payload-ran"
    state = dict(pruned.model.state_dict())
    state["model.0.rbr_reparam.weight"] = _Payload(marker)
    torch.save(state, folder / "weights.pt")
    torch.load(folder / "weights.pt", weights_only=False)  # the payload is live: a plain unpickle runs it
    assert marker.exists()
    marker.unlink()
    with pytest.raises(PrunedFileError, match=r"weights.pt: not a weights-only state_dict, refused without running"):
        load_pruned(folder)
    assert not marker.exists()


def _edit(folder: Path, change) -> None:
    path = folder / "channels.json"
    document = json.loads(path.read_text())
    change(document)
    path.write_text(json.dumps(document))


def _set(path: tuple, value):
    def change(document):
        target = document
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return change


@pytest.mark.parametrize(("change", "message"), [
    (_set(("format",), "repnas-pruned/9"), r"field 'format': 'repnas-pruned/9' is not 'repnas-pruned/1'"),
    (_set(("nc",), 4), r"field 'nc': 4 must be a positive integer equal to model.nc \(3\)"),
    (_set(("model",), "yolo.yaml"), r"field 'model': expected the model YAML as an object"),
    (_set(("model", "backbone"), []), r"field 'model' does not build: .*backbone"),
    (_set(("convs",), []), r"field 'convs': expected an object"),
    (_set(("convs", "model.0.rbr_reparam", "out"), -8), r"convs\['model.0.rbr_reparam'\]: field 'out': -8 must be"),
    (_set(("convs", "model.0.rbr_reparam", "in"), "3"), r"field 'in': '3' must be a positive integer"),
    (_set(("convs", "model.0.rbr_reparam", "out"), True), r"field 'out': True must be a positive integer"),
    (_set(("convs", "model.0.rbr_reparam"), {"in": 3}), r"expected \{\"in\": channels, \"out\": channels\}"),
    (_set(("convs", "model.99.conv"), {"in": 8, "out": 8}), r"convs\['model.99.conv'\]: the model has no conv"),
    (_set(("convs", "model.0"), {"in": 3, "out": 8}), r"convs\['model.0'\]: the model has no conv of that name "
                                                       r"\(RepVGGBlock\)"),
    (_set(("convs", "model.0.rbr_reparam", "out"), 4096), r"exceed the built 3 -> 16; pruning only removes"),
    (_set(("convs", "model.22.m.0", "out"), 16), r"Detect's output conv has 24 outputs .* never pruned"),
    (_set(("convs", "model.2.rbr_reparam", "out"), 32), r"weights.pt: the weights do not fit channels.json"),
    (_set(("extra",), 1), r"unknown field 'extra'"),
    (_set(("info",), []), r"field 'info': expected an object"),
])
def test_bad_plans_are_clear_errors(pruned, tmp_path, change, message):
    folder = save_pruned(pruned.model, tmp_path)
    _edit(folder, change)
    with pytest.raises(PrunedFileError, match=message) as info:
        load_pruned(folder)
    assert isinstance(info.value, RepnasError)
    assert "channels.json" in str(info.value) or "weights.pt" in str(info.value)  # the error names its file


def test_missing_or_broken_files_are_clear_errors(pruned, tmp_path):
    with pytest.raises(PrunedFileError, match=r"channels.json: no such file; a pruned-model folder holds"):
        load_pruned(tmp_path)
    folder = save_pruned(pruned.model, tmp_path / "a")
    (folder / "channels.json").write_text("{not json")
    with pytest.raises(PrunedFileError, match=r"channels.json: not valid JSON"):
        load_pruned(folder)
    folder = save_pruned(pruned.model, tmp_path / "b")
    (folder / "weights.pt").unlink()
    with pytest.raises(PrunedFileError, match=r"weights.pt: no such file"):
        load_pruned(folder)
    folder = save_pruned(pruned.model, tmp_path / "c")
    torch.save([torch.zeros(1)], folder / "weights.pt")
    with pytest.raises(PrunedFileError, match=r"expected a state_dict \(name -> tensor\), got list"):
        load_pruned(folder)
