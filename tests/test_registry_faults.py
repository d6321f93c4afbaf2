"""Registration as a transaction, under faults: real `ctrflow register` processes killed with SIGKILL at every step
of a registration (and at a sweep of times), four registrations at once, and a store damaged by an older version.
After each, store and ledger are consistent (`registry.check_consistency()` is empty after the next write), no
unrecorded model is listed as a candidate, and the next `register` works."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ctrflow import registry
from ctrflow.config import REPO_ROOT

pytestmark = pytest.mark.slow  # each case starts real `ctrflow` processes (a few seconds each on 2 cores)

FAULT_POINTS = ("copying", "staged", "pending", "moved", "recorded")
DATASET = "faults"
NAME = registry.default_model_name(DATASET)  # what `ctrflow register` names it (registry.model_name is null)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_dataset, tiny_frame):
    """A real (untrained) DCNv2 artifact as `ctrflow train` writes it."""
    from ctrflow.data.encoding import FeatureEncoder
    from ctrflow.data.spec import FeatureSpec
    from ctrflow.models import build_model
    from ctrflow.training.artifact import save_model_artifact

    torch.set_num_threads(1)
    spec = FeatureSpec.from_dict(tiny_dataset.spec.to_dict())
    spec.extra["dataset"] = DATASET  # as Dataset.save records it
    encoder = FeatureEncoder(spec).fit(tiny_frame)
    model = build_model("dcnv2", encoder, {"embedding_dim": 4, "cross_layers": 1, "mlp": [8]})
    path = tmp_path_factory.mktemp("artifact") / "model"
    return save_model_artifact(path, model, encoder, {"valid": {"auc": 0.6}, "test": {"auc": 0.6}}, {"model": "dcnv2"})


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "bentoml"))
    monkeypatch.setenv("CTRFLOW_USER", "tester")
    return tmp_path / "bentoml"


def _env(home: Path, tmp: Path, fault: str | None = None) -> dict[str, str]:
    env = {**os.environ, "BENTOML_HOME": str(home), "TMPDIR": str(tmp), "CTRFLOW_USER": "tester"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env.pop(registry.FAULT_ENV, None)
    if fault:
        env[registry.FAULT_ENV] = fault
    return env


def _register_cmd(model_dir: Path) -> list[str]:
    return [sys.executable, "-m", "ctrflow.cli", "--set", "gate.reference_model=null", "register", "--model-dir", str(model_dir)]


def _register(model_dir: Path, home: Path, tmp: Path, fault: str | None = None) -> subprocess.CompletedProcess:
    tmp.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        _register_cmd(model_dir), env=_env(home, tmp, fault), cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )


def _assert_no_unrecorded_candidates() -> None:
    ledger_stages = {t: s for e in registry._read_ledger()["models"].values() for t, s in e["stages"].items()}
    for row in registry.list_models():
        if row["stage"] == registry.CANDIDATE:
            assert ledger_stages.get(row["tag"]) == registry.CANDIDATE, row


def _assert_latest_pointers_valid(home: Path) -> None:
    for latest in (home / "models").glob("*/latest"):
        version = latest.read_text().strip()
        assert version and (latest.parent / version / "model.yaml").is_file(), (latest, version)


def _candidates() -> list[str]:
    return sorted(r["tag"] for r in registry.list_models() if r["stage"] == registry.CANDIDATE)


def test_kill_at_every_step_of_a_registration_leaves_store_and_ledger_consistent(home, model_dir, tmp_path):
    registered: list[str] = []
    for point in FAULT_POINTS:
        proc = _register(model_dir, home, tmp_path / "tmp", fault=point)
        assert proc.returncode == -signal.SIGKILL, (point, proc.returncode, proc.stderr[-2000:])
        _assert_no_unrecorded_candidates()  # listing repairs first (the lock is free: nobody is registering)
        assert registry.check_consistency() == [], point
        _assert_latest_pointers_valid(home)
        if point == "recorded":  # killed after the ledger write: the registration is complete
            registered.append(registry.resolve_tag(NAME))
        assert _candidates() == sorted(registered), point
        proc = _register(model_dir, home, tmp_path / "tmp")  # the next `register` works
        assert proc.returncode == 0, (point, proc.stderr[-3000:])
        registered.append(registry.resolve_tag(NAME))
        assert registry.check_consistency() == [], point
        assert _candidates() == sorted(registered), point
    assert len(set(registered)) == len(FAULT_POINTS) + 1
    actions = [h for e in registry._read_ledger()["models"].values() for h in e["history"]]
    assert sum(h["action"] == "rollback-registration" for h in actions) == 2  # "pending" and "moved" were rolled back


def test_a_sweep_of_kill_times_never_leaves_an_inconsistent_store(home, model_dir, tmp_path):
    """SIGKILL at fractions of one registration's own duration (most of it is start-up; the end is the write)."""
    started = time.monotonic()
    assert _register(model_dir, home, tmp_path / "tmp").returncode == 0
    duration = time.monotonic() - started
    for fraction in (0.8, 0.88, 0.93, 0.97, 1.0):
        proc = subprocess.Popen(
            _register_cmd(model_dir), env=_env(home, tmp_path / "tmp"), cwd=REPO_ROOT,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        time.sleep(duration * fraction)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        _assert_no_unrecorded_candidates()
        assert registry.check_consistency() == [], fraction
        _assert_latest_pointers_valid(home)
    before = len(_candidates())
    assert _register(model_dir, home, tmp_path / "tmp").returncode == 0
    assert len(_candidates()) == before + 1 and registry.check_consistency() == []


def test_four_concurrent_registrations_all_succeed_and_are_all_recorded(home, model_dir, tmp_path):
    (tmp_path / "tmp").mkdir()
    procs = [
        subprocess.Popen(
            _register_cmd(model_dir), env=_env(home, tmp_path / "tmp"), cwd=REPO_ROOT,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        for _ in range(4)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [e[-2000:] for _, e in outs]
    assert len(_candidates()) == 4
    assert registry.check_consistency() == []
    _assert_latest_pointers_valid(home)


def test_a_store_damaged_by_an_older_version_is_repaired_by_the_next_register(home, model_dir, tmp_path):
    """The issue's state: an empty `latest`, a version folder without model.yaml, and a complete model the ledger
    never recorded. BentoML's own listing fails on it; `register` repairs it and works, and the unrecorded model is
    listed as `unrecorded`, never as a candidate."""
    name = NAME
    from ctrflow.data.encoding import FeatureEncoder

    first = registry.register_model(
        model_dir, metrics={"valid": {"auc": 0.6}}, params={"model": "dcnv2"},
        feature_spec=FeatureEncoder.load(model_dir / "encoder.json").spec,
        data_fingerprint="sha256:x", code_version="x",
    )  # fmt: skip
    # an unrecorded complete model: a copy of the first under another version, the ledger unaware of it
    import shutil

    import yaml

    unrecorded_dir = home / "models" / name / "unrecorded0001"
    shutil.copytree(home / "models" / name / first.split(":")[1], unrecorded_dir)
    info = yaml.safe_load((unrecorded_dir / "model.yaml").read_text())
    info["version"] = "unrecorded0001"
    (unrecorded_dir / "model.yaml").write_text(yaml.safe_dump(info))
    (home / "models" / name / "half0002").mkdir()  # a crashed BentoML write: no model.yaml
    (home / "models" / name / "latest").write_text("")  # truncated pointer
    import bentoml
    from bentoml._internal.models import ModelStore

    with pytest.raises(Exception, match="model.yaml"):
        bentoml.models.list(name, _model_store=ModelStore(str(home / "models")))  # what used to break every register

    proc = _register(model_dir, home, tmp_path / "tmp")
    assert proc.returncode == 0, proc.stderr[-3000:]
    stages = {r["tag"]: r["stage"] for r in registry.list_models()}
    assert stages[f"{name}:unrecorded0001"] == registry.UNRECORDED
    assert sorted(t for t, s in stages.items() if s == registry.CANDIDATE) == _candidates() and len(_candidates()) == 2
    assert not (home / "models" / name / "half0002").exists()
    assert list((home / registry.QUARANTINE_DIR).glob(f"{name}-half0002-*"))
    _assert_latest_pointers_valid(home)
    assert registry.check_consistency() == [f"{name}:unrecorded0001 is in the store but not in the ledger"]
    gated = registry.gate(f"{name}:unrecorded0001", min_valid_auc=0.5)
    assert not gated.passed and "not recorded" in gated.reasons[0]
    # `ctrflow models list` shows it as unrecorded, with data set and family
    out = subprocess.run(
        [sys.executable, "-m", "ctrflow.cli", "models", "list"], env=_env(home, tmp_path / "tmp"), cwd=REPO_ROOT,
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    line = next(line for line in out.stdout.splitlines() if "unrecorded0001" in line)
    assert "unrecorded" in line.split() and DATASET in line.split() and "dcnv2" in line.split()
