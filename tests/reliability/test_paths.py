"""Paths derived from study names or from files' contents cannot escape the results folder.

Study names that are paths (or hold NUL) are refused by every command that takes one. A real tiny study is run
once; copies of it get trial user attrs whose recorded `files` point outside (`../../../etc/passwd`, absolute
paths), written through Optuna's storage API: `repnas prune STUDY:TRIAL` and `repnas export-model STUDY:TRIAL`
refuse them before reading any file, `repnas clean` deletes only weight files inside trial folders, and `repnas
export` writes only into the study folder. A pruned folder's channels.json names one path (info.data, the data it
was trained on): it is followed only to an existing data.yaml.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import TrialState

from nas.study import run_search
from pruning.portable import save_pruned
from pruning.reparam import fuse_model
from space.builder import build_model
from tests.conftest import tiny_yaml
from tests.reliability.badinput import record_rule, refusal, run_cli, tree
from tests.studyfixtures import make_tiny_assets, tiny_settings

NAME = "tiny"


def _storage(path: Path) -> JournalStorage:
    return JournalStorage(JournalFileBackend(str(path)))


@pytest.fixture(scope="module")
def study_root(tmp_path_factory) -> Path:
    """ROOT/res/tiny: a finished one-trial study (the baseline, trained one epoch on 16 images at 64 px)."""
    root = tmp_path_factory.mktemp("paths-study")
    settings = tiny_settings(make_tiny_assets(root), name=NAME, trials=1, max_failures=1, results=str(root / "res"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REPNAS_CACHE_DIR", str(root / "cache"))
        study = run_search(settings)
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE]
    return root


@pytest.fixture
def work(tmp_path, monkeypatch, study_root) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("REPNAS_CACHE_DIR", str(study_root / "cache"))
    return tmp_path


def tampered_copy(study_root: Path, work: Path, edit: Callable[[dict], dict]) -> Path:
    """work/res: the study's folder copied, its study.log rewritten with each trial's user attrs passed through
    `edit` (finished trials cannot be updated in place, so the trials are re-added to a fresh journal)."""
    res = work / "res"
    shutil.copytree(study_root / "res", res)
    (res / NAME / "study.log").unlink()
    old = optuna.load_study(study_name=NAME, storage=_storage(study_root / "res" / NAME / "study.log"))
    new = optuna.create_study(study_name=NAME, storage=_storage(res / NAME / "study.log"), directions=old.directions)
    for key, value in old.user_attrs.items():
        new.set_user_attr(key, value)
    for t in old.get_trials():
        new.add_trial(optuna.trial.create_trial(
            state=t.state, values=t.values, params=t.params, distributions=t.distributions,
            user_attrs=edit(dict(t.user_attrs)), system_attrs=t.system_attrs,
            intermediate_values=t.intermediate_values))
    return res


# ---------------------------------------------------------------------------------------------------------------
# study names

BAD_NAMES = ["../x", "a/b", "..", ".", "/etc", "a\\b", "a\x00b", "~root"]


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_a_study_name_that_is_a_path_is_refused_by_every_command(name, work, capsys, reliability_report):
    before = tree(work)
    for argv in (["search", "--study", name, "--results", "res"], ["resume", name, "--results", "res"],
                 ["show", name, "--results", "res"], ["clean", name, "--results", "res"],
                 ["export", name, "--results", "res"]):
        refusal(argv, capsys, [f"study name {name!r} is not allowed", "use letters, digits, '-', '_' and '.'"])
    assert tree(work) == before and not (work / "res").exists()
    record_rule("study name with path separators, '..' or NUL", reliability_report)


def test_a_study_trial_source_cannot_name_a_path(work, capsys):
    line = refusal(["export-model", "../../etc:0", "--onnx", "o.onnx", "--results", "res"], capsys,
                   ["../../etc:0: no such study trial, folder or model YAML"])
    assert "give STUDY:TRIAL" in line and not (work / "o.onnx").exists()


# ---------------------------------------------------------------------------------------------------------------
# recorded files pointing outside

def _files(attrs: dict, change: Callable[[dict], dict]) -> dict:
    if "files" in attrs:
        attrs["files"] = change(dict(attrs["files"]))
    return attrs


OUTSIDE = {  # how the recorded files are tampered: (edit of the files mapping, expected message part)
    "relative escape as the name": (lambda f: f | {"../../../etc/passwd": f["weights.pt"]},
                                    "recorded file '../../../etc/passwd' is not a name inside the trial folder"),
    "absolute name": (lambda f: f | {"/etc/passwd": f["weights.pt"]},
                      "recorded file '/etc/passwd' is not a name inside the trial folder"),
    "escape in the recorded path": (lambda f: f | {"weights.pt": dict(f["weights.pt"], path="../../../etc/passwd")},
                                    "recorded file 'weights.pt': {'path': '../../../etc/passwd'"),
    "absolute recorded path": (lambda f: f | {"fused.pt": dict(f["fused.pt"], path="/etc/passwd")},
                               "recorded file 'fused.pt': {'path': '/etc/passwd'"),
    "escape under pruned/": (lambda f: f | {"pruned/../../../x": f["weights.pt"]},
                             "recorded file 'pruned/../../../x' is not a name inside the trial folder"),
}


@pytest.mark.parametrize("case", list(OUTSIDE))
def test_recorded_files_pointing_outside_are_refused(case, study_root, work, capsys, reliability_report):
    change, part = OUTSIDE[case]
    res = tampered_copy(study_root, work, lambda attrs: _files(attrs, change))
    before = tree(work)
    for argv in (["prune", f"{NAME}:0", "--target-flops", "50%", "--importance", "l2", "--no-eval", "--imgsz", "64",
                  "--results", str(res)],
                 ["export-model", f"{NAME}:0", "--onnx", "o.onnx", "--imgsz", "64", "--results", str(res)]):
        refusal(argv, capsys, [f"{NAME}:0: ", part, "the study was edited or damaged, pick another trial"])
    assert tree(work) == before  # no prune folder, no ONNX file
    record_rule("trial files recorded outside the trial folder", reliability_report)


def test_the_untampered_copy_loads(study_root, work, capsys):
    """The control: the same copy without the tampering prunes, so the refusals above are the tampering's."""
    res = tampered_copy(study_root, work, lambda attrs: attrs)
    code, _, err = run_cli(["prune", f"{NAME}:0", "--target-flops", "50%", "--importance", "l2", "--no-eval",
                              "--imgsz", "64", "--results", str(res), "--out", "pruned", "--quiet"], capsys)
    assert code == 0, err
    assert (work / "pruned" / "channels.json").is_file()


