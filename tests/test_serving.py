"""The ranking service end to end: features in Feast, a trained model promoted in a real BentoML store, a real
`bentoml serve` process on localhost, HTTP calls, and the request log it writes."""

from __future__ import annotations

import os
import time

import httpx
import numpy as np
import pandas as pd
import pytest
import torch

from ctrflow.local_services import ONLINE_STORES, use_production_stores
from ctrflow.server import start_server

MODEL_NAME = "ctrflow-ranker"
READY_TIMEOUT_S = 90.0



@pytest.fixture(scope="module")
def deployment(tmp_path_factory, tiny_dataset, tiny_frame):
    """Feature repo applied and materialized, a tiny DCNv2 trained, registered and promoted in a temp store."""
    from ctrflow import features, registry
    from ctrflow.data.encoding import FeatureEncoder
    from ctrflow.data.splits import make_split
    from ctrflow.models import build_model
    from ctrflow.models.base import to_tensors
    from ctrflow.training.artifact import save_model_artifact
    from ctrflow.training.metrics import evaluate
    from ctrflow.training.trainer import TrainConfig, Trainer

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("serving")
    saved_home = os.environ.get("BENTOML_HOME")
    os.environ["BENTOML_HOME"] = str(root / "bentoml")
    try:
        repo = features.copy_repo(root / "repo")
        features.write_feature_tables(tiny_dataset, repo / "data")
        store = features.apply_repo(repo, repo / "data")
        features.materialize(store)

        frame = tiny_frame.copy()
        frame["split"] = make_split(tiny_dataset.interactions, "temporal", seed=0).to_numpy()
        parts = {s: frame[frame["split"] == s] for s in ("train", "valid", "test")}
        encoder = FeatureEncoder(tiny_dataset.spec).fit(parts["train"])
        tensors = {s: to_tensors(encoder.transform(p)) for s, p in parts.items()}
        params = {"embedding_dim": 8, "cross_layers": 1, "mlp": [32], "dropout": 0.0}
        model = build_model("dcnv2", encoder, params)
        Trainer(model, TrainConfig(epochs=1, batch_size=512, threads=1, progress=False)).fit(tensors["train"], tensors["valid"])
        metrics = {s: evaluate(model, tensors[s], encoder) for s in ("valid", "test")}
        artifact = save_model_artifact(root / "model", model, encoder, metrics, {"model": "dcnv2", **params})

        tag = registry.register_model(
            artifact,
            MODEL_NAME,
            metrics=metrics,
            params={"model": "dcnv2", **params},
            feature_spec=tiny_dataset.spec,
            data_fingerprint=registry.data_fingerprint(tiny_frame),
            code_version=registry.code_version(),
        )
        registry.promote(tag, reason="serving test", force=True)
        yield {"root": root, "repo": repo, "store": store, "tag": tag, "frame": frame, "bentoml_home": root / "bentoml"}
    finally:
        if saved_home is None:
            os.environ.pop("BENTOML_HOME", None)
        else:
            os.environ["BENTOML_HOME"] = saved_home


@pytest.fixture(scope="module", params=ONLINE_STORES)
def server(request, deployment, online_repo):
    """A real `bentoml serve` subprocess (default model = the registry's production one) reading its features from
    the SQLite or the Redis online store (one parameter; Redis as in production: with the SQL registry on
    PostgreSQL, so serving reads its feature views through that registry); always terminated."""
    from ctrflow import features

    repo, store = deployment["repo"], deployment["store"]
    if request.param != "sqlite":  # the same feature tables, applied and materialized into the other online store
        repo = online_repo(features.copy_repo(deployment["root"] / f"repo-{request.param}"), request.param)
        request.getfixturevalue("pg_registry")
        use_production_stores(repo, "registry")
        store = features.apply_repo(repo, deployment["repo"] / "data")
        features.materialize(store)
    log_dir = deployment["root"] / f"request_log-{request.param}"
    served = {"bentoml_home": deployment["bentoml_home"], "feature_repo": repo, "model_name": MODEL_NAME}
    try:
        running = start_server(
            served,
            log_dir,
            log_path=deployment["root"] / f"server-{request.param}.log",
            ready_timeout=READY_TIMEOUT_S,
            extra_env={"CTRFLOW_REQUEST_LOG_FLUSH_SECONDS": "0.5"},
        )
    except (RuntimeError, TimeoutError) as exc:
        pytest.fail(str(exc))
    with running:
        yield {"url": running.url, "proc": running.process, "log_dir": log_dir, "server_log": running.log_path,
               "store": store}


