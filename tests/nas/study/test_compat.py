"""Studies written by repnas 0.1.0 (commit fde5c52, before nas/study/ became a package) keep loading: each of the
committed studies (a demo study, a --data study, a --prune-to study; see data/make_old_studies.py) shows, exports
and resumes with every stored value intact; old keys are read and the resume writes the new format."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

from nas.cli import main
from nas.study import StudySettings, counts, export_study, load_study, run_search, show_study, stored_settings
from nas.study.settings import SETTINGS_FORMAT
from tests.nas.study.data.old_assets import make_assets

OLD = Path(__file__).parent / "data" / "old_studies"
ROOT = "/tmp/repnas-old-studies-root"  # where make_old_studies.py put every path a study stores
STUDIES = {"demo": 2, "data": 3, "prune": 2}  # name -> trials it holds


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("old-root")
    make_assets(root)  # the same deterministic data, space and baseline the studies were made with
    return root


def _relocate(name: str, assets: Path, tmp_path: Path) -> Path:
    """A copy of the committed study whose stored paths point at `assets` (as a user would move a study); the
    demo's data (the 800-image demo set in the cache) is pointed at the tiny set of the same kind (2 classes)."""
    results = tmp_path / "results"
    shutil.copytree(OLD / name, results / name)
    log = results / name / "study.log"
    text = log.read_text()
    text = text.replace(f"{ROOT}/cache/datasets/shapes-n800-k2-s64-seed0-o0.2-0.6-m3-plain-v1/data.yaml",
                        f"{ROOT}/data/data.yaml")
    log.write_text(text.replace(ROOT, str(assets)))
    return results


def _old_settings(results: Path, name: str) -> dict:
    """The settings as the (relocated) journal stores them."""
    for line in (results / name / "study.log").read_text().splitlines():
        entry = json.loads(line)
        if "settings" in entry.get("user_attr", {}) and "study_id" in entry:
            return json.loads(entry["user_attr"]["settings"])
    raise AssertionError(f"{name}: no stored settings")


def _snapshot(study: optuna.Study) -> list[tuple]:
    return [(t.number, t.state.name, t.values, t.user_attrs.get("files"), t.user_attrs.get("latency_ms"),
             t.user_attrs.get("arch")) for t in study.trials]


@pytest.mark.parametrize("name", sorted(STUDIES))
def test_an_old_study_shows_and_exports_with_its_values(name, assets, tmp_path, capsys):
    results = _relocate(name, assets, tmp_path)
    old = _old_settings(results, name)
    assert "imgsz" in old and "latency_imgsz" not in old and "momentum" not in old["proxy"]  # format 1: deltas
    study = load_study(name, results=str(results))
    settings = stored_settings(study, name, results=str(results))
    assert settings.latency_imgsz == old["imgsz"] and settings.latency_batch == old["batch"]
    assert settings.trials == old["trials"] and settings.seed == old["seed"] and settings.space == old["space"]
    assert settings.prune_to == old.get("prune_to")
    for key, value in old["proxy"].items():  # the deltas it stored, now resolved with 0.1.0's defaults
        assert settings.proxy[key] == (settings.proxy[key] | value if isinstance(value, dict) else value)
    assert settings.proxy["lr0"] == (0.004 if name == "demo" else 0.002) and settings.proxy["epochs"] == 1
    assert settings.latency["device_type"] == "cpu" and settings.latency["threads"] is None
    assert settings.latency["iters"] == (10 if name == "demo" else 30)

    screen = show_study(name, results=str(results))
    size = old["imgsz"]
    assert f"  latency: {size}x{size} px, batch {old['batch']}, " in screen
    assert f"{STUDIES[name]} of {old['trials']} counted" in screen and "on CPU, each process's own threads" in screen
    assert "baseline latency (frozen at creation)" in screen and "Pareto front:" in screen
    assert main(["show", name, "--results", str(results)]) == 0

    paths = export_study(name, tmp_path / "out", "csv,json", results=str(results))
    new, before = pd.read_csv(paths["csv"]), pd.read_csv(OLD / name / "pareto.csv")
    before = before.rename(columns={"rank": "front_rank"})  # renamed in repnas.pareto/2
    before["device"] = before["device"].str.replace(", 1 threads", ", 1 thread")  # the label's plural, fixed
    added = [c for c in new.columns if c not in before.columns]  # columns of later versions
    assert added == ["latency_measured_ms", "arch", "confirmed_map50_95", "confirmed_std", "confirmed_runs",
                     "confirmed_pareto", "study_pareto", "head_width", "head_depth"]
    assert (new["confirmed_runs"] == 0).all()
    assert new[["confirmed_map50_95", "confirmed_std", "confirmed_pareto", "study_pareto"]].isna().all().all()
    trials = {t.number: t.user_attrs for t in study.trials}
    for _, row in new.iterrows():  # the added columns hold what each old trial recorded
        attrs = trials[row["trial"]]
        assert row["latency_measured_ms"] == attrs["latency_measured_ms"]
        assert (row["head_width"], row["head_depth"]) == (attrs["arch"]["head_width"], attrs["arch"]["head_depth"])
        assert row["arch"].endswith(f" h{attrs['arch']['head_width']:g}x{attrs['arch']['head_depth']}")
    pd.testing.assert_frame_equal(new[[c for c in before.columns if c != "model_yaml"]],
                                  before.drop(columns=["model_yaml"], errors="ignore"))
    assert main(["export", name, "--results", str(results), "--out", str(tmp_path / "out2")]) == 0
    capsys.readouterr()


@pytest.mark.parametrize("name", sorted(STUDIES))
def test_an_old_study_resumes_keeping_every_trial_and_writes_the_new_format(name, assets, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    results = _relocate(name, assets, tmp_path)
    study = load_study(name, results=str(results))
    before = _snapshot(study)
    for t in study.trials:
        for entry in (t.user_attrs.get("files") or {}).values():
            path = results / name / "trials" / entry["path"]
            assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]
    old = _old_settings(results, name)

    resumed = run_search(StudySettings(name=name, results=str(results), trials=STUDIES[name] + 1))
    assert sum(counts(t) for t in resumed.trials) == STUDIES[name] + 1
    assert _snapshot(resumed)[:len(before)] == before  # nothing finished is run again or changed
    new = resumed.trials[len(before)]
    assert new.state == TrialState.COMPLETE and new.user_attrs["proxy"]["epochs"] == 1
    assert new.user_attrs["gflops_imgsz"] == old["imgsz"]  # timed and costed at the stored latency input
    if name == "prune":
        assert new.user_attrs["prune_fraction"] == old["prune_to"] and "pruned/weights.pt" in new.user_attrs["files"]

    stored = json.loads(resumed.user_attrs["settings"])
    assert stored["format"] == SETTINGS_FORMAT and "imgsz" not in stored and "batch" not in stored
    assert stored["latency_imgsz"] == old["imgsz"] and stored["trials"] == STUDIES[name] + 1
    history = resumed.user_attrs["settings_history"]
    assert [h["why"] for h in history] == ["format upgrade"] and history[0]["settings"] == old
    again = run_search(StudySettings(name=name, results=str(results)))  # the new format resumes as it is
    assert len(again.trials) == len(resumed.trials) and len(again.user_attrs["settings_history"]) == 1
