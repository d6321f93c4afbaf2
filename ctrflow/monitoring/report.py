"""The on-call page of one monitoring run, the history over runs, PNG plots and the Evidently workspace snapshots.

`write_report` writes ``monitor_report.html`` (self-contained: the verdict and reasons, the drift scenario table, the
online quality tables, the series over time windows and over runs as embedded PNGs, links to Evidently's HTML per
scenario), the PNGs themselves (``quality_over_time.png``, ``history.png``) beside it, and appends the run to a
history file (``history.jsonl``) so the next run can plot drift and online AUC over days.

`add_to_workspace` adds this run's Evidently snapshots (the drift report, and an online-quality report: Evidently's
ROC AUC and mean click / mean score on the labelled rows) to a local Evidently workspace, so that
``evidently ui --workspace <path>`` shows every run of the project over time.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

import pandas as pd

REPORT_NAME = "monitor_report.html"
QUALITY_PNG = "quality_over_time.png"
HISTORY_PNG = "history.png"
HISTORY_NAME = "history.jsonl"


def history_record(run: Any) -> dict:
    """One line of history: when, the verdicts, drifted share and online AUC overall and per scenario."""
    d, q = run.drift, run.quality
    rec: dict[str, Any] = {
        "run_at": run.run_at, "verdict": run.verdict, "drift_verdict": d.verdict, "drifted_share": d.drifted_share,
        "scenarios": {k: {"verdict": p.verdict, "drifted_share": p.drifted_share} for k, p in d.scenarios.items()},
    }  # fmt: skip
    if q is not None:
        rec["quality_verdict"] = q.verdict
        rec["online_auc"] = q.overall.get("auc")
        for k, g in q.by_scenario.items():
            rec["scenarios"].setdefault(k, {})["online_auc"] = g.get("auc")
            rec["scenarios"][k]["ctr_ratio"] = g.get("ratio")
    return rec


def append_history(path: Path, record: dict) -> list[dict]:
    """Append `record` to the JSON-lines history at `path`; returns every record, oldest first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.write(json.dumps(record, default=str) + "\n")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _two_panels() -> tuple[Any, Any]:
    """A figure of two side-by-side panels, drawn without a display (Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, 2, figsize=(11, 3.8))


def _save(fig: Any, axes: Any, path: Path) -> Path:
    """Rotate the time axis, add legends, write the PNG and free the figure."""
    import matplotlib.pyplot as plt

    for ax in axes:
        ax.tick_params(axis="x", rotation=30)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_quality(series: list[dict], path: Path) -> Path | None:
    """Online AUC and observed/predicted CTR per time window, one line per scenario (and "all")."""
    if not series:
        return None
    frame = pd.DataFrame(series)
    frame["start"] = pd.to_datetime(frame["start"])
    frame["line"] = [sc if m == "all" else f"model {m}" for sc, m in zip(frame["scenario"], frame.get("model", pd.Series("all", index=frame.index)))]
    fig, axes = _two_panels()
    for name, g in frame.groupby("line"):
        style = {"linewidth": 2.5, "color": "black"} if name == "all" else {}
        axes[0].plot(g["start"], g["auc"].astype(float), marker="o", label=name, **style)
        axes[1].plot(g["start"], g["ratio"].astype(float), marker="o", label=name, **style)
    axes[0].set_title("online AUC per window")
    axes[1].set_title("observed / predicted CTR per window")
    axes[1].axhline(1.0, color="grey", linestyle=":")
    return _save(fig, axes, path)


def plot_history(history: list[dict], path: Path) -> Path | None:
    """Drifted share and online AUC per run (per scenario), over every run in the history."""
    if not history:
        return None
    fig, axes = _two_panels()
    x = pd.to_datetime([h["run_at"] for h in history])
    names = sorted({k for h in history for k in h.get("scenarios", {})})
    axes[0].plot(x, [h.get("drifted_share") for h in history], marker="o", color="black", linewidth=2.5, label="all")
    axes[1].plot(x, [h.get("online_auc") for h in history], marker="o", color="black", linewidth=2.5, label="all")
    for n in names:
        axes[0].plot(x, [h.get("scenarios", {}).get(n, {}).get("drifted_share") for h in history], marker="o", label=n)
        axes[1].plot(x, [h.get("scenarios", {}).get(n, {}).get("online_auc") for h in history], marker="o", label=n)
    axes[0].set_title("drifted feature share per run")
    axes[1].set_title("online AUC per run")
    return _save(fig, axes, path)


def _img(path: Path | None, alt: str) -> str:
    if path is None or not path.exists():
        return f"<p><em>{html.escape(alt)}: no data yet</em></p>"
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _table(table_id: str, header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{c if isinstance(c, _Raw) else html.escape(_cell(c))}</td>" for c in r) + "</tr>" for r in rows
    )
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


class _Raw(str):
    """Trusted HTML (a link we built)."""


def _cell(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4f}"
    if isinstance(v, list):
        return ", ".join(map(str, v)) or "-"
    return str(v)


def write_report(run: Any, out_dir: Path, history: list[dict]) -> Path:
    """The on-call page (module docstring); returns its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    d, q = run.drift, run.quality
    quality_png = plot_quality(q.series if q is not None else [], out_dir / QUALITY_PNG)
    history_png = plot_history(history, out_dir / HISTORY_PNG)

    def link(p: str | None) -> Any:
        if not p:
            return "-"
        rel = Path(p).resolve().relative_to(out_dir.resolve()) if Path(p).resolve().is_relative_to(out_dir.resolve()) else Path(p)
        return _Raw(f'<a href="{html.escape(str(rel))}">Evidently</a>')

    drift_rows = [["all", d.overall.verdict, d.overall.n_reference, d.overall.n_current, d.drifted_features,
                   None if d.prediction_drift is None else d.prediction_drift["status"],
                   (d.overall.reasons or d.overall.notes or [""])[0], link(d.overall.html_path)]]  # fmt: skip
    for row in d.scenario_table():
        drift_rows.append([row["scenario"], row["verdict"], row["n_reference"], row["n_current"], row["drifted_features"],
                           row["prediction_drift"], row["reason"], link(row["html"])])  # fmt: skip
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>ctrflow monitoring</title>",
        "<style>body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;margin:.5em 0 1.5em}"
        "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}th{background:#eee}"
        ".breached{color:#b00;font-weight:bold}.ok{color:#070}.not_enough_data{color:#a60}</style></head><body>",
        f"<h1>ctrflow monitoring: <span id='verdict' class='{run.verdict}'>{html.escape(run.verdict)}</span></h1>",
        f"<p>run at {html.escape(run.run_at)}; exit code {run.exit_code}</p>",
        "<ul id='reasons'>" + "".join(f"<li>{html.escape(r)}</li>" for r in run.reasons) + "</ul>",
        "<h2>Drift by scenario</h2>",
        _table("scenario-table", ["scenario", "verdict", "reference rows", "current rows", "drifted features",
                                  "prediction drift", "first reason / note", "report"], drift_rows),  # fmt: skip
    ]
    if q is not None:
        groups = [["all", q.overall]] + [[f"scenario {k}", g] for k, g in q.by_scenario.items()]
        groups += [[f"model {k}", g] for k, g in q.by_model.items()]
        parts += [
            "<h2>Online quality</h2>",
            f"<p>{q.join['labelled']:,} labelled of {q.join['served']:,} served rows, {q.join['clicked']:,} clicks, "
            f"{q.join['pending']:,} pending (attribution window open), {q.join['late_clicks']:,} late and "
            f"{q.join['unmatched_clicks']:,} unmatched clicks.</p>",
            _table("quality-table", ["group", "verdict", "labelled rows", "clicks", "online AUC", "predicted CTR", "observed CTR", "observed/predicted"],
                   [[n, g["verdict"], g["n"], g["clicks"], g["auc"], g["predicted_ctr"], g["observed_ctr"], g["ratio"]] for n, g in groups]),  # fmt: skip
        ]
        if q.shadow:
            parts.append(_table("shadow-table", ["scope", "rows", "served AUC", "shadow AUC", "difference"],
                                [[k, v["n"], v["served_auc"], v["shadow_auc"], v["auc_difference"]]
                                 for k, v in [("all", q.shadow["overall"]), *q.shadow["by_scenario"].items()]]))  # fmt: skip
        parts += [
            "<h2 id='series'>Series over time windows</h2>",
            _img(quality_png, "online AUC and calibration per window"),
            _table("series-table", ["window start", "scenario", "model", "verdict", "rows", "online AUC", "observed/predicted"],
                   [[s["start"], s["scenario"], s.get("model", "all"), s["verdict"], s["n"], s["auc"], s["ratio"]] for s in q.series]),  # fmt: skip
        ]
    parts += [
        "<h2 id='history'>Over runs</h2>",
        _img(history_png, "drift and online AUC per run"),
        _table("history-table", ["run at", "verdict", "drifted share", "online AUC"],
               [[h["run_at"], h["verdict"], h.get("drifted_share"), h.get("online_auc")] for h in history]),  # fmt: skip
        "</body></html>",
    ]
    path = out_dir / REPORT_NAME
    path.write_text("\n".join(parts))
    return path


