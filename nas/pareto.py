"""The Pareto table of a study: which trials trade mAP50-95 against latency best, and do they beat the baseline.

The study hands one `TrialRecord` per trial (it converts Optuna trials; this module never imports Optuna).
`pareto_table` ranks them, `export_pareto` writes `pareto.{md,csv,html,json,png}` with atomic replaces, so it is
safe to call after every trial while readers watch the files. What each column holds, and its order (the columns a
user decides on first), is written once, in `_COLUMN_GROUPS`; the md/html legends and the JSON header read it.

Objectives: maximise `map50_95`, minimise `latency_ms` (the latency ratio to the baseline, timed interleaved, x the
baseline's latency frozen when the study was created); `latency_measured_ms` is the trial's own measured median.
"""

from __future__ import annotations

import html
import io
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike

from nas.files import write_bytes_atomic, write_text_atomic
from space.errors import ConfigError

STAGE_NAMES = ("P1", "P2", "P3", "P4", "P5")
FORMATS = ("md", "csv", "html", "json")  # pareto.png is always written
JSON_SCHEMA = "repnas.pareto/2"  # /2: decision columns first, rank -> front_rank, + latency_measured_ms, arch, head_*


@dataclass(frozen=True)
class TrialRecord:
    """One trial as the study saw it; metrics are None where the trial did not get that far."""

    number: int
    state: str  # Optuna's state name: "COMPLETE", "PRUNED", "FAILED", "RUNNING", ...
    map50_95: float | None
    map50: float | None
    latency_ms: float | None
    latency_ratio: float | None  # latency / the baseline's latency measured in the same session
    device: str  # e.g. "NVIDIA H200" or "CPU Intel Xeon, 2 threads"
    params: int | None
    gflops_deploy: float | None
    stages: tuple[tuple[int, int, bool], ...]  # per backbone stage P1..P5: (depth, width, se)
    yaml_path: str | None
    is_baseline: bool = False
    latency_measured_ms: float | None = None  # this trial's own measured median (latency_ms is the objective)
    head_width: float | None = None  # the Arch's head width factor and C3 depth (None: unknown)
    head_depth: int | None = None
    pruned: float | None = None  # the deploy-FLOPs fraction the ranked model was pruned to (None: not pruned)
    confirmed_map50_95: float | None = None  # mean over seeds at the longest `repnas confirm` budget (None: none)
    confirmed_std: float | None = None  # its standard deviation over seeds (ddof=1; None below 2 seeds)
    confirmed_runs: int = 0  # confirmation runs (seeds) behind confirmed_map50_95
    study_pareto: bool | None = None  # ranked on a latency profile: on the study's own front (None: no profile)


def pareto_mask(map50_95: ArrayLike, latency: ArrayLike) -> np.ndarray:
    """(N,) bool: True for points no other point dominates (maximise mAP, minimise latency).

    b dominates a when b is >= in mAP and <= in latency with one strict, so identical points are all on the
    front. A point with a NaN objective is never on the front and dominates nothing.
    """
    m = np.asarray(map50_95, dtype=float)  # (N,)
    lat = np.asarray(latency, dtype=float)  # (N,)
    if m.ndim != 1 or m.shape != lat.shape:
        raise ValueError(f"map50_95 and latency must be 1-D of one length, but got shapes {m.shape} and {lat.shape}")
    mask = np.zeros(m.shape, dtype=bool)
    valid = np.flatnonzero(np.isfinite(m) & np.isfinite(lat))
    order = valid[np.lexsort((-m[valid], lat[valid]))]  # latency up, then mAP down
    best_faster = -math.inf  # best mAP among points strictly faster than the current latency group
    i = 0
    while i < len(order):
        j = i
        while j < len(order) and lat[order[j]] == lat[order[i]]:
            j += 1
        group = order[i:j]  # one latency; group[0] has the group's best mAP
        top = m[group[0]]
        if top > best_faster:
            mask[group[m[group] == top]] = True
        best_faster = max(best_faster, top)
        i = j
    return mask


