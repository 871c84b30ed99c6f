"""Where a trained model comes from (nas/source.py): a model YAML with weights, a trial folder, STUDY:TRIAL of a tiny
study (run once for the module), what is refused, pickles never run, and recorded data paths."""

from __future__ import annotations

import pathlib
import re
import shutil
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from optuna.trial import TrialState

from nas.files import state_dict_bytes
from nas.source import SourceError, load_source, read_state, recorded_data
from nas.study import StudyError, load_study, run_search
from pruning.reparam import fuse_model
from space.builder import build_model
from space.cost import is_deploy
from tests.conftest import randomize_batchnorm, rel_err, tiny_yaml
from tests.studyfixtures import tiny_settings


@pytest.fixture(scope="module")
def study_root(assets, tmp_path_factory) -> Path:
    """ROOT/res/tiny: a finished one-trial study of the tiny space (trial 0, the baseline)."""
    root = tmp_path_factory.mktemp("source-study")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REPNAS_CACHE_DIR", str(root / "cache"))
        run_search(tiny_settings(assets, trials=1, results=str(root / "res")))
    return root


def _saved(tmp_path: Path, fused: bool) -> tuple[torch.nn.Module, Path, Path]:
    model = randomize_batchnorm(build_model(tiny_yaml(2))).eval()
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(tiny_yaml(2)))
    weights = tmp_path / ("fused.pt" if fused else "weights.pt")
    weights.write_bytes(state_dict_bytes(fuse_model(model) if fused else model))
    return model, tmp_path / "model.yaml", weights


@pytest.mark.parametrize("fused", [False, True], ids=["train-time weights", "fused weights"])
def test_a_model_yaml_with_weights_loads_as_the_fused_network_on_the_cpu(fused, tmp_path):
    model, model_yaml, weights = _saved(tmp_path, fused)
    source = load_source(str(model_yaml), str(weights))
    assert is_deploy(source.model) and not source.model.training and source.nc == 2
    assert next(source.model.parameters()).device.type == "cpu"
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel_err(model(x)[0], source.model(x)[0]) < 1e-5
    assert source.description == f"{model_yaml} with {weights}"


def test_a_model_yaml_without_weights_or_with_weights_of_another_model_is_refused(tmp_path):
    _, model_yaml, weights = _saved(tmp_path, fused=False)
    with pytest.raises(SourceError, match=r"model.yaml: a model YAML needs --weights W.pt"):
        load_source(str(model_yaml))
    other = tiny_yaml(2)
    other["backbone"][0][3][0] = 24  # another width: the weights do not fit
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(other))
    with pytest.raises(SourceError) as refused:
        load_source(str(tmp_path / "other.yaml"), str(weights))
    message = str(refused.value)  # whole: what differs, with both shapes; never cut at "torch.Siz"
    assert re.fullmatch(r"--weights .*weights.pt do not fit .*other.yaml: \d+ of \d+ tensors differ in shape \(first "
                        r"model.0.rbr_dense.conv.weight: \[16, 3, 3, 3\] in the weights, \[24, 3, 3, 3\] in the "
                        r"model\); give the YAML these weights were trained from", message), message


def test_the_weights_say_the_class_count_not_the_yaml(tmp_path):
    _, _, weights = _saved(tmp_path, fused=True)  # trained for 2 classes
    (tmp_path / "five.yaml").write_text(yaml.safe_dump(tiny_yaml(5)))  # a YAML's nc is a default (train replaces it)
    source = load_source(str(tmp_path / "five.yaml"), str(weights))
    assert source.nc == 2 and source.model.detect.nc == 2


def test_a_trial_folder_loads_with_what_its_metrics_record(study_root, assets):
    folder = study_root / "res" / "tiny" / "trials" / "0"
    source = load_source(str(folder))
    assert source.description == f"trial folder {folder} (fused.pt)" and source.folder == folder
    assert is_deploy(source.model) and source.nc == 2
    assert source.train_imgsz == 64 and Path(source.data).resolve() == Path(assets["data"]).resolve()
    assert source.cost_imgsz == 64  # the size its GFLOPs and latency were recorded at
    beside = load_source(str(folder / "model.yaml"), str(folder / "fused.pt"))  # a YAML with its run's weights
    assert (beside.data, beside.train_imgsz, beside.cost_imgsz) == (source.data, 64, 64)
    with pytest.raises(SourceError, match=r"carries its own weights; drop --weights"):
        load_source(str(folder), str(folder / "weights.pt"))


