"""The guarded service end to end, on a real `bentoml serve` on localhost: bearer token, body-size limit, strict id
types, one error shape, and shadow serving (a challenger scored beside the production model, logged, never
returned; a failing challenger never fails a request). The guard's rules one by one: tests/test_guard.py."""

from __future__ import annotations

import math
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import psutil
import pytest
import torch

from ctrflow.config import REPO_ROOT
from ctrflow.guard import guard_env
from ctrflow.server import start_server

NAME = "ctrflow-guarded"
READY_TIMEOUT_S = 120.0
TOKEN_ENV = "CTRFLOW_GUARD_TEST_TOKEN"
SHAPE = {"status", "field", "rule", "message", "value"}


def _train(encoder, tensors, params: dict, seed: int):
    from ctrflow.models import build_model
    from ctrflow.training.trainer import TrainConfig, Trainer, seed_everything

    seed_everything(seed)
    model = build_model("dcnv2", encoder, params)
    Trainer(model, TrainConfig(epochs=1, batch_size=512, threads=1, progress=False)).fit(tensors["train"], tensors["valid"])
    return model


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_dataset, tiny_frame):
    """A materialised Feast repo; in a temp store: a production DCNv2 (the champion), a second DCNv2 (the challenger)
    and a diverged copy of it (every weight NaN), all of the same data set."""
    from ctrflow import features, registry
    from ctrflow.data.encoding import FeatureEncoder
    from ctrflow.data.splits import make_split
    from ctrflow.models.base import to_tensors
    from ctrflow.training.artifact import save_model_artifact

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("guarded")
    saved_home = os.environ.get("BENTOML_HOME")
    os.environ["BENTOML_HOME"] = str(root / "bentoml")
    try:
        repo = features.copy_repo(root / "repo")
        features.write_feature_tables(tiny_dataset, repo / "data")
        store = features.apply_repo(repo, repo / "data")
        features.materialize(store)
        frame = tiny_frame.copy()
        frame["split"] = make_split(tiny_dataset.interactions, "temporal", seed=0).to_numpy()
        parts = {s: frame[frame["split"] == s] for s in ("train", "valid")}
        encoder = FeatureEncoder(tiny_dataset.spec).fit(parts["train"])
        tensors = {s: to_tensors(encoder.transform(p)) for s, p in parts.items()}
        models = {
            "champion": _train(encoder, tensors, {"embedding_dim": 8, "cross_layers": 1, "mlp": [32]}, seed=0),
            "challenger": _train(encoder, tensors, {"embedding_dim": 4, "cross_layers": 2, "mlp": [16]}, seed=1),
        }
        models["diverged"] = _train(encoder, tensors, {"embedding_dim": 4, "cross_layers": 2, "mlp": [16]}, seed=1)
        with torch.no_grad():
            for p in models["diverged"].parameters():
                p.fill_(math.nan)
        tags = {}
        for role, model in models.items():
            artifact = save_model_artifact(root / role, model, encoder, {}, {"model": "dcnv2"})
            tags[role] = registry.register_model(
                artifact, NAME, metrics={}, params={"model": "dcnv2"}, feature_spec=tiny_dataset.spec,
                data_fingerprint=registry.data_fingerprint(tiny_frame), code_version=registry.code_version(),
            )  # fmt: skip
        registry.promote(tags["champion"], reason="guarded serving test", force=True)
        deployment = {"bentoml_home": str(root / "bentoml"), "feature_repo": str(repo), "model_tag": tags["champion"]}
        yield {"root": root, "repo": repo, "store": store, "tags": tags, "frame": frame, "deployment": deployment}
    finally:
        if saved_home is None:
            os.environ.pop("BENTOML_HOME", None)
        else:
            os.environ["BENTOML_HOME"] = saved_home


@pytest.fixture(scope="module")
def guarded(world):
    """The champion served with a bearer token (from the variable serving.auth_token_env names) and the challenger
    attached: started once for the module."""
    from ctrflow import registry

    registry.attach_shadow(world["tags"]["challenger"], reason="guarded serving test")
    token = secrets.token_urlsafe(24)
    log_dir = world["root"] / "log_guarded"
    try:
        running = start_server(
            world["deployment"], log_dir, log_path=world["root"] / "guarded.log", ready_timeout=READY_TIMEOUT_S,
            extra_env={**guard_env({"max_request_bytes": 1_048_576, "auth_token_env": TOKEN_ENV}), TOKEN_ENV: token},
        )  # fmt: skip
    except (RuntimeError, TimeoutError) as exc:
        pytest.fail(str(exc))
    with running:
        yield {"url": running.url, "proc": running.process, "server": running, "token": token, "log_dir": log_dir,
               "auth": {"Authorization": f"Bearer {token}"}}  # fmt: skip