def hypervolume(map50_95: ArrayLike, latency: ArrayLike, reference: tuple[float, float]) -> float:
    """Area dominated by the points and bounded by `reference` = (ref_map, ref_latency).

    The union of rectangles [ref_map, m_i] x [l_i, ref_latency]; a point not strictly better than the reference
    in both objectives adds nothing. Exact: a sweep over the points sorted by latency.
    """
    ref_map, ref_latency = float(reference[0]), float(reference[1])
    m = np.asarray(map50_95, dtype=float).ravel()  # (N,)
    lat = np.asarray(latency, dtype=float).ravel()  # (N,)
    if m.shape != lat.shape:
        raise ValueError(f"map50_95 and latency must have one length, but got {m.shape} and {lat.shape}")
    keep = np.isfinite(m) & np.isfinite(lat) & (m > ref_map) & (lat < ref_latency)
    m, lat = m[keep], lat[keep]
    order = np.argsort(lat, kind="stable")
    lat_sorted = lat[order]  # (K,)
    best_map = np.maximum.accumulate(m[order])  # (K,) best mAP at or below each latency
    widths = np.diff(np.append(lat_sorted, ref_latency))  # (K,) latency span until the next point
    return float(np.sum(widths * (best_map - ref_map)))


def default_reference(records: Iterable[TrialRecord]) -> tuple[float, float]:
    """The hypervolume reference point (ref_map, ref_latency_ms) used when none is given.

    (0.0, 2 x the baseline's latency) when a baseline record has a latency: it is measured before training, so
    the point is fixed from the study's start and hypervolumes stay comparable as trials arrive (trials slower
    than twice the baseline add nothing). Otherwise (0.0, 1.1 x the largest latency of a finished trial), which
    moves as trials arrive; (0.0, 0.0) when no trial has a latency yet (hypervolume 0).
    """
    return _reference_and_rule(list(records))[0]


def _reference_and_rule(records: list[TrialRecord]) -> tuple[tuple[float, float], str]:
    for r in records:
        if r.is_baseline and _finite(r.latency_ms) and r.latency_ms > 0:
            return (0.0, 2.0 * float(r.latency_ms)), f"2 x baseline latency (trial {r.number})"
    latencies = [float(r.latency_ms) for r in _finished(records) if _finite(r.latency_ms)]
    if latencies:
        return (0.0, 1.1 * max(latencies)), "1.1 x max latency of finished trials"
    return (0.0, 0.0), "no latency yet"


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def _finished(records: Iterable[TrialRecord]) -> list[TrialRecord]:
    """COMPLETE trials, and PRUNED ones that still have both objectives."""
    return [
        r for r in records
        if r.state == "COMPLETE" or (r.state == "PRUNED" and _finite(r.map50_95) and _finite(r.latency_ms))
    ]


def _stage_names(n_stages: int) -> list[str]:
    return [*STAGE_NAMES, *(f"P{i + 1}" for i in range(len(STAGE_NAMES), n_stages))]


def arch_short(stages: Sequence[tuple[int, int, bool]], head_width: float | None = None,
               head_depth: int | None = None) -> str:
    """An Arch in one line, a token per kind of dimension: "d1-2-4-8-1 w16-24-48-96-192 se--+-- h0.5x1" = blocks
    (depth) and output channels (width) of the backbone stages P1..P5, squeeze-excitation per stage (+ on, - off),
    head width factor x C3 depth (left out when unknown). '' without stages."""
    if not stages:
        return ""
    text = (f"d{'-'.join(str(d) for d, _, _ in stages)} w{'-'.join(str(w) for _, w, _ in stages)} "
            f"se{''.join('+' if se else '-' for _, _, se in stages)}")
    if head_width is not None and head_depth is not None:
        text += f" h{head_width:g}x{head_depth}"
    return text


