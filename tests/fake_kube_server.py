"""A fake Kubernetes API server for the PyTorchJob launcher, driven by the real `kubernetes` Python client.

No cluster runs in tests, so only the API server (and, by a test's choice, the training operator) is faked: the real
client, its serialisation and its error handling go over real HTTP to this server on 127.0.0.1. It implements what
`ctrflow.training.pytorchjob.run_pytorchjob` calls, keeps the objects in memory and records every request:

    POST   /api/v1/namespaces/{ns}/configmaps                            create (409 AlreadyExists on a duplicate)
    POST   /apis/kubeflow.org/v1/namespaces/{ns}/pytorchjobs              create: 422 Invalid, with the schema errors,
                                                                          when `validate(body)` finds any (the API
                                                                          server's strict field validation)
    GET    /apis/kubeflow.org/v1/namespaces/{ns}/pytorchjobs/{name}       the object with its current status
    DELETE /apis/kubeflow.org/v1/namespaces/{ns}/pytorchjobs/{name}

Anything else answers 404 (as an API server without the CRD would) and is recorded. `operator(server, job)` is
called in a thread after a PyTorchJob is created: it plays the training operator, setting conditions with
`set_condition` (type Created / Running / Succeeded / Failed, the reasons the operator uses).
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_CONFIGMAPS = re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/configmaps$")
_JOBS = re.compile(r"^/apis/kubeflow\.org/v1/namespaces/(?P<ns>[^/]+)/pytorchjobs(?:/(?P<name>[^/]+))?$")


@dataclass
class Recorded:
    method: str
    path: str
    body: Any
    status: int = 0


@dataclass
class FakeKubeServer:
    validate: Callable[[dict], list[str]] = lambda body: []
    operator: Callable[[FakeKubeServer, dict], None] | None = None
    crd_installed: bool = True  # False: the pytorchjobs endpoints answer 404, as without the training operator
    unavailable_reads: int = 0  # the first this many GETs of a job answer 503 (an API server restarting)
    configmaps: dict[tuple[str, str], dict] = field(default_factory=dict)
    jobs: dict[tuple[str, str], dict] = field(default_factory=dict)
    requests: list[Recorded] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""

    def set_condition(self, ns: str, name: str, kind: str, reason: str, message: str = "") -> None:
        """Append a JobCondition (status "True"); Running/Created stop being current as the operator does."""
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        with self.lock:
            job = self.jobs[(ns, name)]
            conditions = job.setdefault("status", {}).setdefault("conditions", [])
            if kind in ("Succeeded", "Failed"):
                for c in conditions:
                    if c["type"] == "Running":
                        c["status"] = "False"
            conditions.append({"type": kind, "status": "True", "reason": reason, "message": message,
                               "lastUpdateTime": now, "lastTransitionTime": now})  # fmt: skip

    def start(self) -> FakeKubeServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _reply(self, status: int, body: dict, rec: Recorded) -> None:
                rec.status = status
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _status(self, code: int, reason: str, message: str, rec: Recorded) -> None:
                self._reply(code, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message,
                                   "reason": reason, "code": code}, rec)  # fmt: skip

            def _handle(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw else None
                path = self.path.split("?")[0]
                rec = Recorded(method, path, body)
                with server.lock:
                    server.requests.append(rec)
                if m := _CONFIGMAPS.match(path):
                    if method != "POST":
                        return self._status(405, "MethodNotAllowed", method, rec)
                    key = (m["ns"], body["metadata"]["name"])
                    if key in server.configmaps:
                        return self._status(409, "AlreadyExists", f'configmaps "{key[1]}" already exists', rec)
                    server.configmaps[key] = body
                    return self._reply(201, body, rec)
                if (m := _JOBS.match(path)) and server.crd_installed:
                    ns, name = m["ns"], m["name"]
                    if method == "POST" and name is None:
                        errors = server.validate(body)
                        if errors:
                            return self._status(422, "Invalid", f'PyTorchJob.kubeflow.org "{body["metadata"]["name"]}" is invalid: {"; ".join(errors)}', rec)
                        key = (ns, body["metadata"]["name"])
                        with server.lock:
                            if key in server.jobs:
                                return self._status(409, "AlreadyExists", f'pytorchjobs.kubeflow.org "{key[1]}" already exists', rec)
                            server.jobs[key] = json.loads(json.dumps(body))
                        if server.operator is not None:
                            t = threading.Thread(target=server.operator, args=(server, server.jobs[key]), daemon=True)
                            server.threads.append(t)
                            t.start()
                        return self._reply(201, body, rec)
                    if name is not None and (ns, name) in server.jobs:
                        if method == "GET" and server.unavailable_reads > 0:
                            server.unavailable_reads -= 1
                            return self._status(503, "ServiceUnavailable", "the server is currently unable to handle the request", rec)
                        if method == "GET":
                            with server.lock:
                                return self._reply(200, json.loads(json.dumps(server.jobs[(ns, name)])), rec)
                        if method == "DELETE":
                            with server.lock:
                                server.jobs.pop((ns, name))
                            return self._reply(200, {"kind": "Status", "status": "Success"}, rec)
                    if name is not None:
                        return self._status(404, "NotFound", f'pytorchjobs.kubeflow.org "{name}" not found', rec)
                return self._status(404, "NotFound", "the server could not find the requested resource", rec)

            def do_GET(self) -> None:
                self._handle("GET")

            def do_POST(self) -> None:
                self._handle("POST")

            def do_DELETE(self) -> None:
                self._handle("DELETE")

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        for t in self.threads:
            t.join(timeout=60)

    def kubeconfig(self) -> str:
        """A kubeconfig naming this server (what `kubernetes.config.new_client_from_config` reads from $KUBECONFIG)."""
        return json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {"token": "fake-token"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
        })  # fmt: skip