def _known(world) -> dict:
    train = world["frame"][world["frame"]["split"] == "train"]
    return {"user_id": int(train["user_id"].iloc[0]), "scenario": str(train["scenario"].iloc[0]),
            "item_ids": [int(i) for i in pd.unique(train["item_id"])[:30]]}  # fmt: skip


def _post(server, body=None, *, auth=True, **kwargs) -> httpx.Response:
    headers = {**(server["auth"] if auth else {}), **kwargs.pop("headers", {})}
    if body is not None:
        kwargs["json"] = body
    return httpx.post(server["url"] + "/rank", headers=headers, timeout=60, **kwargs)


def _shape(r: httpx.Response, status: int, field: str | None, rule: str) -> dict:
    assert r.status_code == status, r.text[:500]
    body = r.json()
    assert set(body) == SHAPE, body
    assert (body["status"], body["field"], body["rule"]) == (status, field, rule), body
    return body


# ---- auth ----------------------------------------------------------------------------------------------------------
@pytest.mark.serving
def test_without_or_with_a_wrong_token_401_and_probes_and_metrics_stay_open(guarded, world):
    body = _known(world)
    r = _post(guarded, body, auth=False)
    _shape(r, 401, "Authorization", "auth")
    assert r.headers["www-authenticate"].startswith("Bearer")
    _shape(_post(guarded, body, auth=False, headers={"Authorization": "Bearer not-" + guarded["token"]}), 401, "Authorization", "auth")
    _shape(_post(guarded, body, auth=False, headers={"Authorization": guarded["token"]}), 401, "Authorization", "auth")
    assert httpx.get(guarded["url"] + "/docs.json", timeout=10).status_code == 401  # the API's schema is guarded too
    for path in ("/healthz", "/livez", "/readyz", "/metrics"):
        assert httpx.get(guarded["url"] + path, timeout=10).status_code == 200, path
    assert _post(guarded, body).status_code == 200