# Every column in export order, in groups: name -> (md/html header, what it holds). The decision columns lead.
_COLUMN_GROUPS: dict[str, dict[str, tuple[str, str]]] = {
    "decision": {
        "trial": ("trial", "the Optuna trial number (its files are in trials/N/)"),
        "map50_95": ("mAP50-95", "mAP@0.5:0.95 of the deployed network after the proxy training (objective, "
                                 "maximised)"),
        "map50": ("mAP50", "mAP@0.5 of the same evaluation"),
        "latency_measured_ms": ("latency measured (ms)", "this trial's own measured median latency of one forward "
                                                         "pass of the deployed network"),
        "latency_ms": ("latency objective (ms)", "the search objective (minimised): ratio to the baseline x the "
                                                 "baseline's latency frozen when the study was created"),
        "latency_ratio": ("ratio to baseline", "median latency / the baseline's, the two timed interleaved in one "
                                               "session (what a busy machine disturbs least)"),
        "params_m": ("params (M)", "parameters of the deployed (fused, pruned when pruned) network, in millions"),
        "gflops_deploy": ("GFLOPs", "GFLOPs of the deployed network at the latency input size"),
        "arch": ("arch", "the Arch in short form: d = blocks per backbone stage P1..P5, w = their output channels, "
                         "se = squeeze-excitation per stage (+ on, - off), h = head width factor x C3 depth (ELAN "
                         "depth in a yolov7 space)"),
    },
    "confirmed": {
        "confirmed_map50_95": ("confirmed mAP50-95", "mean mAP50-95 over seeds when retrained at the longer "
                                                     "`repnas confirm` budget (empty: not confirmed)"),
        "confirmed_std": ("confirmed std", "its standard deviation over seeds (empty below 2 seeds)"),
        "confirmed_runs": ("confirmed runs", "confirmation runs (seeds) behind confirmed_map50_95"),
        "confirmed_pareto": ("survived", "on the front of confirmed mAP50-95 against latency among the confirmed "
                                         "trials: which front rows survived confirmation (empty: not confirmed)"),
    },
    "front": {
        "pareto": ("on front", "on the Pareto front: no other finished trial is at least as good in mAP50-95 and "
                               "the latency objective and better in one"),
        "front_rank": ("front position", "position on the front by ascending latency objective, 1 = fastest "
                                         "(empty off the front)"),
        "dominates_baseline": ("beats baseline", "at least as good as the baseline in both objectives and better "
                                                 "in one"),
        "baseline": ("baseline", "the study's baseline design"),
        "pruned": ("pruned to", "the deploy-FLOPs fraction the ranked network was channel-pruned to (empty: not "
                                "pruned)"),
        "study_pareto": ("on study front", "ranked on a latency profile (`--profile`): on the front the study ranked "
                                           "with its own latency, so rows where it differs from `pareto` changed "
                                           "(empty without a profile)"),
    },
    "arch": {},  # the searched dimensions, one column each: see _arch_columns
    "where": {
        "device": ("latency device", "where latency was timed: the GPU, or the CPU and the threads it used"),
        "yaml": ("model YAML", "the trial's model.yaml, relative to the study folder"),
        "state": ("state", "the trial's Optuna state: COMPLETE (or PRUNED, stopped early, with both objectives)"),
    },
}
_STAGE_FIELDS = {"depth": "blocks", "width": "output channels", "se": "squeeze-excitation"}
_HEAD_COLUMNS = {"head_width": ("head width", "head width factor on the seed design's head Conv/C3 channels"),
                 "head_depth": ("head depth", "bottlenecks per head C3")}
_HV_NOTE = ("the area of the (latency objective, mAP50-95) plane that the finished trials dominate, bounded by the "
            "reference point; larger is better, and it grows only when a trial extends the front, so it tracks the "
            "search's progress in one number")


def _arch_columns(n_stages: int) -> dict[str, tuple[str, str]]:
    stages = {f"{name}_{field}": (f"{name} {field}", f"backbone stage {name}: {what}")
              for name in _stage_names(n_stages) for field, what in _STAGE_FIELDS.items()}
    return stages | _HEAD_COLUMNS


def _column_catalogue(n_stages: int = len(STAGE_NAMES)) -> dict[str, tuple[str, str]]:
    """name -> (header, description) for every column, in export order."""
    out: dict[str, tuple[str, str]] = {}
    for group, columns in _COLUMN_GROUPS.items():
        out |= _arch_columns(n_stages) if group == "arch" else columns
    return out


def _columns(n_stages: int = len(STAGE_NAMES)) -> list[str]:
    return list(_column_catalogue(n_stages))