def _outside_victims(work: Path) -> list[Path]:
    victims = [work / "weights.pt", work / "res" / "weights.pt", work / "res" / NAME / "weights.pt",
               work / "elsewhere" / "0" / "weights.pt"]
    for path in victims:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"not to be deleted")
    return victims


def test_clean_deletes_only_weights_inside_trial_folders(study_root, work, capsys):
    res = tampered_copy(study_root, work, lambda attrs: _files(attrs, lambda f: f | {
        "../../../weights.pt": f["weights.pt"], "weights.pt": dict(f["weights.pt"], path="../../elsewhere/0/w.pt")}))
    victims = _outside_victims(work)
    study = optuna.load_study(study_name=NAME, storage=_storage(res / NAME / "study.log"))
    extra = optuna.trial.create_trial(state=TrialState.PRUNED, user_attrs={"files": {
        "weights.pt": {"path": "../../../weights.pt", "sha256": "0" * 64}}})
    study.add_trial(extra)  # trial 1: off the front, so clean removes its weights, whatever its attrs say
    trial_1 = res / NAME / "trials" / "1"
    trial_1.mkdir()
    (trial_1 / "weights.pt").write_bytes(b"weights of an unwanted trial")
    before = tree(work)
    code, _, err = run_cli(["clean", NAME, "--results", str(res), "--keep-weights", "0"], capsys)
    assert code == 0, err
    after = tree(work)
    removed = sorted(set(before) - set(after))
    assert removed == ["res/tiny/trials/1/weights.pt"]
    assert all(path.read_bytes() == b"not to be deleted" for path in victims)
    assert {k: v for k, v in after.items()} == {k: v for k, v in before.items() if k not in removed}