def test_ctrflow_serve_refuses_to_start_when_the_token_variable_is_unset(world, tmp_path):
    import json

    deployment = tmp_path / "deployment.json"
    deployment.write_text(json.dumps(world["deployment"]))
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    proc = subprocess.run(
        [sys.executable, "-m", "ctrflow.cli", "--set", f"serving.auth_token_env={TOKEN_ENV}", "serve", "--deployment", str(deployment)],
        env={**env, "PYTHONPATH": str(REPO_ROOT)}, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert f"{TOKEN_ENV} is unset or empty" in proc.stderr


# ---- size ----------------------------------------------------------------------------------------------------------
def _worker_rss(server_pid: int) -> int:
    procs = [p for p in psutil.Process(server_pid).children(recursive=True) if "_bentoml_impl.worker" in " ".join(p.cmdline())]
    assert procs, "no BentoML worker found"
    return sum(p.memory_info().rss for p in procs)


def _raw_post(url: str, headers: dict[str, str], body: bytes) -> tuple[int, bytes]:
    """A request sent by hand, the declared Content-Length far more than what is sent; (status, body). The answer
    closes the connection (`Connection: close`), so it is read to the end."""
    host, port = url.removeprefix("http://").split(":")
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    data = b""
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(f"POST /rank HTTP/1.1\r\nHost: {host}\r\n{head}\r\n".encode() + body)
        while chunk := s.recv(65536):
            data += chunk
    head_part, _, payload = data.partition(b"\r\n\r\n")
    return int(head_part.split(b" ", 2)[1]), payload


@pytest.mark.serving
def test_bodies_above_the_limit_get_413_before_they_are_read(guarded):
    import json

    before = _worker_rss(guarded["proc"].pid)
    # 300 MB declared, 1 KB sent: the answer comes without waiting for (or buffering) the rest
    status, body = _raw_post(
        guarded["url"], {**guarded["auth"], "Content-Type": "application/json", "Content-Length": str(300_000_000)}, b"{" + b" " * 1023
    )
    assert status == 413 and json.loads(body)["rule"] == "max_request_bytes"
    big = b'{"user_id": 1, "scenario": "' + b"x" * 10_000_000 + b'", "item_ids": [1]}'  # 10 MB, really sent
    r = _post(guarded, content=big, headers={"Content-Type": "application/json"})
    msg = _shape(r, 413, "body", "max_request_bytes")["message"]
    assert str(len(big)) in msg and "1048576" in msg
    r = _post(guarded, content=(b"x" * 65_536 for _ in range(40)), headers={"Content-Type": "application/json"})  # chunked
    _shape(r, 413, "body", "max_request_bytes")
    grown = _worker_rss(guarded["proc"].pid) - before
    assert grown < 30_000_000, f"the worker grew by {grown / 1e6:.0f} MB"  # 10 MB was sent: never buffered whole


# ---- strict types and the error shape ------------------------------------------------------------------------------
@pytest.mark.serving
@pytest.mark.parametrize(
    ("change", "field", "rule"),
    [
        ({"user_id": True}, "user_id", "type"),
        ({"user_id": "1"}, "user_id", "type"),
        ({"user_id": 1.0}, "user_id", "type"),
        ({"user_id": 2**63}, "user_id", "int64_range"),
        ({"item_ids": [1, False]}, "item_ids[1]", "type"),
        ({"item_ids": [1, "2"]}, "item_ids[1]", "type"),
        ({"item_ids": [1.5]}, "item_ids[0]", "type"),
        ({"item_ids": [-(2**63) - 1]}, "item_ids[0]", "int64_range"),
        ({"item_ids": [7, 7]}, "item_ids", "unique"),
        ({"item_ids": list(range(1001))}, "item_ids", "max_items"),
        ({"scenario": 3}, "scenario", "type"),
        ({"extra": 1}, "extra", "unknown_field"),
    ],
    ids=lambda v: str(v)[:30],
)
def test_ids_are_strict_int64_and_every_422_names_the_field(guarded, world, change, field, rule):
    _shape(_post(guarded, {**_known(world), **change}), 422, field, rule)


@pytest.mark.serving
def test_a_megabyte_unknown_scenario_is_not_echoed(guarded, world):
    r = _post(guarded, {**_known(world), "scenario": "s" * 1_000_000})
    body = _shape(r, 422, "scenario", "one_of")
    assert len(r.content) < 2_000
    assert body["value"].endswith("... (1000000 characters)")


@pytest.mark.serving
def test_every_error_has_the_same_shape(guarded):
    _shape(_post(guarded, content=b'{"user_id": 1,', headers={"Content-Type": "application/json"}), 400, None, "json")
    _shape(_post(guarded, content=b"user_id=1", headers={"Content-Type": "text/plain"}), 415, "Content-Type", "media_type")
    _shape(httpx.get(guarded["url"] + "/nowhere", headers=guarded["auth"], timeout=10), 404, "path", "not_found")
    _shape(httpx.get(guarded["url"] + "/rank", headers=guarded["auth"], timeout=10), 405, "method", "method")
    _shape(_post(guarded, {"scenario": "home", "item_ids": [1]}), 422, "user_id", "required")


@pytest.mark.serving
def test_rejections_are_counted_on_metrics(guarded, world):
    _post(guarded, {**_known(world), "user_id": True})
    metrics = httpx.get(guarded["url"] + "/metrics", timeout=10).text
    counted = [line for line in metrics.splitlines() if line.startswith("ctrflow_requests_rejected_total{")]
    assert any('rule="type"' in line and 'status="422"' in line and float(line.split()[-1]) >= 1 for line in counted), counted


# ---- shadow serving ---------------------------------------------------------------------------------------------------
def _scorer(tag: str):
    from ctrflow import registry
    from ctrflow.training.artifact import Scorer, load_model_artifact

    loaded = load_model_artifact(registry.model_path(tag))
    return Scorer(loaded.model, loaded.encoder)


@pytest.mark.serving
def test_the_challenger_scores_every_request_logged_beside_the_champion_never_returned(guarded, world):
    from ctrflow import features
    from ctrflow.request_log import read_request_log

    req = _known(world)
    r = _post(guarded, req)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["model"] == world["tags"]["champion"]
    assert "shadow" not in r.text  # neither the challenger's tag nor its scores
    online = features.online_frame(world["store"], req["user_id"], req["item_ids"], req["scenario"])
    champion = dict(zip(req["item_ids"], _scorer(world["tags"]["champion"]).score(online)))
    challenger = dict(zip(req["item_ids"], _scorer(world["tags"]["challenger"]).score(online)))
    served = {i["item_id"]: i["score"] for i in answer["items"]}
    np.testing.assert_allclose([served[i] for i in req["item_ids"]], [champion[i] for i in req["item_ids"]], rtol=1e-5, atol=1e-6)
    assert not np.allclose([champion[i] for i in req["item_ids"]], [challenger[i] for i in req["item_ids"]])

    log = read_request_log(guarded["log_dir"])  # on disk before the answer was sent
    rows = log[log["request_id"] == answer["request_id"]]
    assert len(rows) == len(req["item_ids"])
    assert (rows["model"] == world["tags"]["champion"]).all()
    assert (rows["shadow_model"] == world["tags"]["challenger"]).all()
    np.testing.assert_allclose(rows["prediction"], [champion[i] for i in rows["item_id"]], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rows["shadow_score"], [challenger[i] for i in rows["item_id"]], rtol=1e-5, atol=1e-6)
    metrics = httpx.get(guarded["url"] + "/metrics", timeout=10).text
    assert any(line.startswith("ctrflow_shadow_scored_total") and float(line.split()[-1]) >= 1 for line in metrics.splitlines())


def _shadow_of(log_dir: Path, request_id: str) -> set:
    from ctrflow.request_log import read_request_log

    log = read_request_log(log_dir)
    rows = log[log["request_id"] == request_id]
    assert len(rows), f"request {request_id} is not in the log"
    return set(rows["shadow_model"].dropna()) if "shadow_model" in rows else set()


def _until_shadow(url: str, req: dict, log_dir: Path, wanted: set, timeout: float = 90) -> list[httpx.Response]:
    """Requests until one is logged with the challenger `wanted` ({} for none); every answer must be a 200."""
    answers = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        answers.append(httpx.post(url + "/rank", json=req, timeout=60))
        assert answers[-1].status_code == 200, answers[-1].text
        if _shadow_of(log_dir, answers[-1].json()["request_id"]) == wanted:
            return answers
        time.sleep(0.5)
    raise AssertionError(f"the service did not pick up challenger {wanted or 'none'} within {timeout:.0f}s")


@pytest.mark.serving
def test_a_challenger_attached_live_that_fails_never_fails_a_request_and_is_counted(world, guarded):
    """After the guarded server: a server with no challenger; the diverged one (every score NaN) is attached while
    it serves, then detached: no restart, every request answered, every failure counted and logged as null."""
    from ctrflow import registry
    from ctrflow.request_log import read_request_log

    guarded["server"].stop()  # the module's guarded server is done: one server at a time on a small machine
    registry.detach_shadow(NAME)
    log_dir = world["root"] / "log_diverged"
    req = _known(world)
    diverged = world["tags"]["diverged"]
    with start_server(world["deployment"], log_dir, log_path=world["root"] / "diverged.log", ready_timeout=READY_TIMEOUT_S) as server:
        _until_shadow(server.url, req, log_dir, set(), timeout=10)
        registry.attach_shadow(diverged, reason="a challenger that fails")
        _until_shadow(server.url, req, log_dir, {diverged})
        answers = [httpx.post(server.url + "/rank", json=req, timeout=60) for _ in range(3)]
        registry.detach_shadow(NAME)
        _until_shadow(server.url, req, log_dir, set())
        metrics = httpx.get(server.url + "/metrics", timeout=10).text
    assert [a.status_code for a in answers] == [200] * 3, answers[0].text
    assert all(0 < i["score"] < 1 for a in answers for i in a.json()["items"])
    log = read_request_log(log_dir)
    shadowed = log[log["shadow_model"] == diverged]
    assert shadowed["shadow_score"].isna().all() and log["prediction"].notna().all()
    failures = [line for line in metrics.splitlines() if line.startswith("ctrflow_shadow_failures_total{")]
    scored = shadowed["request_id"].nunique()
    assert any('stage="score"' in line and float(line.split()[-1]) == scored for line in failures), (scored, failures)
    assert "failed to score a request" in (world["root"] / "diverged.log").read_text()