def pareto_table(records: Iterable[TrialRecord]) -> pd.DataFrame:
    """Every finished trial, one row each: the front first (front_rank 1.. by ascending latency), then the rest.

    Finished = COMPLETE, or PRUNED with both objectives. `front_rank` is <NA> off the front. `dominates_baseline` is
    True when the trial is >= the baseline in mAP and <= in latency with one strict (False for the baseline
    itself, and everywhere when no finished baseline has both objectives). `confirmed_pareto`: on the front of the
    confirmed mAP50-95 against latency among the confirmed trials (<NA> for a trial not confirmed; with `pareto`
    it tells which front rows survived confirmation). Columns in `_columns()` order.
    """
    rows = _finished(records)
    n_stages = max([len(STAGE_NAMES), *(len(r.stages) for r in rows)])
    columns = _columns(n_stages)
    if not rows:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in columns})

    m = np.array([_float(r.map50_95) for r in rows])  # (N,)
    lat = np.array([_float(r.latency_ms) for r in rows])  # (N,)
    on_front = pareto_mask(m, lat)  # (N,)
    base = next((i for i, r in enumerate(rows) if r.is_baseline and _finite(r.map50_95) and _finite(r.latency_ms)),
                None)
    if base is None:
        beats = np.zeros(len(rows), dtype=bool)
    else:
        bm, bl = m[base], lat[base]
        beats = (m >= bm) & (lat <= bl) & ((m > bm) | (lat < bl))  # NaN compares False

    data: dict[str, object] = {
        "trial": pd.array([r.number for r in rows], dtype="Int64"),
        "map50_95": m,
        "map50": [_float(r.map50) for r in rows],
        "latency_measured_ms": [_float(r.latency_measured_ms) for r in rows],
        "latency_ms": lat,
        "latency_ratio": [_float(r.latency_ratio) for r in rows],
        "params_m": [np.nan if r.params is None else r.params / 1e6 for r in rows],
        "gflops_deploy": [_float(r.gflops_deploy) for r in rows],
        "arch": [arch_short(r.stages, r.head_width, r.head_depth) for r in rows],
        "pruned": [_float(r.pruned) for r in rows],
        "head_width": [_float(r.head_width) for r in rows],
        "head_depth": pd.array([r.head_depth for r in rows], dtype="Int64"),
        "device": [r.device for r in rows],
    }
    for s, name in enumerate(_stage_names(n_stages)):
        stage = [r.stages[s] if s < len(r.stages) else None for r in rows]
        data[f"{name}_depth"] = pd.array([None if x is None else int(x[0]) for x in stage], dtype="Int64")
        data[f"{name}_width"] = pd.array([None if x is None else int(x[1]) for x in stage], dtype="Int64")
        data[f"{name}_se"] = pd.array([None if x is None else bool(x[2]) for x in stage], dtype="boolean")
    confirmed = np.array([_float(r.confirmed_map50_95) for r in rows])  # (N,)
    has = np.isfinite(confirmed) & np.isfinite(lat)
    confirmed_front = np.zeros(len(rows), dtype=bool)
    if has.any():
        confirmed_front[has] = pareto_mask(confirmed[has], lat[has])
    data |= {
        "dominates_baseline": beats,
        "pareto": on_front,
        "confirmed_map50_95": confirmed,
        "confirmed_std": [_float(r.confirmed_std) for r in rows],
        "confirmed_runs": pd.array([r.confirmed_runs for r in rows], dtype="Int64"),
        "confirmed_pareto": pd.array([bool(f) if h else None for f, h in zip(confirmed_front, has)],
                                     dtype="boolean"),
        "baseline": np.array([r.is_baseline for r in rows], dtype=bool),
        "study_pareto": pd.array([r.study_pareto for r in rows], dtype="boolean"),
        "yaml": [r.yaml_path for r in rows],
        "state": [r.state for r in rows],
    }
    df = pd.DataFrame(data)
    df = df.sort_values(["pareto", "latency_ms", "map50_95", "trial"], ascending=[False, True, False, True],
                        na_position="last", kind="stable").reset_index(drop=True)
    df["front_rank"] = pd.array([i + 1 if p else None for i, p in enumerate(df["pareto"])], dtype="Int64")
    return df[columns]


def _float(x: float | None) -> float:
    return np.nan if x is None else float(x)