def _rank(url: str, **body) -> httpx.Response:
    return httpx.post(url + "/rank", json=body, timeout=30)


def _known(deployment) -> tuple[int, str, list[int]]:
    train = deployment["frame"][deployment["frame"]["split"] == "train"]
    user = int(train["user_id"].iloc[0])
    items = [int(i) for i in pd.unique(train["item_id"])[:100]]
    return user, str(train["scenario"].iloc[0]), items


@pytest.mark.serving
def test_health_probes(server):
    assert httpx.get(server["url"] + "/livez", timeout=5).status_code == 200
    assert httpx.get(server["url"] + "/readyz", timeout=5).status_code == 200


@pytest.mark.serving
def test_rank_sorted_and_equal_to_in_process_scorer(server, deployment):
    from ctrflow import features, registry
    from ctrflow.training.artifact import Scorer, load_model_artifact

    user, scenario, items = _known(deployment)
    httpx.post(server["url"] + "/rank", json={"user_id": user, "scenario": scenario, "item_ids": items[:5]}, timeout=30)
    timings = []
    for _ in range(5):
        t = time.perf_counter()
        r = _rank(server["url"], user_id=user, scenario=scenario, item_ids=items)
        timings.append((time.perf_counter() - t) * 1000)
        assert r.status_code == 200, r.text
    print(f"\nrank latency, 100 candidates: median {np.median(timings):.1f} ms, min {min(timings):.1f} ms over 5 calls")
    body = r.json()
    assert body["model"] == deployment["tag"]
    assert body["user_id"] == user and body["scenario"] == scenario
    scores = [i["score"] for i in body["items"]]
    assert sorted(i["item_id"] for i in body["items"]) == sorted(items)
    assert scores == sorted(scores, reverse=True)
    assert all(0.0 < s < 1.0 for s in scores)
    assert body["fallback"] == {"user": False, "items": []}

    loaded = load_model_artifact(registry.model_path(deployment["tag"]))  # BENTOML_HOME: the fixture's store
    expected = Scorer(loaded.model, loaded.encoder).score(features.online_frame(server["store"], user, items, scenario))
    served = {i["item_id"]: i["score"] for i in body["items"]}
    np.testing.assert_allclose([served[i] for i in items], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.serving
def test_the_answer_is_typed_in_the_openapi_schema_and_matches_it(server, deployment):
    """rank answers a RankResponse (not a dict: BentoML dumped a dict twice through the stdlib json and rebuilt its
    JSON schema per response, ~0.3 ms a request): the OpenAPI document names every field, and an answer holds
    exactly those, as application/json."""
    spec = httpx.get(server["url"] + "/docs.json", timeout=30).json()
    schemas = spec["components"]["schemas"]
    answer = next(v for k, v in schemas.items() if k.startswith("RankResponse"))
    assert set(answer["properties"]) == {"request_id", "model", "user_id", "scenario", "items", "fallback"}
    score = schemas["RankedItem"]["properties"]["score"]  # a diverged model's NaN is answered as null: the schema says so
    assert {"type": "null"} in score["anyOf"] and {"type": "number"} in score["anyOf"]
    user, scenario, items = _known(deployment)
    r = _rank(server["url"], user_id=user, scenario=scenario, item_ids=items[:3])
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == set(answer["properties"])
    assert all(set(i) == {"item_id", "score"} for i in body["items"]) and len(body["items"]) == 3
    assert set(body["fallback"]) == {"user", "items"}


@pytest.mark.serving
def test_unknown_user_and_items_fall_back(server, deployment):
    user, scenario, items = _known(deployment)
    unknown_user = int(deployment["frame"]["user_id"].max()) + 10_000
    unknown_item = int(deployment["frame"]["item_id"].max()) + 10_000
    r = _rank(server["url"], user_id=unknown_user, scenario=scenario, item_ids=[unknown_item, *items[:3]])
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["fallback"] == {"user": True, "items": [unknown_item]}
    assert len(body["items"]) == 4 and all(0.0 < i["score"] < 1.0 for i in body["items"])


@pytest.mark.serving
@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"scenario": "home", "item_ids": [1]}, "user_id"),
        ({"user_id": "abc", "scenario": "home", "item_ids": [1]}, "user_id"),
        ({"user_id": 1, "scenario": "nowhere", "item_ids": [1]}, "scenario"),
        ({"user_id": 1, "scenario": "home", "item_ids": []}, "item_ids"),
        ({"user_id": 1, "scenario": "home", "item_ids": ["x"]}, "item_ids"),
        ({"user_id": 1, "scenario": "home", "item_ids": [1, 1]}, "item_ids"),
        ({"user_id": 1, "scenario": "home", "item_ids": list(range(1001))}, "item_ids"),
        ({"user_id": 2**64, "scenario": "home", "item_ids": [1]}, "user_id"),
        ({"user_id": 1, "scenario": 3, "item_ids": [1]}, "scenario"),
    ],
    ids=[
        "missing-user", "wrong-type-user", "unknown-scenario", "empty-items", "wrong-type-item", "repeated-item",
        "too-many", "user-beyond-int64", "wrong-type-scenario",
    ],
)
def test_malformed_requests_get_4xx_naming_the_field(server, body, field):
    r = httpx.post(server["url"] + "/rank", json=body, timeout=30)
    assert 400 <= r.status_code < 500, r.text
    assert field in r.text