def test_study_trial_loads_the_trials_files_checked_against_their_sha256(study_root, assets):
    results = str(study_root / "res")
    source = load_source("tiny:0", results=results)
    trial = load_study("tiny", results=results).trials[0]
    assert source.description.startswith("tiny:0 (trial folder ")
    assert Path(source.data).resolve() == Path(assets["data"]).resolve() and is_deploy(source.model)
    assert source.info["trial_attrs"]["map50_95"] == trial.user_attrs["map50_95"]
    assert source.info["trial_attrs"]["latency_ms"] == trial.values[1]
    assert source.train_imgsz == 64 and source.cost_imgsz == trial.user_attrs["gflops_imgsz"] == 64


def test_study_trial_sources_that_are_refused(study_root, tmp_path):
    results = tmp_path / "res"
    shutil.copytree(study_root / "res", results)  # a copy to damage
    with pytest.raises(SourceError, match=r"tiny:3: study 'tiny' has trials 0..0"):
        load_source("tiny:3", results=str(results))
    with pytest.raises(SourceError, match=r"tiny:0 is a study's trial: it carries its own weights; drop --weights"):
        load_source("tiny:0", "w.pt", results=str(results))
    study = load_study("tiny", results=str(results))
    study.add_trial(optuna.trial.create_trial(state=TrialState.FAIL))
    with pytest.raises(SourceError, match=r"tiny:1: trial 1 is FAIL, not COMPLETE; pick a finished trial"):
        load_source("tiny:1", results=str(results))
    fused = results / "tiny" / "trials" / "0" / "fused.pt"
    data = fused.read_bytes()
    fused.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one bit changed
    with pytest.raises(SourceError, match=r"fused.pt: sha256 [0-9a-f]{12}\.\.\. differs from the [0-9a-f]{12}\.\.\. "
                                          r"recorded by the study; the file was changed or damaged"):
        load_source("tiny:0", results=str(results))
    with pytest.raises(StudyError, match=r"no study 'nope'"):
        load_source("nope:0", results=str(tmp_path / "elsewhere"))


def test_folders_and_paths_that_are_no_source_are_refused(tmp_path):
    with pytest.raises(SourceError, match=r"neither a trial folder \(model.yaml \+ fused.pt\) nor a pruned model"):
        load_source(str(tmp_path))
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(tiny_yaml(2)))
    with pytest.raises(SourceError, match=r"no fused.pt or weights.pt"):
        load_source(str(tmp_path))
    with pytest.raises(SourceError, match=r"missing.txt: no such study trial, folder or model YAML"):
        load_source(str(tmp_path / "missing.txt"))


class _Runs:
    """Unpickling this creates a file: proof that a pickle's code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def test_read_state_refuses_a_pickle_without_running_it(tmp_path):
    marker = tmp_path / "PWNED"
    torch.save({"weight": _Runs(marker)}, tmp_path / "evil.pt")
    with pytest.raises(SourceError, match=r"evil.pt: not a weights-only state_dict .*save model.state_dict\(\)"):
        read_state(tmp_path / "evil.pt")
    assert not marker.exists()
    torch.save({"epoch": 3}, tmp_path / "not-tensors.pt")
    with pytest.raises(SourceError, match=r"not-tensors.pt: expected a state_dict \(name -> tensor\)"):
        read_state(tmp_path / "not-tensors.pt")
    with pytest.raises(SourceError, match=r"--weights .*absent.pt: no such file"):
        read_state(tmp_path / "absent.pt")
    assert set(read_state(_saved(tmp_path, fused=True)[2])) == set(fuse_model(build_model(tiny_yaml(2))).state_dict())


def test_recorded_data_is_followed_only_to_an_existing_data_yaml(assets, tmp_path):
    assert recorded_data(None, "x") is None
    assert recorded_data(str(assets["data"]), "x") == str(assets["data"])
    (tmp_path / "notes.txt").write_text("not a data.yaml")
    for value in ("/etc/passwd", str(tmp_path / "notes.txt"), str(tmp_path / "absent.yaml"), "a\0b.yaml", "", 3):
        with pytest.raises(SourceError, match=r"channels.json: recorded data .* is not an existing data.yaml; "
                                              r"give --data DATA.yaml"):
            recorded_data(value, "channels.json")