def export_pareto(records: Iterable[TrialRecord], out_dir: str | Path, formats: Sequence[str] | str = FORMATS, *,
                  reference: tuple[float, float] | None = None, title: str = "",
                  confirmed_budget: str | None = None, baseline_latency_ms: float | None = None,
                  latency_setup: str = "", warnings: Sequence[str] = ()) -> dict[str, Path]:
    """Write pareto.{md,csv,html,json} as asked, and always pareto.png, into `out_dir`; return name -> path.

    md: a report of the front (the decision columns, a hypervolume line, a legend of the columns). csv/json: every
    finished trial with every column. html: the front as in the md, then all trials. png: mAP50-95 against the
    latency objective, front points labelled with their trial numbers. Each file is replaced atomically, so this is
    safe after every trial. `reference` defaults to `default_reference(records)`. `confirmed_budget`
    ("epochs=E,imgsz=I"): the budget the confirmed_* columns were retrained at (`repnas confirm`).
    `baseline_latency_ms`: the frozen baseline latency the objective is scaled by; `latency_setup`: how latency was
    timed, in words ("640x640 px, batch 1"); `warnings`: sentences every file repeats (a noisy baseline).

    pareto.json layout (schema repnas.pareto/2):
        {"header": {"schema": "repnas.pareto/2", "title", "generated_at" (UTC ISO 8601),
                    "objectives": {"map50_95": "maximize", "latency_ms": "minimize"},
                    "baseline_latency_ms" (frozen, or null), "latency_setup", "warnings": [...],
                    "reference": {"map50_95", "latency_ms", "rule"}, "hypervolume",
                    "n_trials", "n_pareto", "baseline_trial" (or null), "devices", "confirmed_budget" (or null),
                    "columns", "column_descriptions": {column: what it holds}},
         "trials": [one object per table row, keys = columns, missing values null]}
    """
    wanted = _parse_formats(formats)
    records = list(records)
    if reference is None:
        reference, rule = _reference_and_rule(records)
    else:
        reference, rule = (float(reference[0]), float(reference[1])), "given"
    df = pareto_table(records)
    front = df[df["pareto"].astype(bool)]
    hv = hypervolume(df["map50_95"].astype(float), df["latency_ms"].astype(float), reference)
    summary = _Summary(title=title or "Pareto front: mAP50-95 vs latency", reference=reference, rule=rule,
                       hypervolume=hv, n_trials=len(df), n_pareto=len(front), devices=_devices(df),
                       confirmed_budget=confirmed_budget, baseline_latency_ms=baseline_latency_ms,
                       latency_setup=latency_setup, warnings=tuple(warnings))

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    writers = {"md": lambda: _markdown(df, summary), "csv": lambda: df.to_csv(index=False),
               "html": lambda: _html(df, summary), "json": lambda: _json(df, summary)}
    paths: dict[str, Path] = {}
    for fmt in wanted:
        paths[fmt] = out_dir / f"pareto.{fmt}"
        write_text_atomic(paths[fmt], writers[fmt]())
    paths["png"] = out_dir / "pareto.png"
    write_bytes_atomic(paths["png"], _png(df, summary))
    return paths


def _parse_formats(formats: Sequence[str] | str) -> list[str]:
    if isinstance(formats, str):
        formats = formats.split(",")
    wanted: list[str] = []
    for f in formats:
        name = f.strip().lower().removeprefix(".")
        if name == "png":  # always written; accept it so `--format md,png` is not an error
            continue
        if name not in FORMATS:
            raise ConfigError(f"unknown Pareto export format {f!r}; known formats: {', '.join(FORMATS)} "
                              "(pareto.png is always written)")
        if name not in wanted:
            wanted.append(name)
    return wanted


@dataclass(frozen=True)
class _Summary:
    title: str
    reference: tuple[float, float]
    rule: str
    hypervolume: float
    n_trials: int
    n_pareto: int
    devices: tuple[str, ...]
    confirmed_budget: str | None = None
    baseline_latency_ms: float | None = None
    latency_setup: str = ""
    warnings: tuple[str, ...] = ()

    def line(self) -> str:
        ref_map, ref_latency = self.reference
        return (f"Hypervolume {self.hypervolume:.6g} (reference: mAP50-95 = {ref_map:g}, "
                f"latency objective = {ref_latency:.4g} ms, {self.rule}); "
                f"front: {self.n_pareto} of {self.n_trials} finished trials." + (
                    f" confirmed_* columns: retrained at {self.confirmed_budget} (`repnas confirm`); "
                    "confirmed_pareto marks the front of confirmed mAP50-95 against latency."
                    if self.confirmed_budget else ""))

    def device_label(self) -> str:
        return " | ".join(self.devices) if self.devices else "unknown device"

    def latency_line(self) -> str:
        """Where and how latency was timed, and what the objective is."""
        frozen = (f"{self.baseline_latency_ms:.3f} ms" if self.baseline_latency_ms is not None
                  else "its figure")
        return (f"Latency timed on {self.device_label()}" + (f", {self.latency_setup}" if self.latency_setup else "")
                + f". The latency objective is the ratio to the baseline x the baseline's latency frozen when the "
                f"study was created ({frozen}); latency measured is each trial's own median.")