def _metric(text: str, name: str, **labels: str) -> float:
    """The value of one Prometheus sample (0 when absent) from /metrics text."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        sample, _, lab = head.partition("{")
        if sample == name and all(part in lab for part in want.split(",") if part):
            total += float(value)
    return total


@pytest.mark.serving
def test_metrics_per_stage_scenario_and_cache_age(server, deployment):
    """/metrics (Prometheus, both workers merged): a histogram per stage, requests and fallbacks per scenario,
    the item cache's age."""
    user, scenario, items = _known(deployment)
    before = httpx.get(server["url"] + "/metrics", timeout=10).text
    unknown_user = int(deployment["frame"]["user_id"].max()) + 20_000
    unknown_item = int(deployment["frame"]["item_id"].max()) + 20_000
    for _ in range(3):
        assert _rank(server["url"], user_id=user, scenario=scenario, item_ids=items[:10]).status_code == 200
    assert _rank(server["url"], user_id=unknown_user, scenario=scenario, item_ids=[unknown_item, items[0]]).status_code == 200
    after = httpx.get(server["url"] + "/metrics", timeout=10).text
    delta = {k: _metric(after, *k[:1], **dict(k[1:])) - _metric(before, *k[:1], **dict(k[1:])) for k in (
        ("ctrflow_rank_requests_total", ("scenario", scenario)),
        ("ctrflow_rank_fallbacks_total", ("scenario", scenario), ("kind", "user")),
        ("ctrflow_rank_fallbacks_total", ("scenario", scenario), ("kind", "item")),
    )}  # fmt: skip
    assert list(delta.values()) == [4.0, 1.0, 1.0]
    for stage in ("feature_read", "encode", "model", "log"):
        count = _metric(after, "ctrflow_rank_stage_seconds_count", stage=stage) - _metric(before, "ctrflow_rank_stage_seconds_count", stage=stage)
        assert count == 4.0, stage
        assert _metric(after, "ctrflow_rank_stage_seconds_sum", stage=stage) > 0
    assert "ctrflow_item_cache_age_seconds" in after
    assert _metric(after, "ctrflow_item_cache_age_seconds") >= 0


