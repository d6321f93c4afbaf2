"""The model lifecycle end to end with two data sets in one model store: real GX, Feast repositories, training, the
`ctrflow` command in subprocesses and real `bentoml serve` processes.

- a failing gate deploys nothing, exits non-zero and says why (both models' metrics), and never touches the other
  data set's production model;
- a model that does not fit a feature repository is refused before anything starts (`ctrflow serve`) and by the
  service itself, with the missing features named; item features that differ from training are named too;
- a kill -9 of the serving worker under load loses no answered request;
- SIGTERM to `ctrflow serve` leaves no process, a free port, and every answered request in the log.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import psutil
import pytest
import yaml

from ctrflow.config import REPO_ROOT, load_params, merge
from ctrflow.server import free_port, start_server
from ctrflow.steps import TRAINING_FRAME

pytestmark = [pytest.mark.serving, pytest.mark.slow]
READY_TIMEOUT_S = 120.0


def _params(**overrides) -> dict:
    return merge(
        load_params(REPO_ROOT / "params.yaml"),
        {
            "data.synthetic": {"n_users": 200, "n_items": 150, "n_interactions": 5000},
            "data.max_len": 10,
            "validation.min_rows": 100,
            "train.epochs": 1,
            "train.threads": 1,
            "train.progress": False,
            "models.dcnv2": {"cross_layers": 1, "mlp": [16], "dropout": 0.0},
            **overrides,
        },
    )


def _user_data(path: Path) -> Path:
    """A small data set in ctrflow's user-data format with other fields than the synthetic one ("bughunt")."""
    rng = np.random.default_rng(0)
    n_users, n_items, n = 60, 40, 2000
    users = pd.DataFrame({"user_id": np.arange(1, n_users + 1, dtype=np.int64), "gender": rng.choice(["F", "M"], n_users),
                          "age": rng.integers(18, 70, n_users).astype(float)})  # fmt: skip
    items = pd.DataFrame({"item_id": np.arange(100, 100 + n_items, dtype=np.int64), "genre": rng.choice(list("abcd"), n_items),
                          "price": rng.uniform(1, 100, n_items).round(2)})  # fmt: skip
    secs = np.sort(rng.integers(0, 365 * 24 * 3600, n))
    inter = pd.DataFrame({
        "user_id": rng.choice(users.user_id.to_numpy(), n), "item_id": rng.choice(items.item_id.to_numpy(), n),
        "scenario": rng.choice(["home", "search"], n), "label": rng.integers(0, 2, n).astype(np.int64),
        "event_timestamp": (pd.Timestamp("2023-01-01", tz="UTC") + pd.to_timedelta(secs, unit="s")).astype("datetime64[us, UTC]"),
    }).drop_duplicates(["user_id", "item_id", "event_timestamp"])  # fmt: skip
    schema = {"name": "bughunt", "scenarios": ["home", "search"], "behaviour_max_len": 10, "fields": [
        {"name": "gender", "kind": "categorical", "entity": "user"}, {"name": "age", "kind": "numeric", "entity": "user", "buckets": 4},
        {"name": "genre", "kind": "categorical", "entity": "item"}, {"name": "price", "kind": "numeric", "entity": "item", "buckets": 4},
    ]}  # fmt: skip
    path.mkdir(parents=True)
    inter.to_parquet(path / "interactions.parquet", index=False)
    users.to_parquet(path / "users.parquet", index=False)
    items.to_parquet(path / "items.parquet", index=False)
    (path / "schema.yaml").write_text(yaml.safe_dump(schema, sort_keys=False))
    return path


def _build(params: dict, root: Path) -> dict:
    """validate -> features (Feast repo applied and materialised) -> train, in-process (the steps the CLI runs)."""
    from ctrflow.steps import features_step, train_step, validate_step

    validate_step(params, root / "ds", root / "report")
    features_step(params, root / "ds", root / "repo", root / "ts")
    train_step(params, root / "ts", root / "model")
    return {"root": root, "ds": root / "ds", "repo": root / "repo", "ts": root / "ts", "model": root / "model", "params": params}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Two data sets built into their own Feast repositories, one BentoML home for both, a params file per data set."""
    root = tmp_path_factory.mktemp("lifecycle")
    home = root / "bentoml"
    saved = os.environ.get("BENTOML_HOME")
    os.environ["BENTOML_HOME"] = str(home)
    try:
        a = _build(_params(**{"data.source": "synthetic"}), root / "a")
        b = _build(_params(**{"data.source": "parquet", "data.path": str(_user_data(root / "b_data"))}), root / "b")
        for ds in (a, b):
            ds["params_file"] = ds["root"] / "params.yaml"
            ds["params_file"].write_text(yaml.safe_dump(ds["params"], sort_keys=False))
        yield {"home": home, "a": a, "b": b, "root": root}
    finally:
        if saved is None:
            os.environ.pop("BENTOML_HOME", None)
        else:
            os.environ["BENTOML_HOME"] = saved


def _env(home: Path) -> dict[str, str]:
    env = {**os.environ, "BENTOML_HOME": str(home)}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return env


def _ctrflow(world: dict, ds: dict, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ctrflow.cli", "--params", str(ds["params_file"]), *args],
        env=_env(world["home"]), cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def _register(world: dict, ds: dict, *sets: str) -> subprocess.CompletedProcess:
    over = [a for s in sets for a in ("--set", s)]
    return _ctrflow(
        world, ds, *over, "register", "--model-dir", str(ds["model"]), "--dataset", str(ds["ds"]),
        "--training-set", str(ds["ts"]), "--deploy", "--repo", str(ds["repo"]),
        "--deployment", str(ds["root"] / "deployment.json"),
    )  # fmt: skip


@pytest.fixture(scope="module")
def deployed_a(world):
    """Data set A registered through the gate (reference trained: a lift of -1 always passes) and deployed."""
    proc = _register(world, world["a"], "gate.min_lift_over_reference=-1.0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["gate_passed"] and result["metrics"]["reference"]["valid_auc"] is not None
    # every step's closing line counts its rows: register the training set it read, gate the reference's train rows
    closing = {line.split(" INFO ")[-1].split(":")[0]: line.split(" INFO ")[-1] for line in proc.stderr.splitlines()
               if " rows, " in line and "peak RSS" in line and "so far" not in line}
    split = pd.read_parquet(world["a"]["ts"] / TRAINING_FRAME, columns=["split"])["split"]
    assert closing["register"].startswith(f"register: {len(split):,} rows, "), closing
    assert closing["gate"].startswith(f"gate: {int((split == 'train').sum()):,} rows, "), closing
    return json.loads((world["a"]["root"] / "deployment.json").read_text())


def test_a_failing_gate_deploys_nothing_exits_non_zero_and_says_why(world, deployed_a):
    from ctrflow import registry

    prod_a = registry.production_model("ctrflow-synthetic")
    assert prod_a == deployed_a["model_tag"]
    proc = _register(world, world["b"], "gate.min_lift_over_reference=0.5")  # no model beats lr by 0.5 AUC
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "FAILED" in proc.stderr and "nothing deployed" in proc.stderr
    assert "below the reference lr" in proc.stderr
    table = {line.split()[0] for line in proc.stderr.splitlines() if line.strip()}
    assert {"candidate", "reference"} <= table  # both models' metrics are printed
    assert not (world["b"]["root"] / "deployment.json").exists()
    tag_b = json.loads(proc.stdout)["tag"]
    assert tag_b.startswith("ctrflow-bughunt:")  # its own name: never A's production slot
    assert registry.production_model("ctrflow-bughunt") is None
    assert registry.production_model("ctrflow-synthetic") == prod_a
    rows = {r["tag"]: r for r in registry.list_models()}
    assert rows[tag_b]["stage"] == "candidate" and rows[tag_b]["dataset"] == "bughunt"
    assert rows[prod_a]["stage"] == "production" and rows[prod_a]["dataset"] == "synthetic"
    listed = _ctrflow(world, world["b"], "models", "list").stdout
    assert any(tag_b in line and "bughunt" in line and "dcnv2" in line and "candidate" in line for line in listed.splitlines())


def test_a_model_that_does_not_fit_the_repository_is_refused_at_start(world, deployed_a):
    from ctrflow.fit_check import ModelDoesNotFitError, check_model_fits

    wrong = {**deployed_a, "feature_repo": str(world["b"]["repo"])}  # A's model, B's features
    wrong_file = world["root"] / "wrong_deployment.json"
    wrong_file.write_text(json.dumps(wrong))
    with pytest.raises(ModelDoesNotFitError) as err:
        check_model_fits(deployed_a["model_tag"], world["b"]["repo"])
    message = str(err.value)
    assert "data set 'synthetic'" in message and "'bughunt'" in message
    assert "lacks" in message and "'region'" in message and "'category'" in message  # A's features B does not serve

    cli_log = world["root"] / "wrong_cli_log"
    proc = _ctrflow(
        world, world["a"], "serve", "--deployment", str(wrong_file), "--port", str(free_port()), "--request-log", str(cli_log)
    )
    assert proc.returncode == 2
    assert "does not fit" in proc.stderr and "'region'" in proc.stderr and "Traceback" not in proc.stderr
    assert not cli_log.exists()  # refused before bentoml started (a worker would have created its request log)

    # the service itself refuses too (a deployment started without the CLI)
    with pytest.raises((RuntimeError, TimeoutError)) as err:
        start_server(wrong, world["root"] / "wrong_log", ready_timeout=90)
    log = str(err.value)
    assert "does not fit" in log and "'region'" in log


def test_item_features_that_differ_from_training_are_named(world, deployed_a, tmp_path):
    """The issue's silent case: the same columns, other item vectors (a re-embedded catalogue)."""
    from ctrflow import features
    from ctrflow.data.tables import Dataset
    from ctrflow.fit_check import ModelDoesNotFitError, check_model_fits

    report = check_model_fits(deployed_a["model_tag"], world["a"]["repo"])
    embeddings = [c for c in report.checked_item_features if c.endswith("_emb")]
    assert embeddings, report  # the synthetic data set has item modality vectors, and they were compared

    dataset = Dataset.load(world["a"]["ds"])
    rng = np.random.default_rng(1)
    dataset.items[embeddings[0]] = [np.asarray(v, dtype=np.float32) + rng.normal(0, 0.5, len(v)).astype(np.float32)
                                    for v in dataset.items[embeddings[0]]]  # fmt: skip
    repo = features.copy_repo(tmp_path / "repo")
    features.write_feature_tables(dataset, repo / "data")
    features.materialize(features.apply_repo(repo, repo / "data"))
    with pytest.raises(ModelDoesNotFitError, match=rf"item features \['{embeddings[0]}'\] differ"):
        check_model_fits(deployed_a["model_tag"], repo)


def _worker_pids(server_pid: int) -> list[int]:
    """BentoML's API workers: the descendants of `bentoml serve` that run the service."""
    procs = psutil.Process(server_pid).children(recursive=True)
    return [p.pid for p in procs if "_bentoml_impl.worker" in " ".join(p.cmdline())]


def _known_request(world: dict) -> dict:
    frame = pd.read_parquet(world["a"]["ts"] / "frame.parquet")
    train = frame[frame["split"] == "train"]
    return {"user_id": int(train["user_id"].iloc[0]), "scenario": str(train["scenario"].iloc[0]),
            "item_ids": [int(i) for i in pd.unique(train["item_id"])[:20]]}  # fmt: skip


class _Load:
    """Clients sending /rank requests in a loop; every 200 answer's request id is kept."""

    def __init__(self, url: str, body: dict, clients: int = 2):
        self.url, self.body, self.answered, self.errors = url, body, [], 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]
        for t in self._threads:
            t.start()

    def _run(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self._stop.is_set():
                try:
                    r = client.post(self.url + "/rank", json=self.body)
                except httpx.HTTPError:
                    self.errors += 1
                    time.sleep(0.05)
                    continue
                if r.status_code == 200:
                    self.answered.append(r.json()["request_id"])
                else:
                    self.errors += 1

    def wait_for(self, n: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while len(self.answered) < n and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(self.answered) >= n, f"only {len(self.answered)} answers ({self.errors} errors)"

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)


def _assert_all_logged(log_dir: Path, answered: list[str], per_request: int) -> pd.DataFrame:
    from ctrflow.request_log import read_request_log

    log = read_request_log(log_dir)
    counts = log.groupby("request_id").size()
    missing = [r for r in answered if r not in counts.index]
    assert not missing, f"{len(missing)} of {len(answered)} answered requests are not in the log"
    assert (counts.loc[answered] == per_request).all()  # whole requests, never a row twice
    return log


def test_kill_9_of_the_serving_worker_under_load_loses_no_answered_request(world, deployed_a):
    log_dir = world["root"] / "kill_log"
    body = _known_request(world)
    with start_server(deployed_a, log_dir, ready_timeout=READY_TIMEOUT_S, extra_env={"CTRFLOW_REQUEST_LOG_FLUSH_SECONDS": "0.5"}) as server:
        load = _Load(server.url, body)
        try:
            load.wait_for(40)
            metrics = httpx.get(server.url + "/metrics", timeout=10).text
            assert "ctrflow_request_log_requests_total" in metrics  # the log's counters are exposed
            workers = _worker_pids(server.process.pid)
            assert workers, "no BentoML worker found"
            os.kill(workers[0], signal.SIGKILL)  # mid-load: requests are being answered and logged right now
            killed_at = len(load.answered)
            deadline = time.monotonic() + READY_TIMEOUT_S  # BentoML starts a new worker; traffic resumes
            while len(load.answered) < killed_at + 20 and time.monotonic() < deadline:
                time.sleep(0.1)
        finally:
            load.stop()
    answered = list(load.answered)
    assert len(answered) > killed_at, "the service never answered again after the worker was killed"
    _assert_all_logged(log_dir, answered, len(body["item_ids"]))


def _port_free(port: int) -> bool:
    """Nothing listens on the port and a new server can bind it (with SO_REUSEADDR, as servers do: the closed
    connections' TIME_WAIT entries may outlive the server for a minute, and they do not block a restart)."""
    listening = [c for c in psutil.net_connections("tcp") if c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN]
    if listening:
        return False
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen()
        except OSError:
            return False
    return True


def test_sigterm_to_ctrflow_serve_stops_everything_and_flushes(world, deployed_a):
    port = free_port()
    log_dir = world["root"] / "sigterm_log"
    deployment_file = world["root"] / "sigterm_deployment.json"
    deployment_file.write_text(json.dumps(deployed_a))
    out = open(world["root"] / "sigterm_serve.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "ctrflow.cli", "--params", str(world["a"]["params_file"]), "serve", "--deployment",
         str(deployment_file), "--port", str(port), "--request-log", str(log_dir)],
        env=_env(world["home"]), cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    session = proc.pid  # ctrflow serve leads its own session here, so the test can find (and clean up) everything
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            assert proc.poll() is None, (world["root"] / "sigterm_serve.log").read_text()[-3000:]
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        body = _known_request(world)
        load = _Load(url, body)
        load.wait_for(30)
        os.kill(proc.pid, signal.SIGTERM)  # to ctrflow serve only, as systemd or `kill` would
        code = proc.wait(timeout=90)
        load.stop()
    finally:
        leftovers = [p for p in psutil.process_iter(["pid"]) if _session_of(p.pid) == session]
        for p in leftovers:
            p.kill()
        out.close()
    assert code == 0, (world["root"] / "sigterm_serve.log").read_text()[-3000:]
    assert leftovers == [], [p.pid for p in leftovers]
    assert _port_free(port)
    with pytest.raises(httpx.HTTPError):
        httpx.get(url + "/readyz", timeout=2)
    log = _assert_all_logged(log_dir, list(load.answered), len(body["item_ids"]))
    assert not list((log_dir / "_segments").glob("seg-*"))  # flushed: everything is in the Parquet parts
    from ctrflow.request_log import part_rows

    assert sum(part_rows(p) for p in log_dir.glob("part-*.parquet")) == len(log)


def _session_of(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except (ProcessLookupError, PermissionError):
        return None