def quality_snapshot(joined: pd.DataFrame, timestamp: Any) -> Any:
    """An Evidently snapshot of the labelled rows: ROC AUC, mean click (observed CTR), mean score (predicted CTR)."""
    from evidently import BinaryClassification, DataDefinition, Dataset, Report
    from evidently.metrics import MeanValue, RocAuc, RowCount

    from ctrflow.monitoring.drift import _naive_utc

    frame = joined[["clicked", "prediction"]].astype({"clicked": "int64", "prediction": "float64"})
    definition = DataDefinition(
        numerical_columns=["clicked", "prediction"],
        classification=[BinaryClassification(target="clicked", prediction_probas="prediction")],
    )
    metrics: list = [RowCount(), MeanValue(column="clicked"), MeanValue(column="prediction")]
    if frame["clicked"].nunique() == 2:
        metrics.insert(0, RocAuc())
    return Report(metrics).run(
        Dataset.from_pandas(frame, data_definition=definition), None, timestamp=_naive_utc(timestamp), name="online quality"
    )


def add_to_workspace(path: str | Path, project_name: str, snapshots: list[tuple[str, Any]]) -> dict:
    """Add named snapshots to the workspace project (created on first use); returns their ids."""
    from evidently.ui.workspace import Workspace

    ws = Workspace.create(str(path))
    found = ws.search_project(project_name)
    if found:
        project = found[0]
    else:
        project = ws.create_project(project_name, description="ctrflow monitoring: drift and online quality per run")
        _add_panels(project)
    ids = {}
    for name, snapshot in snapshots:
        ref = ws.add_run(project.id, snapshot, name=name)
        ids[name] = str(getattr(ref, "id", ref))
    return {"workspace": str(path), "project_id": str(project.id), "snapshots": ids}


def _add_panels(project: Any) -> None:
    """The project's dashboard in `evidently ui`: online AUC, observed vs predicted CTR, and drift scores over runs.

    Panels go to the first tab (`tab=None`): evidently 0.7.23's `add_panel(tab="name")` lists a panel twice in an
    existing named tab."""
    from evidently.sdk.models import PanelMetric
    from evidently.sdk.panels import line_plot_panel

    dashboard = project.dashboard
    dashboard.add_panel(line_plot_panel("online AUC", [PanelMetric(legend="online AUC", metric="RocAuc")], size="half"))
    dashboard.add_panel(
        line_plot_panel("observed vs predicted CTR", [
            PanelMetric(legend="observed CTR", metric="MeanValue", metric_labels={"column": "clicked"}),
            PanelMetric(legend="predicted CTR", metric="MeanValue", metric_labels={"column": "prediction"}),
        ], size="half"),
    )  # fmt: skip
    dashboard.add_panel(
        line_plot_panel("value drift score per column (p-value or distance)", [PanelMetric(legend="drift score", metric="ValueDrift")])
    )
    dashboard.add_panel(
        line_plot_panel("missing values per column (share)", [PanelMetric(legend="missing share", metric="MissingValueCount", view_params={"type": "share"})])
    )
