"""A fake Kubeflow Pipelines API server (v2beta1 REST) for testing submission with the real `kfp.Client`.

A Kubeflow cluster cannot run in tests, so only the API server is faked: the real client, the real
kfp_server_api serialisation and the real compiled IR go over real HTTP to this server on 127.0.0.1.
It implements just what `kfp.Client` calls for experiments, runs and recurring runs (plus the health
probe the client makes at construction), keeps the objects in memory, and records every request so tests
can assert on exactly what a cluster would have received. Any other endpoint answers 404 and is recorded,
so a test can tell that the client hit something unexpected.

Endpoints (all under /apis/v2beta1):
    GET  /healthz                          {"multi_user": false}; kfp.Client probes it in __init__
    GET  /experiments?filter=...           list, filtered by display_name EQUALS and namespace
    POST /experiments                      create; 409 ALREADY_EXISTS on a duplicate display_name
    GET  /experiments/{id}
    POST /runs                             create a run from an inline pipeline_spec (or a version reference)
    GET  /runs/{id}
    POST /recurringruns                    create a recurring run (cron or periodic trigger)
    GET  /recurringruns/{id}
"""

from __future__ import annotations

import json
import re
import threading
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

API = "/apis/v2beta1"
# filter.proto Predicate.Operation: the client sends the enum number (EQUALS = 1), grpc-gateway also takes names.
_EQUALS = (1, "EQUALS")


@dataclass
class RecordedRequest:
    """One HTTP request as the server received it (body parsed as JSON when it is JSON)."""

    method: str
    path: str
    query: dict[str, list[str]]
    body: Any
    status: int = 0


@dataclass
class _State:
    experiments: dict[str, dict[str, Any]] = field(default_factory=dict)
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    recurring_runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: list[RecordedRequest] = field(default_factory=list)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _error(status: int, code: int, message: str) -> tuple[int, dict[str, Any]]:
    """The grpc-gateway error shape KFP returns (code = gRPC status code)."""
    return status, {"code": code, "message": message, "details": []}


def _matches(obj: dict[str, Any], filter_json: str | None) -> bool:
    if not filter_json:
        return True
    for pred in json.loads(filter_json).get("predicates", []):
        op = pred.get("operation")
        if op not in _EQUALS:
            raise ValueError(f"fake KFP server supports only EQUALS predicates, got operation {op!r}")
        key = pred["key"]
        value = pred.get("string_value", pred.get("stringValue"))
        if obj.get(key) != value:
            return False
    return True


class FakeKFPServer:
    """In-memory KFP v2beta1 API server on 127.0.0.1 and a free port; use as a context manager.

    `url` is what `kfp.Client(host=...)` takes; `requests` lists every request received, in order.
    """

    def __init__(self) -> None:
        self._state = _State()
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        # A short poll interval keeps shutdown() (and so each test's teardown) at ~50 ms instead of 0.5 s.
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), name="fake-kfp", daemon=True)

    # -- lifecycle ---------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeKFPServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> FakeKFPServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what the tests read -----------------------------------------------------------------------------
    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._state.requests)

    @property
    def experiments(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return dict(self._state.experiments)

    @property
    def runs(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return dict(self._state.runs)

    @property
    def recurring_runs(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return dict(self._state.recurring_runs)

    def endpoints(self) -> list[str]:
        """'METHOD /path' for every request, in order (query strings dropped)."""
        return [f"{r.method} {r.path}" for r in self.requests]

    # -- routing -----------------------------------------------------------------------------------------
    def _dispatch(self, method: str, path: str, query: dict[str, list[str]], body: Any) -> tuple[int, Any]:
        s = self._state
        q = {k: v[-1] for k, v in query.items()}
        if method == "GET" and path == f"{API}/healthz":
            return 200, {"multi_user": False}

        if path == f"{API}/experiments":
            if method == "GET":
                ns = q.get("namespace") or ""
                found = [
                    e
                    for e in s.experiments.values()
                    if (e.get("namespace") or "") == ns and _matches(e, q.get("filter"))
                ]
                return 200, ({"experiments": found, "total_size": len(found)} if found else {})
            if method == "POST":
                name = (body or {}).get("display_name")
                if not name:
                    return _error(400, 3, "experiment display_name is required")
                ns = body.get("namespace") or ""
                if any(e["display_name"] == name and (e.get("namespace") or "") == ns for e in s.experiments.values()):
                    return _error(409, 6, f"experiment '{name}' already exists")
                exp = {**body, "experiment_id": str(uuid.uuid4()), "created_at": _now(), "storage_state": "AVAILABLE"}
                s.experiments[exp["experiment_id"]] = exp
                return 200, exp

        if method == "POST" and path == f"{API}/runs":
            err = self._check_job(body)
            if err:
                return err
            run = {
                **body,
                "run_id": str(uuid.uuid4()),
                "created_at": _now(),
                "state": "PENDING",
                "storage_state": "AVAILABLE",
            }
            s.runs[run["run_id"]] = run
            return 200, run

        if method == "POST" and path == f"{API}/recurringruns":
            err = self._check_job(body)
            if err:
                return err
            trigger = body.get("trigger") or {}
            if not (trigger.get("cron_schedule") or trigger.get("periodic_schedule")):
                return _error(400, 3, "recurring run needs a trigger (cron_schedule or periodic_schedule)")
            rec = {**body, "recurring_run_id": str(uuid.uuid4()), "created_at": _now(), "status": "ENABLED"}
            s.recurring_runs[rec["recurring_run_id"]] = rec
            return 200, rec

        m = re.fullmatch(rf"{API}/(experiments|runs|recurringruns)/([^/:]+)", path)
        if method == "GET" and m:
            store = {"experiments": s.experiments, "runs": s.runs, "recurringruns": s.recurring_runs}[m.group(1)]
            if m.group(2) in store:
                return 200, store[m.group(2)]
            return _error(404, 5, f"{m.group(1)} '{m.group(2)}' not found")

        return _error(404, 5, f"fake KFP server does not implement {method} {path}")

    def _check_job(self, body: Any) -> tuple[int, dict[str, Any]] | None:
        """What the API server checks before it accepts a run or recurring run."""
        if not isinstance(body, dict):
            return _error(400, 3, "request body must be a JSON object")
        exp_id = body.get("experiment_id")
        if exp_id and exp_id not in self._state.experiments:
            return _error(404, 5, f"experiment '{exp_id}' not found")
        if not body.get("pipeline_spec") and not body.get("pipeline_version_reference"):
            return _error(400, 3, "either pipeline_spec or pipeline_version_reference is required")
        if not body.get("display_name"):
            return _error(400, 3, "display_name is required")
        return None

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self) -> None:
                parts = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body: Any = json.loads(raw) if raw else None
                except ValueError:
                    body = raw.decode("utf-8", "replace")
                rec = RecordedRequest(self.command, parts.path, parse_qs(parts.query), body)
                with server._lock:
                    server._state.requests.append(rec)
                    try:
                        status, payload = server._dispatch(self.command, parts.path, rec.query, body)
                    except Exception as exc:  # a bug in the fake or an unsupported request: answer, don't hang
                        status, payload = _error(500, 13, f"fake KFP server error: {exc!r}")
                    rec.status = status
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = do_PATCH = _handle

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (BaseHTTPRequestHandler API)
                pass

        return Handler