def _devices(df: pd.DataFrame) -> tuple[str, ...]:
    return tuple(dict.fromkeys(d for d in df["device"] if isinstance(d, str) and d))


_DECIMALS = {"map50_95": 4, "map50": 4, "latency_measured_ms": 3, "latency_ms": 3, "latency_ratio": 3,
             "params_m": 3, "gflops_deploy": 3, "pruned": 2, "confirmed_map50_95": 4, "confirmed_std": 4}


def _cell(column: str, value: object) -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return ""
    if column in _DECIMALS:
        return f"{float(value):.{_DECIMALS[column]}f}"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _report(df: pd.DataFrame) -> pd.DataFrame:
    """The front as the md and html show it: the decision columns, the confirmed ones when there are any, the
    pruning fraction when any trial was pruned, and a note (baseline / beats baseline); cells as text."""
    front = df[df["pareto"].astype(bool)]
    columns = list(_COLUMN_GROUPS["decision"])
    if (df["confirmed_runs"].fillna(0) > 0).any():
        columns += list(_COLUMN_GROUPS["confirmed"])
    if df["pruned"].notna().any():
        columns.append("pruned")
    out = pd.DataFrame({c: [_cell(c, v) for v in front[c]] for c in columns})
    out["note"] = ["baseline" if b else ("beats baseline" if d else "")
                   for b, d in zip(front["baseline"], front["dominates_baseline"])]
    return out


def _legend(columns: Sequence[str], n_stages: int) -> list[tuple[str, str | None, str]]:
    """(header, csv/json column name, description) of `columns`, then the hypervolume (no column)."""
    catalogue = _column_catalogue(n_stages) | {"note": ("note", "the baseline, or a trial that beats it")}
    return [(catalogue[c][0], None if c == "note" else c, catalogue[c][1]) for c in columns] + [
        ("hypervolume (HV)", None, _HV_NOTE)]


def _n_stages(df: pd.DataFrame) -> int:
    return sum(c.endswith("_depth") and c != "head_depth" for c in df.columns)


def _markdown(df: pd.DataFrame, summary: _Summary) -> str:
    lines = [f"# {summary.title}", "", summary.latency_line(), ""]
    lines += [f"**Warning:** {w}" for w in summary.warnings] + ([""] if summary.warnings else [])
    lines += [summary.line(), ""]
    report = _report(df)
    catalogue = _column_catalogue(_n_stages(df)) | {"note": ("note", "")}
    if report.empty:
        lines.append("No finished trial yet.")
    else:
        lines.append(f"## Pareto front ({summary.n_pareto}), fastest first")
        lines.append("")
        headers = [catalogue[c][0] for c in report.columns]
        lines += ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in report.itertuples(index=False)]
    lines += ["", "## Columns", ""]
    lines += [f"- **{name}**" + (f" (`{column}`)" if column and column != name else "") + f": {what}"
              for name, column, what in _legend(list(report.columns), _n_stages(df))]
    lines += ["", "Every finished trial, with every column (each searched dimension, front_rank, device, model "
              "YAML), is in pareto.csv and pareto.json."]
    return "\n".join(lines) + "\n"