@pytest.mark.serving
def test_a_rematerialised_item_value_is_served_after_the_refresh(deployment, tiny_dataset):
    """Two workers, a 0.5 s refresh period: after the store is materialised again with a new value for one item,
    every worker serves it (scores equal to the scorer on the new online features) without a failed request."""
    import dataclasses

    from ctrflow import features, registry
    from ctrflow.training.artifact import Scorer, load_model_artifact

    served = {"bentoml_home": deployment["bentoml_home"], "feature_repo": deployment["repo"], "model_name": MODEL_NAME}
    user, scenario, items = _known(deployment)
    item = items[0]
    loaded = load_model_artifact(registry.model_path(deployment["tag"]))
    scorer = Scorer(loaded.model, loaded.encoder)
    changed = tiny_dataset.items.copy()
    row = changed["item_id"] == item
    changed.loc[row, "category"] = sorted(set(changed["category"].dropna()) - set(changed.loc[row, "category"]))[0]
    changed.loc[row, "price"] = float(changed["price"].max()) * 10
    store, repo = deployment["store"], deployment["repo"]
    with start_server(served, deployment["root"] / "log-refresh", workers=2, item_cache_refresh_s=0.5, ready_timeout=READY_TIMEOUT_S) as running:
        try:
            old = scorer.score(features.online_frame(store, user, items, scenario))[0]
            features.write_feature_tables(dataclasses.replace(tiny_dataset, items=changed), repo / "data")
            features.materialize(store)
            new = scorer.score(features.online_frame(store, user, items, scenario))
            assert abs(new[0] - old) > 1e-6  # the new value changes this candidate's score
            deadline, fresh_in_a_row = time.monotonic() + 60, 0
            while fresh_in_a_row < 10 and time.monotonic() < deadline:  # 10 answers in a row: both workers refreshed
                r = _rank(running.url, user_id=user, scenario=scenario, item_ids=items)
                assert r.status_code == 200, r.text  # never a failed request during the swap
                got = {i["item_id"]: i["score"] for i in r.json()["items"]}
                fresh = abs(got[item] - new[0]) <= 1e-6
                fresh_in_a_row = fresh_in_a_row + 1 if fresh else 0
                time.sleep(0.05)
            assert fresh_in_a_row == 10
            np.testing.assert_allclose([got[i] for i in items], new, rtol=0, atol=1e-6)
        finally:  # the module's other tests read the original values
            features.write_feature_tables(tiny_dataset, repo / "data")
            features.materialize(store)


@pytest.mark.serving
def test_a_served_item_id_2_63_minus_1_keeps_drift_running(server, deployment, tiny_dataset, tmp_path):
    """The API accepts any int64 item id; once one near 2**63 is served and logged, drift over the log still runs
    and compares ids exactly (issue 14: it stopped with "cannot safely cast non-equivalent float64 to int64")."""
    from ctrflow.monitoring import drift_report, read_request_log

    user, scenario, items = _known(deployment)
    top = 2**63 - 1
    r = _rank(server["url"], user_id=user, scenario=scenario, item_ids=[top, *items[:20]])
    assert r.status_code == 200, r.text
    request_id = r.json()["request_id"]
    deadline, rows = time.monotonic() + 20, pd.DataFrame()
    while time.monotonic() < deadline and len(rows) < 21:  # flushed every 0.5 s
        log = read_request_log(server["log_dir"])
        rows = log[log["request_id"] == request_id] if len(log) else log
        time.sleep(0.3)
    assert len(rows) == 21 and top in set(rows["item_id"].tolist())
    train = deployment["frame"][deployment["frame"]["split"] == "train"]
    result = drift_report(train, rows, tiny_dataset.spec, tmp_path, prediction_column=None, min_current_rows=1, by_scenario=False)
    assert result.verdict in ("ok", "breached")  # it ran; 21 rows are not meant to say more
    assert result.id_coverage["item_id"] == pytest.approx(20 / 21)  # the 20 training items seen, 2**63-1 not


