"""Throw-away local services, each on a free localhost port and stopped afterwards: Redis and PostgreSQL.

For the tests (tests/conftest.py), the benchmarks and trying the production profile on one machine. Redis is
Debian's `redis-server` (`make system-deps` installs it when missing). PostgreSQL: a throw-away database with a unique name on the server named by $CTRFLOW_TEST_PG
(default postgresql://postgres@127.0.0.1:5432/postgres), dropped afterwards; where no server answers there, a
cluster of our own is initialised (`initdb`, as the `postgres` user when run as root) and started on a free port.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

START_TIMEOUT_S = 30.0
ONLINE_STORES = ("sqlite", "redis")  # the online stores every online test runs on (a pytest parameter)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(check, what: str, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            break
        with contextlib.suppress(Exception):
            if check():
                return
        time.sleep(0.1)
    tail = log.read_text()[-2000:] if log and log.exists() else ""
    raise RuntimeError(f"{what} did not start within {START_TIMEOUT_S:.0f} s{': ' + tail if tail else ''}")


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """A fresh `redis-server` on a free port, nothing kept on disk; yields Feast's connection string host:port."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed: `apt-get install redis-server` (.ci/run does it)")
    import redis

    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="ctrflow-redis-"))
    log = workdir / "redis.log"
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(workdir),
         "--logfile", str(log)],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )
    try:
        _wait(lambda: redis.Redis(host="127.0.0.1", port=port, socket_timeout=1).ping(), "redis-server", proc, log)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)


def _pg_answers(url: str) -> bool:
    import psycopg

    try:
        with psycopg.connect(url, connect_timeout=2) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.OperationalError:
        return False


def _pg_bin(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if found is None:
        raise RuntimeError(f"PostgreSQL's {name} is not installed: `apt-get install postgresql` (.ci/run does it)")
    return found


@contextlib.contextmanager
def _own_cluster() -> Iterator[str]:
    """initdb + pg_ctl on a free port in a temp folder (trust auth, localhost only); yields the admin URL."""
    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="ctrflow-pg-"))
    data, log = workdir / "data", workdir / "pg.log"
    run_as: list[str] = []
    user = os.environ.get("USER") or "postgres"
    if os.geteuid() == 0:  # initdb refuses root
        user = "postgres"
        shutil.chown(workdir, user)
        run_as = ["runuser", "-u", user, "--"]
    subprocess.run([*run_as, _pg_bin("initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"],
                   check=True, capture_output=True)
    subprocess.run(
        [*run_as, _pg_bin("pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-o",
         f"-p {port} -c listen_addresses=127.0.0.1 -k {workdir}", "start"],
        check=True, capture_output=True,
    )
    try:
        url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        _wait(lambda: _pg_answers(url), "PostgreSQL", None, log)
        yield url
    finally:
        subprocess.run([*run_as, _pg_bin("pg_ctl"), "-D", str(data), "-m", "fast", "stop"], capture_output=True)
        shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    """A new, uniquely named database; yields its SQLAlchemy URL (postgresql+psycopg://...). Dropped afterwards."""
    import psycopg

    admin = os.environ.get("CTRFLOW_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
    with contextlib.ExitStack() as stack:
        if not _pg_answers(admin):
            admin = stack.enter_context(_own_cluster())
        name = f"ctrflow_test_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        try:
            base, _, _ = admin.rpartition("/")
            yield f"{base.replace('postgresql://', 'postgresql+psycopg://', 1)}/{name}"
        finally:
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def use_production_stores(repo: str | Path, *keys: str) -> Path:
    """Swap the blocks `keys` (registry, offline_store, online_store) of a repo copy's feature_store.yaml for the
    production profile's, verbatim (hosts from environment variables): tests and benchmarks run the very blocks a
    production deployment does, one engine at a time."""
    import yaml

    from ctrflow.features import TEMPLATE_REPO, profile_file

    path = Path(repo) / "feature_store.yaml"
    config = yaml.safe_load(path.read_text())
    production = yaml.safe_load(profile_file(TEMPLATE_REPO, "production").read_text())
    for key in keys:
        config[key] = production[key]
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
