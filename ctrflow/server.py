"""Start, probe and stop a real `bentoml serve` process for a deployment (used by the CLI, make run, tests)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from ctrflow.config import REPO_ROOT

SERVICE = "serving.service:RankingService"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def service_env(deployment: dict[str, Any], request_log: str | Path, threads: int = 1) -> dict[str, str]:
    """The environment the service reads its configuration from (see serving/service.py).

    A deployment without `model_tag` serves the registry's production model of `model_name`.
    """
    env = dict(os.environ)
    env.pop("CTRFLOW_MODEL_TAG", None)
    tag = deployment.get("model_tag")
    if tag:
        env["CTRFLOW_MODEL_TAG"] = str(tag)
    env.update(
        {
            "BENTOML_HOME": str(deployment["bentoml_home"]),
            "CTRFLOW_FEATURE_REPO": str(deployment["feature_repo"]),
            "CTRFLOW_MODEL_NAME": deployment.get("model_name") or str(tag).split(":")[0],
            "CTRFLOW_REQUEST_LOG": str(Path(request_log).resolve()),
            "OMP_NUM_THREADS": str(threads),
            "BENTOML_DO_NOT_TRACK": "true",
            "FEAST_USAGE": "False",
        }
    )
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


@dataclass
class RunningServer:
    process: subprocess.Popen
    url: str
    log_path: Path

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM lets BentoML run shutdown hooks (the request log flushes there)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_server(
    deployment: dict[str, Any] | str | Path,
    request_log: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    workers: int = 1,
    threads: int = 1,
    log_path: str | Path | None = None,
    ready_timeout: float = 120.0,
    extra_env: dict[str, str] | None = None,
) -> RunningServer:
    """`bentoml serve` in a subprocess; returns once /readyz answers 200 (or raises with the server's log)."""
    if not isinstance(deployment, dict):
        deployment = json.loads(Path(deployment).read_text())
    port = port or free_port()
    log_path = Path(log_path or Path(request_log).parent / "server.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "bentoml", "serve", SERVICE, "--host", host, "--port", str(port), "--working-dir", str(REPO_ROOT)]
    env = service_env(deployment, request_log, threads)
    env["CTRFLOW_SERVING_WORKERS"] = str(workers)
    env.update(extra_env or {})
    log_file = open(log_path, "w")  # noqa: SIM115 - handed to the child process
    proc = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
    server = RunningServer(proc, f"http://{host}:{port}", log_path)
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"bentoml serve exited with code {proc.returncode}; log:\n{log_path.read_text()[-4000:]}")
        try:
            if httpx.get(server.url + "/readyz", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    server.stop()
    raise TimeoutError(f"bentoml serve not ready after {ready_timeout:.0f}s; log:\n{log_path.read_text()[-4000:]}")


def rank(url: str, user_id: int, scenario: str, item_ids: list[int], timeout: float = 30.0) -> dict[str, Any]:
    response = httpx.post(url + "/rank", json={"user_id": user_id, "scenario": scenario, "item_ids": item_ids}, timeout=timeout)
    response.raise_for_status()
    return response.json()