@pytest.mark.serving
def test_request_log_holds_every_candidate(server, deployment):
    from ctrflow.request_log import read_part, read_request_log

    user, scenario, items = _known(deployment)
    r = _rank(server["url"], user_id=user, scenario=scenario, item_ids=items[:7])
    assert r.status_code == 200
    request_id = r.json()["request_id"]
    deadline = time.monotonic() + 20
    rows = pd.DataFrame()
    while time.monotonic() < deadline:  # flushed every 0.5 s by the service's background thread
        log = read_request_log(server["log_dir"])
        rows = log[log["request_id"] == request_id] if len(log) else log
        if len(rows) == 7:
            break
        time.sleep(0.3)
    assert len(rows) == 7
    assert set(rows["item_id"]) == set(items[:7])
    assert (rows["user_id"] == user).all() and (rows["scenario"] == scenario).all()
    assert (rows["model"] == deployment["tag"]).all()
    served = {i["item_id"]: i["score"] for i in r.json()["items"]}
    np.testing.assert_allclose(rows["prediction"].to_numpy(), [served[i] for i in rows["item_id"]], rtol=1e-6)
    for f in deployment["store"].get_feature_service("ctr_ranking").feature_view_projections:
        for feat in f.features:
            assert feat.name in rows.columns, f"feature '{feat.name}' is not logged"
    hist = rows["hist_item_ids"].iloc[0]
    assert hasattr(hist, "__len__")  # a Parquet list, not a string

    # compacted into Parquet while serving, by each worker's compactor process (serving.request_log_compaction)
    import psutil

    compactors = [p for p in psutil.Process(server["proc"].pid).children(recursive=True) if "ctrflow.request_log" in p.cmdline()]
    assert len(compactors) == 2  # one per worker
    parts = lambda: [p for p in server["log_dir"].glob("part-*.parquet")]  # noqa: E731
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not any((read_part(p, columns=["request_id"]).to_pandas()["request_id"] == request_id).any() for p in parts()):
        time.sleep(0.3)
    assert sum(int((read_part(p, columns=["request_id"]).to_pandas()["request_id"] == request_id).sum()) for p in parts()) == 7
    assert _metric(httpx.get(server["url"] + "/metrics", timeout=10).text, "ctrflow_request_log_compacted_rows_total") >= 7

    # shutdown flushes too: a request answered just before SIGTERM is on disk once the server is gone
    last = _rank(server["url"], user_id=user, scenario=scenario, item_ids=items[:3]).json()["request_id"]
    server["proc"].terminate()
    server["proc"].wait(timeout=30)
    assert not psutil.wait_procs(compactors, timeout=30)[1], "a compactor outlived its worker"
    log = read_request_log(server["log_dir"])
    assert (log["request_id"] == last).sum() == 3
    assert log["request_id"].nunique() >= 9  # 6 timed, 1 fallback, 2 here


# ---- the request log on its own (no server) ----------------------------------------------------------------
def test_request_log_parts_share_one_schema_and_close_flushes(tmp_path, tiny_dataset, tiny_frame):
    import pyarrow.parquet as pq

    from ctrflow.data.encoding import FeatureEncoder
    from ctrflow.request_log import RequestLogger, read_request_log, schema_for_spec

    encoder = FeatureEncoder(tiny_dataset.spec).fit(tiny_frame)
    known = tiny_frame.head(3).drop(columns="label").reset_index(drop=True)
    unknown = known.copy()  # an unknown user: every user feature missing, as online_frame serves it
    for f in tiny_dataset.spec.of_entity("user"):
        if f.column != "user_id":
            unknown[f.column] = [None] * len(unknown)
    logger = RequestLogger(tmp_path, column_types=schema_for_spec(encoder.spec, encoder.vocabs), flush_seconds=60)
    for rid, frame in (("a", known), ("b", unknown)):
        logger.log_request(
            request_id=rid, user_id=int(frame["user_id"].iloc[0]), scenario="home", model="m:1",
            features=frame, predictions=np.linspace(0.1, 0.3, len(frame)), extra={"rank": [1, 2, 3]},
        )
        assert logger.flush() is not None  # one part per request here
    parts = sorted(tmp_path.glob("part-*.parquet"))
    assert len(parts) == 2
    assert pq.read_schema(parts[0]).remove_metadata() == pq.read_schema(parts[1]).remove_metadata()

    logger.log_request(request_id="c", user_id=1, scenario="home", model="m:1", features=known, predictions=np.zeros(3))
    logger.close()  # compacts what was written, like the service's shutdown hook
    # any Parquet reader sees one table of one row per request (candidate values as lists); read_request_log explodes
    plain = pd.read_parquet(tmp_path)
    assert list(plain["request_id"]) == ["a", "b", "c"] and plain["item_id"].map(len).tolist() == [3, 3, 3]
    # a request answered after the graceful stop began is still written, never refused
    logger.log_request(request_id="d", user_id=1, scenario="home", model="m:1", features=known, predictions=np.zeros(3))
    assert logger.stats()["late_requests"] == 1
    assert list(read_request_log(tmp_path)["request_id"]) == ["a"] * 3 + ["b"] * 3 + ["c"] * 3 + ["d"] * 3
    logger.close()

    log = read_request_log(tmp_path)
    assert list(log["request_id"]) == ["a"] * 3 + ["b"] * 3 + ["c"] * 3 + ["d"] * 3
    assert len(pd.read_parquet(tmp_path)) == 4  # requests
    assert list(log["hist_item_ids"].iloc[0]) == list(known["hist_item_ids"].iloc[0])
    assert log["prediction"].dtype == np.float32
    with pytest.raises(ValueError, match="predictions"):
        RequestLogger(tmp_path / "x").log_request(
            request_id="e", user_id=1, scenario="home", model="m:1", features=known, predictions=np.zeros(2)
        )