def _html(df: pd.DataFrame, summary: _Summary) -> str:
    def table(frame: pd.DataFrame) -> str:
        return frame.to_html(index=False, na_rep="", border=0, classes="pareto")

    title = html.escape(summary.title)
    report = _report(df)
    catalogue = _column_catalogue(_n_stages(df)) | {"note": ("note", "")}
    front = report.rename(columns={c: catalogue[c][0] for c in report.columns})
    warnings = "".join(f"<p><strong>Warning:</strong> {html.escape(w)}</p>\n" for w in summary.warnings)
    legend = "".join(f"<dt>{html.escape(column or name)}"
                     + (f" &mdash; {html.escape(name)}" if column and column != name else "")
                     + f"</dt><dd>{html.escape(what)}</dd>"
                     for name, column, what in _legend(list(df.columns), _n_stages(df)))
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }}
table.pareto {{ border-collapse: collapse; font-size: 0.85em; }}
table.pareto th, table.pareto td {{ border: 1px solid #ccc; padding: 0.2em 0.5em; text-align: right; }}
table.pareto th {{ background: #f0f0f0; }}
dt {{ font-weight: bold; }}
</style>
</head>
<body>
<h1>{title}</h1>
<p>{html.escape(summary.latency_line())}</p>
{warnings}<p>{html.escape(summary.line())}</p>
<img src="pareto.png" alt="mAP50-95 against latency">
<h2>Pareto front ({summary.n_pareto}), fastest first</h2>
{table(front)}
<h2>All finished trials ({summary.n_trials}), every column</h2>
{table(df)}
<h2>Columns</h2>
<dl>{legend}</dl>
</body>
</html>
"""


def _json(df: pd.DataFrame, summary: _Summary) -> str:
    trials = [{k: _jsonable(v) for k, v in row.items()} for row in df.to_dict("records")]
    baseline = df.loc[df["baseline"].astype(bool), "trial"]
    catalogue = _column_catalogue(_n_stages(df))
    header = {
        "schema": JSON_SCHEMA,
        "title": summary.title,
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "objectives": {"map50_95": "maximize", "latency_ms": "minimize"},
        "baseline_latency_ms": summary.baseline_latency_ms,
        "latency_setup": summary.latency_setup,
        "warnings": list(summary.warnings),
        "reference": {"map50_95": summary.reference[0], "latency_ms": summary.reference[1], "rule": summary.rule},
        "hypervolume": summary.hypervolume,
        "n_trials": summary.n_trials,
        "n_pareto": summary.n_pareto,
        "baseline_trial": int(baseline.iloc[0]) if len(baseline) else None,
        "devices": list(summary.devices),
        "confirmed_budget": summary.confirmed_budget,
        "columns": list(df.columns),
        "column_descriptions": {c: catalogue[c][1] for c in df.columns} | {"hypervolume": _HV_NOTE},
    }
    return json.dumps({"header": header, "trials": trials}, indent=1) + "\n"


def _jsonable(value: object) -> object:
    """A table cell as a JSON value: missing -> None, numpy scalars -> Python (full float precision)."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    return value.item() if isinstance(value, np.generic) else value


def _png(df: pd.DataFrame, summary: _Summary) -> bytes:
    buf = io.BytesIO()
    _figure(df, summary).savefig(buf, format="png")
    return buf.getvalue()


def _figure(df: pd.DataFrame, summary: _Summary):  # -> matplotlib.figure.Figure
    """mAP50-95 against the latency objective: all finished trials, the front as a step line with each point's
    trial number, the baseline marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # heavy: only when plotting
    from matplotlib.figure import Figure  # no pyplot: no global state, no backend switch in the caller

    fig = Figure(figsize=(7.5, 5.0), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    lat, m = df["latency_ms"].astype(float), df["map50_95"].astype(float)
    on_front, is_base = df["pareto"].astype(bool), df["baseline"].astype(bool)
    ax.scatter(lat[~on_front], m[~on_front], s=18, c="0.6", label="trials")
    if on_front.any():
        ax.step(lat[on_front], m[on_front], where="post", c="tab:blue", lw=1.2)  # front rows sorted by latency
        ax.scatter(lat[on_front], m[on_front], s=28, c="tab:blue", label="Pareto front (trial numbers)", zorder=3)
        for x, y, trial in zip(lat[on_front], m[on_front], df.loc[on_front, "trial"]):
            if math.isfinite(x) and math.isfinite(y):
                ax.annotate(str(trial), (x, y), textcoords="offset points", xytext=(4, 4), color="tab:blue",
                            fontsize=7)
    for x, y, trial in zip(lat[is_base], m[is_base], df.loc[is_base, "trial"]):
        if math.isfinite(x) and math.isfinite(y):
            ax.scatter([x], [y], s=140, marker="*", c="tab:red", zorder=4, label="baseline")
            ax.annotate(f"baseline (trial {trial})", (x, y), textcoords="offset points", xytext=(6, -12),
                        color="tab:red", fontsize=8)
    if df.empty:
        ax.text(0.5, 0.5, "no finished trial yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel(f"latency objective (ms: ratio to the baseline x its frozen latency; {summary.device_label()})",
                  fontsize=8)
    ax.set_ylabel("mAP50-95")
    ax.set_title(f"{summary.title}\nhypervolume {summary.hypervolume:.4g}, front {summary.n_pareto} of "
                 f"{summary.n_trials} finished trials", fontsize=10)
    ax.grid(True, alpha=0.3)
    if not df.empty:
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig
