"""The loop: `ctrflow monitor run` on a replayed incident and on quiet traffic, the retraining request, the submission,
the on-call page, the history and the Evidently workspace.

Synthetic traffic through the real request log (`RequestLogger`), a real label feed, real Evidently.
Incident: in scenario 'home' the item feature `price` stops arriving; in scenario 'search' the click rate drops to
40% of what the model predicts. Each must be caught in its own scenario, and only there.
"""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from ctrflow.cli import cli
from ctrflow.data.spec import FeatureSpec, FieldSpec
from ctrflow.monitoring.loop import REQUEST_NAME, decide, monitor_run
from ctrflow.request_log import RequestLogger

SPEC = FeatureSpec(
    fields=[
        FieldSpec("user_id", "categorical", "user", large=True),
        FieldSpec("item_id", "categorical", "item", large=True),
        FieldSpec("gender", "categorical", "user"),
        FieldSpec("price", "numeric", "item", buckets=4),
    ],
    scenarios=["home", "search"],
)
T0 = pd.Timestamp("2026-03-01", tz="UTC")
SCENARIOS = ("home", "search")


def features(n: int, rng: np.random.Generator) -> pd.DataFrame:
    return pd.DataFrame({
        "user_id": rng.integers(1, 300, n), "item_id": rng.choice(np.arange(1, 201), n, replace=n > 200),  # a request never shows an item twice
        "gender": rng.choice(["F", "M"], n), "price": rng.uniform(1, 100, n).round(2),
    })  # fmt: skip


def score(frame: pd.DataFrame) -> np.ndarray:
    """The served model: cheap items and 'F' users click more (a fixed, calibrated-by-construction CTR)."""
    return (0.05 + 0.25 * (1 - frame["price"].fillna(50) / 100) + 0.05 * (frame["gender"] == "F")).to_numpy()


def training_set(tmp: Path) -> Path:
    rng = np.random.default_rng(0)
    frame = pd.concat([features(1500, rng).assign(scenario=s) for s in SCENARIOS], ignore_index=True)
    frame = frame.assign(label=0, split="train")
    ts = tmp / "training_set"
    ts.mkdir()
    frame.to_parquet(ts / "frame.parquet")
    SPEC.save(ts / "spec.json")
    return ts


def traffic(tmp: Path, *, incident: bool, seed: int) -> tuple[Path, Path]:
    """20 requests of 30 candidates per scenario per hour for 2 hours through the real request log; the label feed
    with the clicks drawn from the served score (x0.4 in 'search' during the incident), 5 minutes after serving."""
    rng = np.random.default_rng(seed)
    log_dir, clicks = tmp / f"log-{seed}", []
    with RequestLogger(log_dir, flush_rows=500) as log:
        for hour in range(2):
            for s in SCENARIOS:
                for r in range(20):
                    f = features(30, rng)
                    if incident and s == "home":
                        f["price"] = np.nan  # the item feature stopped arriving in 'home'
                    p = score(f)
                    ts = T0 + pd.Timedelta(hours=hour, minutes=r)
                    rid = f"{s}-{hour}-{r}"
                    log.log_request(request_id=rid, user_id=int(f["user_id"].iloc[0]), scenario=s, model="m1",
                                    features=f[["gender", "price"]], item_ids=f["item_id"].tolist(), predictions=p, ts=ts.to_pydatetime())  # fmt: skip
                    rate = p * (0.4 if incident and s == "search" else 1.0)
                    for item in f["item_id"][rng.uniform(size=30) < rate]:
                        clicks.append({"request_id": rid, "item_id": int(item), "clicked": 1, "timestamp": ts + pd.Timedelta(minutes=5)})
    clicks.append({"request_id": "feed-horizon", "item_id": 0, "clicked": 0, "timestamp": T0 + pd.Timedelta(hours=6)})
    labels = tmp / f"labels-{seed}.parquet"
    pd.DataFrame(clicks).astype({"item_id": "int64"}).to_parquet(labels)
    return log_dir, labels


def params(tmp: Path, **monitoring) -> dict:
    return {"monitoring": {"workspace": str(tmp / "ws"), **monitoring}, "quality": {"time_window": "1h"}}


@pytest.fixture(scope="module")
def incident(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("incident")
    ts = training_set(tmp)
    log_dir, labels = traffic(tmp, incident=True, seed=1)
    submitted = []

    def fake_submit(host, params, feature_repo):  # the Kubeflow API: the only part not real here
        submitted.append((host, feature_repo))
        return {"run_id": "run-1"}

    p = params(tmp, submit_training=True, kfp_host="http://kfp.example", feature_repo="s3://repo")
    run = monitor_run(p, ts, log_dir, tmp / "out", labels=labels, run_at="2026-03-01T08:00:00+00:00", submit_fn=fake_submit)
    return run, tmp, submitted


def test_replayed_incident_is_caught_in_the_right_scenarios(incident):
    run, tmp, submitted = incident
    assert run.verdict == "breached" and run.exit_code == 1
    d, q = run.drift, run.quality
    assert d.scenarios["home"].verdict == "breached" and d.scenarios["search"].verdict == "ok"
    assert d.scenarios["home"].drifted_features == ["price"]
    assert d.scenarios["home"].per_feature["price"]["missing"]["current_share"] == 1.0
    assert q.by_scenario["search"]["verdict"] == "breached" and q.by_scenario["home"]["verdict"] == "ok"
    assert 0.3 < q.by_scenario["search"]["ratio"] < 0.5  # the click rate is 40% of the prediction
    assert run.decision.breached_scenarios == ["home", "search"]
    assert any(r.startswith("drift: scenario 'home': feature 'price' missing in 100.0%") for r in run.reasons)
    assert any(r.startswith("online quality: scenario 'search': observed CTR") for r in run.reasons)
    assert not any("scenario 'search'" in r for r in run.reasons if r.startswith("drift:"))
    assert not any("scenario 'home'" in r for r in run.reasons if r.startswith("online quality:"))


def test_incident_writes_a_retraining_request_and_submits_training(incident):
    run, tmp, submitted = incident
    request = json.loads((tmp / "out" / REQUEST_NAME).read_text())
    assert request["kind"] == "ctrflow.retraining_request" and request["requested_at"] == "2026-03-01T08:00:00+00:00"
    assert request["breached_scenarios"] == ["home", "search"] and request["reasons"] == run.reasons
    assert request["submitted"] == {"host": "http://kfp.example", "run_id": "run-1"}
    assert submitted == [("http://kfp.example", "s3://repo")]
    assert request["inputs"]["labels"].endswith("labels-1.parquet")


class _Page(HTMLParser):
    """What a browser would show: table ids, their rows, images."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.images: list[str] = []
        self._table: str | None = None
        self._row: list[str] | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self._table = a.get("id")
            self.tables[self._table] = []
        elif tag == "tr" and self._table:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []
        elif tag == "img":
            self.images.append(a.get("alt", ""))

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.tables[self._table].append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def test_the_on_call_page_shows_the_scenario_table_and_the_series(incident):
    run, tmp, _ = incident
    page = _Page()
    page.feed(run.report_path.read_text())
    rows = {r[0]: r for r in page.tables["scenario-table"][1:]}
    assert rows["home"][1] == "breached" and rows["home"][4] == "price" and rows["search"][1] == "ok"
    quality = {r[0]: r for r in page.tables["quality-table"][1:]}
    assert quality["scenario search"][1] == "breached"
    series = page.tables["series-table"][1:]
    assert {(r[0][:13], r[1]) for r in series} >= {("2026-03-01 00", "search"), ("2026-03-01 01", "search")}
    assert "online AUC and calibration per window" in page.images and "drift and online AUC per run" in page.images
    for png in ("quality_over_time.png", "history.png"):
        assert (tmp / "out" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp / "out" / "drift" / "scenarios" / "home" / "drift_report.html").exists()


def test_each_run_is_a_snapshot_in_the_evidently_workspace(incident):
    from evidently.ui.workspace import Workspace

    run, tmp, _ = incident
    ws = Workspace(str(tmp / "ws"))
    (project,) = ws.search_project("ctrflow")
    assert len(ws.list_runs(project.id)) == 2  # the drift and the online-quality snapshots of this run
    assert set(run.workspace["snapshots"]) == {"drift", "online quality"}
    model = project.dashboard.model()
    (tab,) = model.tabs
    assert len(tab.panels) == len(set(tab.panels)) == len(model.panels) == 4  # each panel once
    assert {"online AUC", "observed vs predicted CTR"} <= {p.title for p in model.panels}
    snapshot = ws.get_run(project.id, run.workspace["snapshots"]["online quality"])
    metrics = json.dumps(snapshot.model_dump(mode="json") if hasattr(snapshot, "model_dump") else snapshot.dict(), default=str)
    assert "RocAuc" in metrics
    history = [json.loads(x) for x in (tmp / "ws" / "history.jsonl").read_text().splitlines()]
    assert history[-1]["verdict"] == "breached" and history[-1]["scenarios"]["search"]["online_auc"] is not None


def test_quiet_traffic_exits_0_and_requests_nothing(tmp_path):
    ts = training_set(tmp_path)
    log_dir, labels = traffic(tmp_path, incident=False, seed=2)
    out = CliRunner().invoke(cli, [
        "--set", f"monitoring.workspace={tmp_path / 'ws'}", "--set", "quality.time_window=1h",
        "monitor", "run", "--training-set", str(ts), "--current", str(log_dir), "--labels", str(labels), "--out", str(tmp_path / "out"),
    ])  # fmt: skip
    assert out.exit_code == 0, out.output
    assert "monitor run: ok (exit 0)" in out.output
    assert not (tmp_path / "out" / REQUEST_NAME).exists()
    summary = json.loads((tmp_path / "out" / "monitor_run.json").read_text())
    assert summary["verdict"] == "ok" and summary["retraining_request"] is None


def test_decide_records_a_failed_submission_and_keeps_the_request(tmp_path):
    def down(*_):
        raise ConnectionError("kfp unreachable")

    drift = {"verdict": "breached", "reasons": ["x"], "scenarios": {}}
    p = {"monitoring": {"submit_training": True, "kfp_host": "http://kfp", "feature_repo": "r"}}
    d = decide(p, drift, None, tmp_path, submit_fn=down)
    request = json.loads(d.request_path.read_text())
    assert d.exit_code == 1 and request["submitted"] is None and request["submit_error"] == "ConnectionError: kfp unreachable"
    d = decide({"monitoring": {"retrain_on_breach": False}}, drift, None, tmp_path / "no")
    assert d.request_path is None and not (tmp_path / "no").exists()
    d = decide({}, {"verdict": "not_enough_data", "reasons": []}, {"verdict": "not_enough_data", "reasons": []}, tmp_path)
    assert d.verdict == "not_enough_data" and d.exit_code == 3


def test_evidently_ui_series_shows_online_auc_over_days(tmp_path):
    """What `evidently ui --workspace` plots: the RocAuc series over the runs' dates, read through its own storage."""
    import asyncio

    from evidently.ui.service.base import SeriesFilter
    from evidently.ui.service.storage.common import NoopAuthManager
    from evidently.ui.workspace import Workspace, create_local_project_manager

    ts = training_set(tmp_path)
    aucs = []
    for day, incident in ((1, False), (2, True)):
        log_dir, labels = traffic(tmp_path, incident=incident, seed=20 + day)
        run = monitor_run(params(tmp_path), ts, log_dir, tmp_path / f"out{day}", labels=labels, run_at=f"2026-03-0{day}T08:00:00+00:00")
        aucs.append(run.quality.overall["auc"])
    project_id = Workspace(str(tmp_path / "ws")).search_project("ctrflow")[0].id
    storage = create_local_project_manager(str(tmp_path / "ws"), False, NoopAuthManager()).data_storage
    auc = SeriesFilter(tags=[], metadata={}, metric="evidently:metric_v2:RocAuc", metric_labels={})
    response = asyncio.run(storage.get_data_series(project_id, [auc], None, None))
    assert [s.timestamp.isoformat() for s in response.sources] == ["2026-03-01T08:00:00", "2026-03-02T08:00:00"]
    (series,) = response.series
    assert series.values == pytest.approx(aucs)  # Evidently's ROC AUC per run = ours
    history = [json.loads(x) for x in (tmp_path / "ws" / "history.jsonl").read_text().splitlines()]
    assert [h["verdict"] for h in history] == ["ok", "breached"]
