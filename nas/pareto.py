"""The Pareto table of a study: which trials trade mAP50-95 against latency best, and do they beat the baseline.

The study hands one `TrialRecord` per trial (it converts Optuna trials; this module never imports Optuna).
`pareto_table` ranks them, `export_pareto` writes `pareto.{md,csv,html,json,png}` with atomic replaces, so it is
safe to call after every trial while readers watch the files.

Objectives: maximise `map50_95`, minimise `latency_ms`.
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
JSON_SCHEMA = "repnas.pareto/1"


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
    pruned: float | None = None  # the deploy-FLOPs fraction the ranked model was pruned to (None: not pruned)
    confirmed_map50_95: float | None = None  # mean over seeds at the longest `repnas confirm` budget (None: none)
    confirmed_std: float | None = None  # its standard deviation over seeds (ddof=1; None below 2 seeds)
    confirmed_runs: int = 0  # confirmation runs (seeds) behind confirmed_map50_95


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


def _stage_columns(n_stages: int) -> list[str]:
    return [f"{name}_{field}" for name in _stage_names(n_stages) for field in ("depth", "width", "se")]


def _columns(n_stages: int = len(STAGE_NAMES)) -> list[str]:
    return [
        "rank", "trial", "map50_95", "map50", "latency_ms", "device", "latency_ratio", "params_m", "gflops_deploy",
        "pruned", *_stage_columns(n_stages), "dominates_baseline", "pareto", "confirmed_map50_95", "confirmed_std",
        "confirmed_runs", "confirmed_pareto", "baseline", "yaml", "state",
    ]


def pareto_table(records: Iterable[TrialRecord]) -> pd.DataFrame:
    """Every finished trial, one row each: the front first (rank 1.. by ascending latency), then the rest.

    Finished = COMPLETE, or PRUNED with both objectives. `rank` is <NA> off the front. `dominates_baseline` is
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
        "latency_ms": lat,
        "device": [r.device for r in rows],
        "latency_ratio": [_float(r.latency_ratio) for r in rows],
        "params_m": [np.nan if r.params is None else r.params / 1e6 for r in rows],
        "gflops_deploy": [_float(r.gflops_deploy) for r in rows],
        "pruned": [_float(r.pruned) for r in rows],
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
        "yaml": [r.yaml_path for r in rows],
        "state": [r.state for r in rows],
    }
    df = pd.DataFrame(data)
    df = df.sort_values(["pareto", "latency_ms", "map50_95", "trial"], ascending=[False, True, False, True],
                        na_position="last", kind="stable").reset_index(drop=True)
    df.insert(0, "rank", pd.array([i + 1 if p else None for i, p in enumerate(df["pareto"])], dtype="Int64"))
    return df[columns]


def _float(x: float | None) -> float:
    return np.nan if x is None else float(x)