@pytest.fixture(scope="module")
def family_models(deployment, tiny_dataset):
    """A tiny DMAE and a tiny GSVR (STAR backbone) registered as candidates in the same store: the service must
    serve any family by tag, with DMAE's modality similarities computed from online features per request."""
    from ctrflow import registry
    from ctrflow.data.encoding import FeatureEncoder
    from ctrflow.models import build_model
    from ctrflow.models.base import to_tensors
    from ctrflow.training.artifact import save_model_artifact
    from ctrflow.training.trainer import TrainConfig, Trainer, seed_everything

    frame = deployment["frame"]
    parts = {s: frame[frame["split"] == s] for s in ("train", "valid")}
    encoder = FeatureEncoder(tiny_dataset.spec).fit(parts["train"])
    tensors = {s: to_tensors(encoder.transform(p)) for s, p in parts.items()}
    configs = {
        "dmae": {"embedding_dim": 8},
        "gsvr": {"embedding_dim": 4, "latent_dim": 4, "backbone": "star",
                 "backbone_params": {"hidden": [16], "aux": [8]}},
    }  # fmt: skip
    tags = {}
    for name, params in configs.items():
        seed_everything(0)
        model = build_model(name, encoder, params)
        if hasattr(model, "prepare"):
            model.prepare(tensors["train"])
        Trainer(model, TrainConfig(epochs=1, batch_size=512, threads=1, progress=False)).fit(tensors["train"])
        artifact = save_model_artifact(deployment["root"] / f"model-{name}", model, encoder, {}, {"model": name})
        tags[name] = registry.register_model(
            artifact,
            MODEL_NAME,
            metrics={},
            params={"model": name, **params},
            feature_spec=tiny_dataset.spec,
            data_fingerprint=registry.data_fingerprint(frame),
            code_version=registry.code_version(),
        )
    return tags


@pytest.mark.serving
@pytest.mark.parametrize("family", ["dmae", "gsvr"])
def test_other_families_serve_by_tag_and_match_the_scorer(family, family_models, deployment):
    from ctrflow import features, registry
    from ctrflow.training.artifact import Scorer, load_model_artifact

    tag = family_models[family]
    served = {"bentoml_home": deployment["bentoml_home"], "feature_repo": deployment["repo"], "model_tag": str(tag)}
    user, scenario, items = _known(deployment)
    scenarios = sorted(deployment["frame"]["scenario"].unique())
    loaded = load_model_artifact(registry.model_path(tag))
    scorer = Scorer(loaded.model, loaded.encoder)
    with start_server(served, deployment["root"] / f"log-{family}", ready_timeout=READY_TIMEOUT_S) as running:
        answers = {}
        for s in scenarios[:2]:
            r = _rank(running.url, user_id=user, scenario=s, item_ids=items)
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["model"] == str(tag) and body["scenario"] == s
            got = {i["item_id"]: i["score"] for i in body["items"]}
            expected = scorer.score(features.online_frame(deployment["store"], user, items, s))
            np.testing.assert_allclose([got[i] for i in items], expected, rtol=1e-5, atol=1e-6)
            answers[s] = np.array([got[i] for i in items])
    if family == "gsvr":  # the scenario reaches the model: per-scenario parameters change the scores
        assert not np.allclose(*answers.values())
