"""nas.pareto on hand-made points: the front, the hypervolume, the table and the exported files."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from nas.pareto import (
    JSON_SCHEMA,
    TrialRecord,
    arch_short,
    default_reference,
    export_pareto,
    hypervolume,
    pareto_mask,
    pareto_table,
)

STAGES = ((1, 16, False), (2, 32, True), (3, 64, False), (4, 128, True), (1, 256, False))


def record(number: int, map50_95: float | None, latency_ms: float | None, *, state: str = "COMPLETE",
           baseline: bool = False, stages: tuple = STAGES, head: tuple = (0.5, 1)) -> TrialRecord:
    return TrialRecord(number=number, state=state, map50_95=map50_95,
                       map50=None if map50_95 is None else map50_95 + 0.2, latency_ms=latency_ms,
                       latency_ratio=None if latency_ms is None else latency_ms / 4.0, device="CPU test, 2 threads",
                       params=1_500_000 + number, gflops_deploy=2.5, stages=stages,
                       yaml_path=f"trials/{number}/model.yaml", is_baseline=baseline,
                       latency_measured_ms=None if latency_ms is None else latency_ms / 2.0,
                       head_width=head[0], head_depth=head[1])


@pytest.fixture
def records() -> list[TrialRecord]:
    """Baseline 0 at (0.30, 4 ms). Front by latency: 5 (0.10, 1), 1 (0.25, 2), 3 (0.35, 3), 4 (0.40, 6)."""
    return [
        record(0, 0.30, 4.0, baseline=True),
        record(1, 0.25, 2.0),
        record(2, 0.20, 5.0),  # dominated by 0, 1, 3
        record(3, 0.35, 3.0),  # dominates the baseline
        record(4, 0.40, 6.0),
        record(5, 0.10, 1.0, state="PRUNED"),  # pruned with both objectives: finished, on the front
        record(6, 0.50, None, state="PRUNED"),  # no latency: excluded
        record(7, None, None, state="FAILED"),
        record(8, None, 0.5, state="RUNNING"),
        record(9, 0.30, 4.0),  # equal to the baseline: does not dominate it
    ]


# --- pareto_mask ---------------------------------------------------------------------------------------------------

def test_pareto_mask_hand_made_points():
    m = [0.30, 0.25, 0.20, 0.35, 0.40]
    lat = [4.0, 2.0, 5.0, 3.0, 6.0]
    assert pareto_mask(m, lat).tolist() == [False, True, False, True, True]


def test_pareto_mask_identical_points_are_all_on_the_front():
    assert pareto_mask([0.3, 0.3, 0.2], [1.0, 1.0, 2.0]).tolist() == [True, True, False]


def test_pareto_mask_weak_domination_is_off_the_front():
    # same latency, lower mAP; same mAP, higher latency: both dominated
    assert pareto_mask([0.3, 0.2, 0.3], [1.0, 1.0, 2.0]).tolist() == [True, False, False]


def test_pareto_mask_single_point_and_empty():
    assert pareto_mask([0.1], [7.0]).tolist() == [True]
    assert pareto_mask([], []).tolist() == []


def test_pareto_mask_points_on_a_line():
    t = np.linspace(0, 1, 6)
    assert pareto_mask(t, t).all()  # a trade-off line: every point is on the front
    assert pareto_mask(t, 1 - t).tolist() == [False] * 5 + [True]  # better in both along the line: one winner


def test_pareto_mask_nan_is_off_and_dominates_nothing():
    assert pareto_mask([np.nan, 0.2, 0.9], [0.1, 1.0, np.nan]).tolist() == [False, True, False]


def test_pareto_mask_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shapes"):
        pareto_mask([0.1, 0.2], [1.0])


# --- hypervolume ---------------------------------------------------------------------------------------------------

def test_hypervolume_one_point_is_a_rectangle():
    assert hypervolume([0.5], [2.0], (0.0, 10.0)) == pytest.approx(0.5 * 8.0)
    assert hypervolume([0.5], [2.0], (0.1, 10.0)) == pytest.approx(0.4 * 8.0)


def test_hypervolume_two_points_is_the_union():
    # rectangles [0, .5] x [2, 10] (area 4) and [0, .8] x [6, 10] (area 3.2), overlap [0, .5] x [6, 10] (area 2)
    assert hypervolume([0.5, 0.8], [2.0, 6.0], (0.0, 10.0)) == pytest.approx(4.0 + 3.2 - 2.0)


def test_hypervolume_ignores_dominated_and_worse_than_reference_points():
    base = hypervolume([0.5, 0.8], [2.0, 6.0], (0.0, 10.0))
    assert hypervolume([0.5, 0.8, 0.4, 0.9, 0.7, 0.5], [2.0, 6.0, 5.0, 12.0, 10.0, 2.0], (0.0, 10.0)) == (
        pytest.approx(base))  # dominated, slower than the reference, on its edge, duplicate
    assert hypervolume([0.05], [1.0], (0.1, 10.0)) == 0.0  # mAP below the reference
    assert hypervolume([], [], (0.0, 1.0)) == 0.0


def test_default_reference_prefers_the_baseline(records):
    assert default_reference(records) == (0.0, 8.0)
    no_baseline = [r for r in records if not r.is_baseline]
    assert default_reference(no_baseline) == pytest.approx((0.0, 6.6))  # 1.1 x the slowest finished trial
    assert default_reference([]) == (0.0, 0.0)


# --- pareto_table --------------------------------------------------------------------------------------------------

DECISION = ["trial", "map50_95", "map50", "latency_measured_ms", "latency_ms", "latency_ratio", "params_m",
            "gflops_deploy", "arch"]
COLUMNS = [
    *DECISION, "confirmed_map50_95", "confirmed_std", "confirmed_runs", "confirmed_pareto",
    "pareto", "front_rank", "dominates_baseline", "baseline", "pruned", "study_pareto",
    *(f"P{i}_{f}" for i in range(1, 6) for f in ("depth", "width", "se")), "head_width", "head_depth",
    "device", "yaml", "state",
]


def test_pareto_table_columns_order_and_rows(records):
    df = pareto_table(records)
    assert list(df.columns) == COLUMNS
    assert df["trial"].tolist() == [5, 1, 3, 4, 0, 9, 2]  # front by latency, then the rest by latency
    assert set(df["state"]) == {"COMPLETE", "PRUNED"}


def test_pareto_table_front_rank_only_on_the_front(records):
    df = pareto_table(records)
    assert df["pareto"].tolist() == [True] * 4 + [False] * 3
    assert df["front_rank"].iloc[:4].tolist() == [1, 2, 3, 4]
    assert df["front_rank"].iloc[4:].isna().all()
    expected = pareto_mask(df["map50_95"], df["latency_ms"])
    assert df["pareto"].tolist() == expected.tolist()


def test_pareto_table_dominates_baseline(records):
    df = pareto_table(records).set_index("trial")
    # 3 is better in both; 1 and 5 are faster but worse; 9 equals the baseline; 4 is better but slower
    assert df["dominates_baseline"].to_dict() == {5: False, 1: False, 3: True, 4: False, 0: False, 9: False, 2: False}
    assert df["baseline"].to_dict() == {5: False, 1: False, 3: False, 4: False, 0: True, 9: False, 2: False}
    faster_same = [*records, record(10, 0.30, 3.5)]
    assert pareto_table(faster_same).set_index("trial").loc[10, "dominates_baseline"]


def test_pareto_table_fills_per_stage_columns(records):
    row = pareto_table(records).set_index("trial").loc[3]
    assert [row[f"P{i}_depth"] for i in range(1, 6)] == [1, 2, 3, 4, 1]
    assert [row[f"P{i}_width"] for i in range(1, 6)] == [16, 32, 64, 128, 256]
    assert [row[f"P{i}_se"] for i in range(1, 6)] == [False, True, False, True, False]
    assert row["params_m"] == pytest.approx(1.500003)
    assert row["yaml"] == "trials/3/model.yaml"
    assert (row["head_width"], row["head_depth"]) == (0.5, 1)
    assert row["arch"] == "d1-2-3-4-1 w16-32-64-128-256 se-+-+- h0.5x1"
    assert row["latency_measured_ms"] == 1.5 and row["latency_ms"] == 3.0  # the measured median beside the objective


def test_arch_short_form_names_every_searched_dimension():
    assert arch_short(((1, 16, False), (2, 24, False), (4, 48, True), (8, 96, False), (1, 192, False)), 0.5, 1) == (
        "d1-2-4-8-1 w16-24-48-96-192 se--+-- h0.5x1")
    assert arch_short(STAGES, 1.5, 2).endswith(" h1.5x2")
    assert arch_short(STAGES) == "d1-2-3-4-1 w16-32-64-128-256 se-+-+-"  # head unknown: left out
    assert arch_short(()) == ""


def test_rows_that_differ_only_in_the_head_differ_in_every_export(tmp_path):
    rows = [record(1, 0.3, 2.0, head=(0.5, 1)), record(2, 0.3, 2.0, head=(1.0, 2))]
    paths = export_pareto(rows, tmp_path)
    csv = pd.read_csv(paths["csv"]).set_index("trial")
    assert csv.loc[1, "arch"] != csv.loc[2, "arch"]
    assert (csv.loc[1, "head_width"], csv.loc[1, "head_depth"]) == (0.5, 1)
    assert (csv.loc[2, "head_width"], csv.loc[2, "head_depth"]) == (1.0, 2)
    trials = {t["trial"]: t for t in json.loads(paths["json"].read_text())["trials"]}
    assert (trials[2]["head_width"], trials[2]["head_depth"]) == (1.0, 2)
    md = paths["md"].read_text()
    assert "h0.5x1" in md and "h1x2" in md
    assert "h1x2" in paths["html"].read_text()


def test_pareto_table_missing_stages_are_na():
    df = pareto_table([record(0, 0.2, 1.0, stages=())])
    assert df[[c for c in COLUMNS if c.startswith("P")]].isna().all(axis=None)


def test_pareto_table_empty_has_the_columns():
    df = pareto_table([record(7, None, None, state="FAILED")])
    assert df.empty
    assert list(df.columns) == COLUMNS


# --- export_pareto -------------------------------------------------------------------------------------------------

def test_export_pareto_writes_every_format(records, tmp_path):
    paths = export_pareto(records, tmp_path / "out", title="demo study")
    assert set(paths) == {"md", "csv", "html", "json", "png"}
    assert all(p.parent == tmp_path / "out" and p.name == f"pareto.{k}" for k, p in paths.items())
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = paths["html"].read_text()
    assert html.startswith("<!DOCTYPE html>") and "demo study" in html and html.count("<table") == 2


def test_export_csv_and_json_hold_every_finished_trial(records, tmp_path):
    paths = export_pareto(records, tmp_path, formats=("csv", "json"))
    finished = [0, 1, 2, 3, 4, 5, 9]

    csv = pd.read_csv(paths["csv"])
    assert list(csv.columns) == COLUMNS
    assert sorted(csv["trial"]) == finished
    assert csv["pareto"].tolist() == pareto_mask(csv["map50_95"], csv["latency_ms"]).tolist()

    doc = json.loads(paths["json"].read_text())
    header, trials = doc["header"], doc["trials"]
    assert sorted(t["trial"] for t in trials) == finished
    mask = pareto_mask([t["map50_95"] for t in trials], [t["latency_ms"] for t in trials])
    assert [t["pareto"] for t in trials] == mask.tolist()
    assert header["reference"]["map50_95"] == 0.0 and header["reference"]["latency_ms"] == 8.0
    m, lat = [r.map50_95 for r in records[:6] + records[9:]], [r.latency_ms for r in records[:6] + records[9:]]
    assert header["hypervolume"] == pytest.approx(hypervolume(m, lat, (0.0, 8.0)))
    assert header["n_pareto"] == 4 and header["n_trials"] == 7 and header["baseline_trial"] == 0
    assert header["generated_at"]
    assert trials[-1]["front_rank"] is None  # missing values are null


def test_export_leads_with_the_decision_columns_and_describes_every_column(records, tmp_path):
    paths = export_pareto(records, tmp_path, baseline_latency_ms=4.0, latency_setup="64x64 px, batch 1",
                          warnings=["the baseline latency was noisy"])
    assert list(pd.read_csv(paths["csv"]).columns[:len(DECISION)]) == DECISION
    header = json.loads(paths["json"].read_text())["header"]
    assert header["schema"] == JSON_SCHEMA == "repnas.pareto/2"
    assert header["columns"] == COLUMNS and set(header["column_descriptions"]) == {*COLUMNS, "hypervolume"}
    assert "measured median" in header["column_descriptions"]["latency_measured_ms"]
    assert "frozen" in header["column_descriptions"]["latency_ms"]
    assert header["baseline_latency_ms"] == 4.0 and header["warnings"] == ["the baseline latency was noisy"]
    md = paths["md"].read_text()
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert table[0] == ("| trial | mAP50-95 | mAP50 | latency measured (ms) | latency objective (ms) | ratio to "
                        "baseline | params (M) | GFLOPs | arch | note |")
    assert table[1:2] == ["| 5 | 0.1000 | 0.3000 | 0.500 | 1.000 | 0.250 | 1.500 | 2.500 | "
                          "d1-2-3-4-1 w16-32-64-128-256 se-+-+- h0.5x1 |  |"]
    assert "1 threads" not in md and "| rank" not in md and "HV" not in md.replace("hypervolume (HV)", "")
    assert "- **hypervolume (HV)**: the area of the (latency objective, mAP50-95) plane" in md
    assert "- **latency measured (ms)** (`latency_measured_ms`): this trial's own measured median" in md
    assert "frozen when the study was created (4.000 ms)" in md and "**Warning:** the baseline latency was noisy" in md


def test_the_plot_labels_front_points_with_their_trial_numbers(records):
    from nas.pareto import _figure, _Summary

    df = pareto_table(records)
    fig = _figure(df, _Summary(title="t", reference=(0.0, 8.0), rule="r", hypervolume=1.0, n_trials=7, n_pareto=4,
                               devices=("CPU test, 2 threads",)))
    labels = [t.get_text() for t in fig.axes[0].texts]
    assert sorted(labels) == sorted(["5", "1", "3", "4", "baseline (trial 0)"])


def test_export_md_holds_only_the_front_and_the_hypervolume(records, tmp_path):
    ref = (0.0, 10.0)
    text = export_pareto(records, tmp_path, formats=["md"], reference=ref)["md"].read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| trial")]
    assert [int(line.split("|")[1]) for line in rows] == [5, 1, 3, 4]
    hv = hypervolume([r.map50_95 for r in records[:6]], [r.latency_ms for r in records[:6]], ref)
    hv_line = next(line for line in text.splitlines() if line.startswith("Hypervolume"))
    assert math.isclose(float(hv_line.split()[1]), hv, rel_tol=1e-5)
    assert "latency objective = 10 ms" in hv_line and "front: 4 of 7" in hv_line


def test_export_pareto_unknown_format_raises(records, tmp_path):
    with pytest.raises(ValueError, match="known formats: md, csv, html, json"):
        export_pareto(records, tmp_path, formats=("md", "xlsx"))
    assert list(tmp_path.iterdir()) == []  # nothing written before the check


def test_export_pareto_twice_overwrites_cleanly(records, tmp_path):
    export_pareto(records[:3], tmp_path)
    first = json.loads((tmp_path / "pareto.json").read_text())
    export_pareto(records, tmp_path, formats="md,csv,html,json")
    second = json.loads((tmp_path / "pareto.json").read_text())
    assert first["header"]["n_trials"] == 3 and second["header"]["n_trials"] == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"pareto.{k}" for k in ("csv", "html", "json", "md", "png")]


def test_export_pareto_with_no_finished_trial(tmp_path):
    paths = export_pareto([record(0, None, None, state="RUNNING")], tmp_path)
    assert json.loads(paths["json"].read_text())["trials"] == []
    assert "No finished trial yet." in paths["md"].read_text()
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"
