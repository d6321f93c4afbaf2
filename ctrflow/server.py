"""Start, probe and stop a real `bentoml serve` process for a deployment (used by the CLI, make run, tests).

`bentoml serve` runs in its own process group (its arbiter and workers), so stopping it means signalling the group:
a SIGTERM to the parent alone leaves the workers serving under PID 1 with the port bound (PITFALLS.md). Both the
background server (`start_server`) and the foreground one (`serve_foreground`, what `ctrflow serve` runs) stop the
whole group, wait for it to be gone, and only then return.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from ctrflow.config import REPO_ROOT

SERVICE = "serving.service:RankingService"
STOP_TIMEOUT_S = 30.0  # graceful stop (answer what is in flight, flush the request log) before SIGKILL

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_in_use(host: str, port: int) -> str | None:
    """Why `host:port` cannot be listened on (the OS's reason), or None when it can. SO_REUSEADDR as the server sets
    it, so a port left in TIME_WAIT by a server that just stopped counts as free; a listening process does not."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


DEPLOYMENT_KEYS = ("feature_repo", "bentoml_home")  # and model_tag or model_name


class DeploymentError(ValueError):
    """A deployment.json that cannot be used; the message names the file, the key and the rule."""


def read_deployment(path: str | Path, *, serving: bool = True) -> dict[str, Any]:
    """A deployment.json (written by the deploy step) as a dict: a JSON object, holding (`serving`: what the service
    needs) `feature_repo`, `bentoml_home` and `model_tag` or `model_name`. Raises DeploymentError naming the file and what is wrong (a
    hand-edited file used to stop `ctrflow serve` with a bare KeyError such as "'bentoml_home'")."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise DeploymentError(f"{path}: cannot read the deployment file: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        where = f" (line {exc.lineno}, column {exc.colno})" if isinstance(exc, json.JSONDecodeError) else ""
        raise DeploymentError(f"{path}: the deployment file is not valid JSON{where}") from None
    if not isinstance(data, dict):
        raise DeploymentError(f"{path}: the deployment file must be a JSON object, not {type(data).__name__}")
    missing = [k for k in DEPLOYMENT_KEYS if not isinstance(data.get(k), str) or not data[k].strip()]
    if not data.get("model_tag") and not data.get("model_name"):
        missing.append("model_tag or model_name")
    if missing and serving:
        raise DeploymentError(
            f"{path}: the deployment file lacks {', '.join(repr(k) for k in missing)} (non-empty text); it is written "
            "by the pipeline's deploy step (`ctrflow register --deploy`), with feature_repo, bentoml_home and model_tag"
        )
    return data


def service_env(
    deployment: dict[str, Any],
    request_log: str | Path,
    threads: int | None = None,
    workers: int | None = None,
    item_cache_refresh_s: float | None = None,
    request_log_compaction: str | None = None,
    *,
    request_log_flush_rows: int | None = None,
    request_log_flush_seconds: float | None = None,
) -> dict[str, str]:
    """The environment the service reads its configuration from (see serving/service.py).

    A deployment without `model_tag` serves the registry's production model of `model_name`. `threads` (torch
    threads per worker), `workers` (BentoML worker processes), `item_cache_refresh_s`, `request_log_compaction` and
    `request_log_flush_rows` / `_seconds`: params `serving.*`; None takes the typed default.
    """
    from ctrflow.config import ServingParams

    defaults = ServingParams()
    threads = defaults.threads if threads is None else int(threads)
    workers = defaults.workers if workers is None else int(workers)
    refresh = defaults.item_cache_refresh_s if item_cache_refresh_s is None else float(item_cache_refresh_s)
    compaction = request_log_compaction or defaults.request_log_compaction
    flush_rows = defaults.request_log_flush_rows if request_log_flush_rows is None else int(request_log_flush_rows)
    flush_seconds = defaults.request_log_flush_seconds if request_log_flush_seconds is None else float(request_log_flush_seconds)
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
            "CTRFLOW_FEATURE_SERVICE": str(deployment.get("feature_service") or env.get("CTRFLOW_FEATURE_SERVICE") or "ctr_ranking"),
            "CTRFLOW_REQUEST_LOG": str(Path(request_log).resolve()),
            "OMP_NUM_THREADS": str(threads),
            "CTRFLOW_TORCH_THREADS": str(threads),
            "CTRFLOW_SERVING_WORKERS": str(workers),
            "CTRFLOW_ITEM_CACHE_REFRESH_S": str(refresh),
            "CTRFLOW_REQUEST_LOG_COMPACTION": compaction,
            "CTRFLOW_REQUEST_LOG_FLUSH_ROWS": str(flush_rows),
            "CTRFLOW_REQUEST_LOG_FLUSH_SECONDS": str(flush_seconds),
            "BENTOML_DO_NOT_TRACK": "true",
            "FEAST_USAGE": "False",
        }
    )
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def _group_alive(pgid: int) -> bool:
    """Whether a live (non-zombie) process is left in the process group: a zombie waiting for a reaper (in a container
    whose PID 1 does not reap) serves nothing and holds no port."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a member we may not signal is still a member
        return True
    import psutil

    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return False


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def stop_group(process: subprocess.Popen, timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM to the process group `process` leads (it was started with start_new_session), wait until every
    member is gone (BentoML answers what is in flight and runs shutdown hooks: the request log flushes there), then
    SIGKILL whatever is left after `timeout`. Reaps `process`."""
    pgid = process.pid
    _signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None and not _group_alive(pgid):
            return
        time.sleep(0.1)
    log.warning("bentoml serve (process group %d) still running %.0fs after SIGTERM: killing it", pgid, timeout)
    _signal_group(pgid, signal.SIGKILL)
    process.wait(timeout=10)
    while _group_alive(pgid) and time.monotonic() < deadline + 10:
        time.sleep(0.1)


def serve_foreground(cmd: list[str], env: dict[str, str], *, stop_timeout: float = STOP_TIMEOUT_S, cwd: str | Path | None = None) -> int:
    """Run `bentoml serve` (`cmd`) in its own process group until it exits or this process gets SIGTERM, SIGINT or
    SIGHUP; the signal is forwarded to the whole group as SIGTERM and this returns only once every process of the
    group is gone (SIGKILL after `stop_timeout`), so no worker is left serving and the port is free.

    Returns 0 after a stop asked for by a signal, else the server's own exit code.
    """
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, start_new_session=True)
    stopping: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        if not stopping:
            log.info("received %s: stopping bentoml serve (process group %d)", signal.Signals(signum).name, proc.pid)
        stopping.append(signum)
        _signal_group(proc.pid, signal.SIGTERM)

    handled = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    previous = {s: signal.signal(s, forward) for s in handled}
    try:
        while proc.poll() is None and not stopping:
            try:
                proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                pass
        if stopping or _group_alive(proc.pid):  # the arbiter may exit before its workers
            stop_group(proc, stop_timeout)
    finally:
        if proc.poll() is None or _group_alive(proc.pid):
            stop_group(proc, stop_timeout)
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 0 if stopping else int(proc.returncode or 0)


@dataclass
class RunningServer:
    process: subprocess.Popen
    url: str
    log_path: Path

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM to the server's whole process group lets BentoML run shutdown hooks (the request log flushes
        there); returns once no process of the group is left."""
        if self.process.poll() is None or _group_alive(self.process.pid):
            stop_group(self.process, timeout)

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
    workers: int | None = None,
    threads: int | None = None,
    item_cache_refresh_s: float | None = None,
    request_log_compaction: str | None = None,
    request_log_flush_rows: int | None = None,
    request_log_flush_seconds: float | None = None,
    log_path: str | Path | None = None,
    ready_timeout: float = 120.0,
    extra_env: dict[str, str] | None = None,
    service: str = SERVICE,
) -> RunningServer:
    """`bentoml serve` of `service` in a subprocess; returns once /readyz answers 200 (or raises with the server's
    log). workers / threads / item_cache_refresh_s / request_log_compaction / request_log_flush_*: as `service_env`
    (None: the typed defaults)."""
    if not isinstance(deployment, dict):
        deployment = read_deployment(deployment)
    port = port or free_port()
    log_path = Path(log_path or Path(request_log).parent / "server.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "bentoml", "serve", service, "--host", host, "--port", str(port), "--working-dir", str(REPO_ROOT)]
    env = service_env(
        deployment, request_log, threads, workers, item_cache_refresh_s, request_log_compaction,
        request_log_flush_rows=request_log_flush_rows, request_log_flush_seconds=request_log_flush_seconds,
    )  # fmt: skip
    env.update(extra_env or {})
    log_file = open(log_path, "w")  # noqa: SIM115 - handed to the child process
    proc = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT, cwd=REPO_ROOT, start_new_session=True)
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


def auth_headers(serving: Mapping[str, Any] | None) -> dict[str, str]:
    """The Authorization header for a service whose serving section names a token variable ({} when none does)."""
    from ctrflow.guard import ENV_AUTH_TOKEN_ENV, token_from_env

    name = (serving or {}).get("auth_token_env")
    if not name:
        return {}
    return {"Authorization": f"Bearer {token_from_env({**os.environ, ENV_AUTH_TOKEN_ENV: str(name)})}"}


def rank(
    url: str, user_id: int, scenario: str, item_ids: list[int], timeout: float = 30.0, headers: Mapping[str, str] | None = None
) -> dict[str, Any]:
    body = {"user_id": user_id, "scenario": scenario, "item_ids": item_ids}
    response = httpx.post(url + "/rank", json=body, timeout=timeout, headers=dict(headers or {}))
    response.raise_for_status()
    return response.json()