def export_pareto(records: Iterable[TrialRecord], out_dir: str | Path, formats: Sequence[str] | str = FORMATS, *,
                  reference: tuple[float, float] | None = None, title: str = "",
                  confirmed_budget: str | None = None) -> dict[str, Path]:
    """Write pareto.{md,csv,html,json} as asked, and always pareto.png, into `out_dir`; return name -> path.

    md: the front only, with a hypervolume line. csv/json: every finished trial with its `pareto` flag.
    html: the front and all trials. Each file is replaced atomically, so this is safe after every trial.
    `reference` defaults to `default_reference(records)`. `confirmed_budget` ("epochs=E,imgsz=I"): the budget the
    confirmed_* columns were retrained at (`repnas confirm`), said in every file.

    pareto.json layout:
        {"header": {"schema": "repnas.pareto/1", "title", "generated_at" (UTC ISO 8601),
                    "objectives": {"map50_95": "maximize", "latency_ms": "minimize"},
                    "reference": {"map50_95", "latency_ms", "rule"}, "hypervolume",
                    "n_trials", "n_pareto", "baseline_trial" (or null), "devices", "confirmed_budget" (or null),
                    "columns"},
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
                       confirmed_budget=confirmed_budget)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    writers = {"md": lambda: _markdown(front, summary), "csv": lambda: df.to_csv(index=False),
               "html": lambda: _html(df, front, summary), "json": lambda: _json(df, summary)}
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

    def line(self) -> str:
        ref_map, ref_latency = self.reference
        return (f"Hypervolume {self.hypervolume:.6g} (reference: mAP50-95 = {ref_map:g}, "
                f"latency = {ref_latency:.4g} ms, {self.rule}); "
                f"front: {self.n_pareto} of {self.n_trials} finished trials." + (
                    f" confirmed_* columns: retrained at {self.confirmed_budget} (`repnas confirm`); "
                    "confirmed_pareto marks the front of confirmed mAP50-95 against latency."
                    if self.confirmed_budget else ""))

    def device_label(self) -> str:
        return " | ".join(self.devices) if self.devices else "unknown device"


def _devices(df: pd.DataFrame) -> tuple[str, ...]:
    return tuple(dict.fromkeys(d for d in df["device"] if isinstance(d, str) and d))


_DECIMALS = {"map50_95": 4, "map50": 4, "latency_ms": 3, "latency_ratio": 3, "params_m": 3, "gflops_deploy": 2,
             "pruned": 2, "confirmed_map50_95": 4, "confirmed_std": 4}


def _cell(column: str, value: object) -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return ""
    if column in _DECIMALS:
        return f"{float(value):.{_DECIMALS[column]}f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _markdown(front: pd.DataFrame, summary: _Summary) -> str:
    lines = [f"# {summary.title}", "", f"Latency measured on: {summary.device_label()}.", "", summary.line(), ""]
    columns = [c for c in front.columns if c != "pareto"]
    if front.empty:
        lines.append("No finished trial yet.")
    else:
        lines += ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
        for row in front.itertuples(index=False):
            values = dict(zip(front.columns, row))
            lines.append("| " + " | ".join(_cell(c, values[c]) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def _html(df: pd.DataFrame, front: pd.DataFrame, summary: _Summary) -> str:
    def table(frame: pd.DataFrame) -> str:
        return frame.to_html(index=False, na_rep="", border=0, classes="pareto")

    title = html.escape(summary.title)
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
</style>
</head>
<body>
<h1>{title}</h1>
<p>Latency measured on: {html.escape(summary.device_label())}.</p>
<p>{html.escape(summary.line())}</p>
<img src="pareto.png" alt="mAP50-95 against latency">
<h2>Pareto front ({summary.n_pareto})</h2>
{table(front)}
<h2>All finished trials ({summary.n_trials})</h2>
{table(df)}
</body>
</html>
"""


def _json(df: pd.DataFrame, summary: _Summary) -> str:
    trials = [{k: _jsonable(v) for k, v in row.items()} for row in df.to_dict("records")]
    baseline = df.loc[df["baseline"].astype(bool), "trial"]
    header = {
        "schema": JSON_SCHEMA,
        "title": summary.title,
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "objectives": {"map50_95": "maximize", "latency_ms": "minimize"},
        "reference": {"map50_95": summary.reference[0], "latency_ms": summary.reference[1], "rule": summary.rule},
        "hypervolume": summary.hypervolume,
        "n_trials": summary.n_trials,
        "n_pareto": summary.n_pareto,
        "baseline_trial": int(baseline.iloc[0]) if len(baseline) else None,
        "devices": list(summary.devices),
        "confirmed_budget": summary.confirmed_budget,
        "columns": list(df.columns),
    }
    return json.dumps({"header": header, "trials": trials}, indent=1) + "\n"


def _jsonable(value: object) -> object:
    """A table cell as a JSON value: missing -> None, numpy scalars -> Python (full float precision)."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    return value.item() if isinstance(value, np.generic) else value


def _png(df: pd.DataFrame, summary: _Summary) -> bytes:
    """mAP50-95 against latency: all finished trials, the front as a step line, the baseline marked."""
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
        ax.scatter(lat[on_front], m[on_front], s=28, c="tab:blue", label="Pareto front", zorder=3)
    for x, y, trial in zip(lat[is_base], m[is_base], df.loc[is_base, "trial"]):
        if math.isfinite(x) and math.isfinite(y):
            ax.scatter([x], [y], s=140, marker="*", c="tab:red", zorder=4, label="baseline")
            ax.annotate(f"baseline (trial {trial})", (x, y), textcoords="offset points", xytext=(6, -12),
                        color="tab:red", fontsize=8)
    if df.empty:
        ax.text(0.5, 0.5, "no finished trial yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel(f"latency (ms, {summary.device_label()})")
    ax.set_ylabel("mAP50-95")
    ax.set_title(f"{summary.title}\nHV {summary.hypervolume:.4g}, front {summary.n_pareto} of {summary.n_trials}",
                 fontsize=10)
    ax.grid(True, alpha=0.3)
    if not df.empty:
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
