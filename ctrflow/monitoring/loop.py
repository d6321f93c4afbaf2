"""The loop back to training: drift + online quality -> one verdict -> a retraining request (and a submitted run).

`monitor_run` is `ctrflow monitor run`; the scheduled monitoring pipeline (pipelines/monitoring.py) runs the same
three pieces as tasks (`drift_step`, `quality_step`, `decide`), passing the summaries as JSON artifacts.

Verdict of a run: ``breached`` (exit 1) when drift or online quality breached (overall or in one scenario);
``not_enough_data`` (exit 3) when drift had not enough data and quality was not run or had not enough labelled rows
either; else ``ok`` (exit 0). On a breach with ``monitoring.retrain_on_breach``, a retraining request is written:
``retraining_request.json`` (what breached, where, the inputs, the report); with ``monitoring.submit_training`` and
``monitoring.kfp_host`` the training pipeline is also submitted to Kubeflow and the run id recorded in the request
(a failed submission is recorded there too: the request stays for a person to act on).
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctrflow.config import section
from ctrflow.monitoring.drift import BREACHED, EXIT_CODES, NOT_ENOUGH_DATA, OK

REQUEST_NAME = "retraining_request.json"


@dataclass
class Decision:
    """The verdict of one monitoring run, and what it set in motion."""

    verdict: str
    reasons: list[str]
    breached_scenarios: list[str]
    request_path: Path | None = None
    submitted: dict | None = None

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.verdict]


@dataclass
class MonitorRun:
    """`monitor_run`'s outcome: the decision, the drift and quality results, and the page for people."""

    run_at: str
    decision: Decision
    drift: Any  # DriftResult
    quality: Any | None  # QualityResult
    report_path: Path | None = None
    workspace: dict | None = None

    @property
    def verdict(self) -> str:
        return self.decision.verdict

    @property
    def reasons(self) -> list[str]:
        return self.decision.reasons

    @property
    def exit_code(self) -> int:
        return self.decision.exit_code

    def summary(self) -> str:
        label = {OK: "ok", BREACHED: "BREACHED", NOT_ENOUGH_DATA: "NOT ENOUGH DATA"}[self.verdict]
        lines = [f"monitor run: {label} (exit {self.exit_code})", self.drift.summary()]
        if self.quality is not None:
            lines.append(self.quality.summary())
        if self.decision.breached_scenarios:
            lines.append(f"breached scenarios: {', '.join(self.decision.breached_scenarios)}")
        if self.decision.request_path is not None:
            lines.append(f"retraining request: {self.decision.request_path}")
        if self.decision.submitted is not None:
            lines.append(f"training pipeline submitted: {json.dumps(self.decision.submitted)}")
        if self.report_path is not None:
            lines.append(f"report: {self.report_path}")
        return "\n".join(lines)


def decide(
    params: dict[str, Any],
    drift: dict,
    quality: dict | None,
    out_dir: str | Path,
    *,
    inputs: dict[str, Any] | None = None,
    run_at: str | None = None,
    submit_fn: Any = None,
) -> Decision:
    """One verdict from the drift and quality summaries (their `to_dict()`), and the retraining request on a breach.

    `submit_fn(host, params, feature_repo)` submits the training pipeline (default: `pipelines.runner.submit`)."""
    m = section(params, "monitoring")
    reasons = [f"drift: {r}" for r in drift.get("reasons", [])]
    scenarios = [k for k, p in drift.get("scenarios", {}).items() if p.get("verdict") == BREACHED]
    if quality is not None:
        reasons += [f"online quality: {r}" for r in quality.get("reasons", [])]
        scenarios += [k for k, g in quality.get("by_scenario", {}).items() if g.get("verdict") == BREACHED and k not in scenarios]
    if reasons:
        verdict = BREACHED
    elif drift.get("verdict") == NOT_ENOUGH_DATA and (quality is None or quality.get("verdict") == NOT_ENOUGH_DATA):
        verdict = NOT_ENOUGH_DATA
    else:
        verdict = OK
    decision = Decision(verdict, reasons, sorted(scenarios))
    if verdict != BREACHED or not m.retrain_on_breach:
        return decision
    request: dict[str, Any] = {
        "kind": "ctrflow.retraining_request",
        "requested_at": run_at or _now(),
        "reasons": reasons,
        "breached_scenarios": decision.breached_scenarios,
        "drift_verdict": drift.get("verdict"),
        "quality_verdict": None if quality is None else quality.get("verdict"),
        "inputs": inputs or {},
        "submitted": None,
    }
    if m.submit_training:
        if not m.kfp_host or not m.feature_repo:
            request["submit_error"] = "monitoring.submit_training is set but monitoring.kfp_host or monitoring.feature_repo is null"
        else:
            if submit_fn is None:
                from pipelines.runner import submit as submit_fn
            try:
                request["submitted"] = {"host": m.kfp_host, **submit_fn(m.kfp_host, params, m.feature_repo)}
            except Exception as exc:  # noqa: BLE001 - the request must be written whatever Kubeflow answers
                request["submit_error"] = f"{type(exc).__name__}: {exc}"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    decision.request_path = out / REQUEST_NAME
    decision.request_path.write_text(json.dumps(request, indent=2, default=str))
    decision.submitted = request["submitted"]
    return decision


