"""`make run`: the whole product once, on the embedded default, with every result's location printed."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("ctrflow")


def demo_requests(training_set_dir: str | Path, n_requests: int, candidates: int = 100, seed: int = 0) -> list[dict[str, Any]]:
    """Rank requests shaped like production traffic: test-period users, their test items among random others.

    The last request uses an unknown user and an unknown item to show the fallback path.
    """
    from ctrflow.steps import load_training_set

    frame, _ = load_training_set(training_set_dir)
    rng = np.random.default_rng(seed)
    test = frame[frame["split"] == "test"]
    all_items = frame["item_id"].unique()
    requests = []
    for (user_id, scenario), rows in list(test.groupby(["user_id", "scenario"], sort=False))[: max(n_requests - 1, 1)]:
        own = rows["item_id"].unique()[:candidates]
        others = rng.choice(all_items, size=max(candidates - len(own), 0), replace=False)
        items = list(dict.fromkeys([*own.tolist(), *others.tolist()]))[:candidates]
        requests.append({"user_id": int(user_id), "scenario": str(scenario), "item_ids": [int(i) for i in items]})
    unknown_user = int(frame["user_id"].max()) + 1000
    unknown_item = int(frame["item_id"].max()) + 1000
    requests.append({"user_id": unknown_user, "scenario": requests[0]["scenario"], "item_ids": [unknown_item, *requests[0]["item_ids"][:9]]})
    return requests


def run_everything(params: dict[str, Any], workdir: Path, n_requests: int = 200) -> str:
    """The training pipeline, then (only when its gate passed) the new model served and the drift report; returns the
    summary. Raises `registry.GateFailedError` (its message: the summary, the gate's reasons and both models'
    metrics) when the gate fails: nothing new is deployed and nothing is served."""
    from ctrflow import registry
    from ctrflow.guard import guard_env
    from ctrflow.server import auth_headers, rank, start_server
    from ctrflow.steps import drift_step, use_bentoml_home
    from pipelines.runner import compile_pipeline, run_training_local

    logging.getLogger("httpx").setLevel(logging.WARNING)
    workdir = workdir.resolve()
    use_bentoml_home(params)
    t0 = time.monotonic()
    run = run_training_local(params, workdir)
    lines = [f"pipeline (KFP local runner) finished in {time.monotonic() - t0:.0f}s; run record: {workdir / 'run.json'}"]
    lines.append(f"GX validation report:   {run['validation_report_html']}")
    lines.append(f"GX validation results:  {run['validation_report_json']}")
    lines.append(f"Feast repo:             {run['feature_repo']}")
    lines.append(f"registered model:       {run['model_tag']} (gate {'passed' if run['gate_passed'] else 'failed'})")
    ir = compile_pipeline("training", workdir / "training_pipeline.yaml", run["family"], params)
    lines.append(f"pipeline IR YAML:       {ir}")

    gate = run.get("gate") or {}
    if not run["gate_passed"] or not run.get("deployment"):
        # never fall back to whatever production model the store holds: it may be of another data set, and this
        # run's feature repository was rebuilt for this data set
        lines.append("GATE FAILED: the candidate was not promoted; nothing new is deployed and nothing is served")
        lines.append(gate.get("summary") or f"(no gate decision recorded for {run['model_tag']})")
        if run.get("removed_stale_deployment"):
            lines.append(f"removed the stale {run['removed_stale_deployment']} (it served this workdir's old feature repository)")
        raise registry.GateFailedError("\n".join(lines))
    lines.append(gate.get("summary", ""))
    deployment = json.loads(Path(run["deployment"]).read_text())
    (workdir / "deployment.json").write_text(json.dumps(deployment, indent=2))

    request_log = workdir / "request_log"
    s = params["serving"]
    requests = demo_requests(run["training_set"], n_requests)
    headers = auth_headers(s)
    with start_server(
        deployment, request_log, host=s["host"], port=s["port"], workers=s["workers"], threads=s["threads"],
        item_cache_refresh_s=s["item_cache_refresh_s"],
        request_log_compaction=s["request_log_compaction"], request_log_flush_rows=s["request_log_flush_rows"],
        request_log_flush_seconds=s["request_log_flush_seconds"], extra_env=guard_env(s),
    ) as server:
        latencies = []
        first = None
        for req in requests:
            t = time.perf_counter()
            answer = rank(server.url, **req, headers=headers)
            latencies.append((time.perf_counter() - t) * 1000)
            first = first or answer
        url = server.url
    top = ", ".join(f"{i['item_id']}:{i['score']:.3f}" for i in first["items"][:5])
    lines.append(f"service that answered:  {url}/rank ({len(requests)} requests, p50 {np.median(latencies):.1f} ms; model {first['model']})")
    lines.append(f"  e.g. user {requests[0]['user_id']} ({requests[0]['scenario']}): top 5 {top}")
    lines.append(f"request log:            {request_log}")

    drift = drift_step(params, run["training_set"], request_log, workdir / "reports" / "drift", model_dir=run["model_dir"])
    lines.append(f"drift report (HTML):    {drift.html_path}")
    lines.append(f"drift report (JSON):    {drift.json_path}")
    verdict = {"breached": "BREACHED: " + "; ".join(drift.reasons), "ok": "within thresholds", "not_enough_data": "not enough data to test"}
    lines.append(f"drift verdict:          {verdict[drift.verdict]}")
    summary = "\n".join(lines)
    (workdir / "summary.txt").write_text(summary + "\n")
    return summary