def test_export_writes_only_into_the_study_folder_unless_out_is_given(study_root, work, capsys):
    res = tampered_copy(study_root, work, lambda attrs: _files(attrs, lambda f: f | {
        "model.yaml": dict(f["model.yaml"], path="../../../../../etc/passwd")}))
    before = tree(work)
    code, _, err = run_cli(["export", NAME, "--results", str(res)], capsys)
    assert code == 0, err
    changed = {k for k, v in tree(work).items() if before.get(k) != v}
    assert changed and all(k.startswith(f"res/{NAME}/pareto.") for k in changed), changed
    code, _, err = run_cli(["export", NAME, "--results", str(res), "--out", "chosen", "--format", "csv"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in (work / "chosen").iterdir()) == ["pareto.csv", "pareto.png"]


# ---------------------------------------------------------------------------------------------------------------
# a pruned folder's channels.json

@pytest.mark.parametrize("recorded", ["/etc/passwd", "../../../../etc/passwd", "/nonexistent/data.yaml"])
def test_a_data_path_in_channels_json_is_followed_only_to_a_data_yaml(recorded, work, capsys, reliability_report):
    model = fuse_model(build_model(tiny_yaml(2)))
    save_pruned(model, work / "pruned", info={"data": recorded})
    before = tree(work)
    refusal(["prune", "pruned", "--target-flops", "50%", "--importance", "l2", "--imgsz", "64"], capsys,
            [f"pruned: recorded data {recorded!r} is not an existing data.yaml", "give --data DATA.yaml"])
    assert tree(work) == before
    record_rule("data path recorded in a file is not a data.yaml", reliability_report)


def test_channels_json_names_no_other_path(work):
    """channels.json holds the model, its conv widths and `info`: the weights are read from its own folder only."""
    model = fuse_model(build_model(tiny_yaml(2)))
    save_pruned(model, work / "pruned", info={"data": None})
    document = yaml.safe_load((work / "pruned" / "channels.json").read_text())
    assert set(document) == {"format", "nc", "model", "convs", "info"}
    assert all(isinstance(v, dict) and set(v) == {"in", "out"} for v in document["convs"].values())
    (work / "pruned" / "weights.pt").rename(work / "weights.pt")
    torch.save({"x": torch.zeros(1)}, work / "elsewhere.pt")
    from pruning.portable import PrunedFileError, load_pruned

    with pytest.raises(PrunedFileError, match=r"pruned/weights.pt: no such file"):
        load_pruned(work / "pruned")


def test_clean_never_follows_a_symlinked_trial_folder_or_weights_file(study_root, work, capsys):
    res = tampered_copy(study_root, work, lambda attrs: attrs)
    victims = _outside_victims(work)
    study = optuna.load_study(study_name=NAME, storage=_storage(res / NAME / "study.log"))
    for _ in range(2):  # trials 1 and 2: off the front, so clean would remove their weights
        study.add_trial(optuna.trial.create_trial(state=TrialState.PRUNED))
    trials = res / NAME / "trials"
    (trials / "1").symlink_to(work / "elsewhere" / "0", target_is_directory=True)  # the folder leads outside
    (trials / "2").mkdir()
    (trials / "2" / "weights.pt").symlink_to(work / "weights.pt")  # the file leads outside
    code, _, err = run_cli(["clean", NAME, "--results", str(res), "--keep-weights", "0"], capsys)
    assert code == 0, err
    assert all(path.read_bytes() == b"not to be deleted" for path in victims)
    assert (trials / "2" / "weights.pt").is_symlink()