def monitor_run(
    params: dict[str, Any],
    training_set: str | Path,
    current: str | Path,
    out_dir: str | Path,
    *,
    labels: str | Path | None = None,
    model_dir: str | Path | None = None,
    run_at: str | None = None,
    submit_fn: Any = None,
) -> MonitorRun:
    """Drift (into `out_dir/drift`), online quality when a label feed is given (`out_dir/quality`), the decision, the
    on-call page (`out_dir/monitor_report.html` + PNGs), the history and the Evidently workspace snapshots."""
    from ctrflow.monitoring import report
    from ctrflow.steps import drift_step, quality_step

    out = Path(out_dir)
    run_at = run_at or _now()
    stamp = dt.datetime.fromisoformat(run_at)
    drift = drift_step(params, training_set, current, out / "drift", model_dir=model_dir, timestamp=stamp)
    quality = quality_step(params, current, labels, out / "quality") if labels is not None else None
    inputs = {"training_set": str(training_set), "current": str(current), "labels": None if labels is None else str(labels),
              "model_dir": None if model_dir is None else str(model_dir), "report": str(out / report.REPORT_NAME)}  # fmt: skip
    decision = decide(params, drift.to_dict(), None if quality is None else quality.to_dict(), out, inputs=inputs, run_at=run_at, submit_fn=submit_fn)
    run = MonitorRun(run_at, decision, drift, quality)
    m = section(params, "monitoring")
    history_dir = Path(m.workspace) if m.workspace else out
    history = report.append_history(history_dir / report.HISTORY_NAME, report.history_record(run))
    run.report_path = report.write_report(run, out, history)
    if m.workspace:
        snapshots = [("drift", drift.snapshot)] if drift.snapshot is not None else []
        if quality is not None and quality.summary_path is not None:
            import pandas as pd

            joined = pd.read_parquet(quality.summary_path.parent / "labelled_requests.parquet")
            if len(joined):
                snapshots.append(("online quality", report.quality_snapshot(joined, stamp)))
        run.workspace = report.add_to_workspace(m.workspace, m.project, snapshots)
    (out / "monitor_run.json").write_text(json.dumps({
        "run_at": run_at, "verdict": run.verdict, "exit_code": run.exit_code, "reasons": run.reasons,
        "breached_scenarios": decision.breached_scenarios,
        "retraining_request": None if decision.request_path is None else str(decision.request_path),
        "submitted": decision.submitted, "report": str(run.report_path), "workspace": run.workspace,
        "drift_summary": str(drift.summary_path), "quality_summary": None if quality is None else str(quality.summary_path),
    }, indent=2, default=str))  # fmt: skip
    return run


def drift_page(drift: Any, out_dir: str | Path) -> Path:
    """The on-call page (`monitor_report.html`: verdict, scenario table, links) of a drift check run on its own."""
    from ctrflow.monitoring import report

    breached = sorted(k for k, p in drift.scenarios.items() if p.verdict == BREACHED)
    run = MonitorRun(_now(), Decision(drift.verdict, list(drift.reasons), breached), drift, None)
    return report.write_report(run, Path(out_dir), [])


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
