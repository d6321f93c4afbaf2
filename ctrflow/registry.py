"""The model registry: trained artifacts in the BentoML model store, plus stages and a promotion gate.

Why BentoML's store: the service loads from it, `bentoml build` packs from it, and `bentoml models export/import`
moves it to object storage, so a registered model is already a deployable one.

Why a ledger beside it: BentoML model labels and metadata are frozen at creation (``ModelInfo`` is an immutable
attrs class in 1.4; there is no update call), so a model's *stage* cannot live in its labels. The stages
(candidate / production / archived), the gate decisions and the history of every transition (who, when, why) are
kept in one small JSON file, ``$BENTOML_HOME/ctrflow_stages.json``. A model's labels keep what never changes
(family, dataset, split, ``registered_stage=candidate``); the ledger is the source of truth for its current stage,
and it guarantees at most one production model per name.

Registration is a transaction (`register_model`), under one exclusive file lock (``ctrflow_registry.lock``) that
every writer of the store or the ledger takes:
1. the model is built complete in a staging store (``$BENTOML_HOME/.ctrflow_staging``), never in the real one;
2. the ledger records it as *pending* (atomic write: temporary file, fsync, rename);
3. one ``rename`` moves the finished model directory into the store;
4. one ledger write turns *pending* into *candidate*;
5. BentoML's ``latest`` pointer is rewritten through a temporary file and a rename (never truncated in place).
A registration killed at any point leaves either nothing, or a pending entry that the next writer rolls back
(`repair`, run first under the lock by every write): the half-moved model is removed, staging leftovers are deleted,
model directories without ``model.yaml`` (left by a crashed BentoML write) are moved to ``.ctrflow_quarantine``, and
empty or dangling ``latest`` pointers are rewritten. Nothing here reads the ``latest`` pointers: 'name' and
'name:latest' resolve to the newest complete model directory. A model in the store that the ledger never recorded
(imported by hand, or left by an older ctrflow) is listed with the stage ``unrecorded``, never as a candidate.

Model names default per data set (``ctrflow-<dataset>``, `default_model_name`), so two data sets in one store never
share a production slot; the gate compares a candidate only with a production model of its own data set.

The store is resolved from ``$BENTOML_HOME`` on every call (BentoML itself resolves it once per process), so a test
or a pipeline step that points ``BENTOML_HOME`` somewhere else is honoured even after bentoml was imported.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import getpass
import hashlib
import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

DEFAULT_NAME = "ctrflow-ranker"  # the name used when neither a name nor a data set is known
NAME_PREFIX = "ctrflow-"
CANDIDATE, PRODUCTION, ARCHIVED = "candidate", "production", "archived"
STAGES = (CANDIDATE, PRODUCTION, ARCHIVED)
UNRECORDED = "unrecorded"  # in the store, never recorded by the ledger: not a candidate, not promotable by the gate
REGISTERING = "registering"  # moved into the store, its ledger entry not yet written (seen only mid-registration)
LEDGER_NAME = "ctrflow_stages.json"
LOCK_NAME = "ctrflow_registry.lock"
STAGING_DIR = ".ctrflow_staging"
QUARANTINE_DIR = ".ctrflow_quarantine"
REGISTRATION_FILE = "ctrflow_registration.json"  # full-fidelity copy of what went into the metadata
MODEL_YAML = "model.yaml"  # what makes a store directory a complete BentoML model
FAULT_ENV = "CTRFLOW_REGISTRY_FAULT"  # tests only: SIGKILL this process at the named point of a registration
FINGERPRINT_ITEMS = 1024  # item-side fingerprints cover the first N item ids of the model's vocabulary


class RegistryError(RuntimeError):
    """A registry operation cannot be done; the message says which model and why."""


class PromotionError(RegistryError):
    """A promotion was refused (gate failed or never run) and was not forced."""


class GateFailedError(RegistryError):
    """A run stopped because its candidate failed the promotion gate; the message holds the reasons and metrics."""


@dataclass
class GateDecision:
    """The promotion gate's verdict for one candidate, with every reason that led to it.

    Metrics dicts hold the headline numbers (valid/test AUC and logloss) of the candidate, the reference trained in
    the same run, and the production model of the same data set, so a failed gate can show all of them.
    """

    tag: str
    passed: bool
    reasons: list[str]
    candidate_valid_auc: float | None
    production_tag: str | None
    production_valid_auc: float | None
    min_valid_auc: float | None = None
    tolerance: float = 0.0
    reference_model: str | None = None
    reference_valid_auc: float | None = None
    min_lift_over_reference: float = 0.0
    dataset: str = ""
    candidate_metrics: dict[str, float | None] = field(default_factory=dict)
    reference_metrics: dict[str, float | None] = field(default_factory=dict)
    production_metrics: dict[str, float | None] = field(default_factory=dict)
    at: str = field(default_factory=lambda: _now())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GateDecision:
        """A decision as the ledger stored it (older ledgers lack the newer fields: their defaults apply)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def summary(self) -> str:
        """Several lines: the verdict, the reasons, and the metrics of every model compared."""
        lines = [f"promotion gate for {self.tag}: {'PASSED' if self.passed else 'FAILED'}"]
        lines += [f"  - {r}" for r in self.reasons]
        rows = [("candidate", self.tag, self.candidate_metrics)]
        if self.reference_model:
            rows.append(("reference", f"{self.reference_model} (same run, same training set)", self.reference_metrics))
        if self.production_tag:
            rows.append(("production", self.production_tag, self.production_metrics))
        lines.append(f"  {'model':<11} {'valid_auc':>9} {'test_auc':>9} {'valid_logloss':>13}  tag")
        for role, tag, m in rows:
            lines.append(
                f"  {role:<11} {_fmt(m.get('valid_auc')):>9} {_fmt(m.get('test_auc')):>9} {_fmt(m.get('valid_logloss')):>13}  {tag}"
            )
        return "\n".join(lines)


def _fmt(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, int | float) and not (isinstance(x, float) and math.isnan(x)) else "-"


# ---- names ----------------------------------------------------------------------------------------------
def default_model_name(dataset: str | None) -> str:
    """`ctrflow-<dataset>`, made a valid BentoML tag name (lowercase; letters, digits, '-', '_', '.'; <= 63 chars).

    Per data set, so a model of one data set never takes the production slot of another.
    """
    slug = re.sub(r"[^a-z0-9._-]+", "-", str(dataset or "").strip().lower()).strip("-._")
    if not slug:
        return DEFAULT_NAME
    return (NAME_PREFIX + slug)[:63].rstrip("-._")


def model_name_for(params: dict[str, Any], dataset: str | None) -> str:
    """registry.model_name from params when set, else the per-data-set default (`default_model_name`)."""
    configured = (params.get("registry") or {}).get("model_name")
    return str(configured) if configured else default_model_name(dataset)


# ---- store, lock and ledger -----------------------------------------------------------------------------
def bentoml_home() -> Path:
    """$BENTOML_HOME when set, else BentoML's own default (~/bentoml)."""
    env = os.environ.get("BENTOML_HOME")
    if env:
        return Path(os.path.expandvars(env)).expanduser().resolve()
    from bentoml._internal.configuration.containers import BentoMLContainer

    return Path(BentoMLContainer.bentoml_home.get()).resolve()


def _models_dir() -> Path:
    return bentoml_home() / "models"


_STORES: dict[str, Any] = {}


def _store(models_dir: Path | None = None) -> Any:
    """The ModelStore of the current BENTOML_HOME (cached per path)."""
    from bentoml._internal.models import ModelStore

    models_dir = models_dir or _models_dir()
    key = str(models_dir)
    if key not in _STORES:
        models_dir.mkdir(parents=True, exist_ok=True)
        _STORES[key] = ModelStore(key)
    return _STORES[key]


_LOCK = threading.RLock()  # threads of this process; the file lock below serialises processes
_LOCK_STATE: dict[str, Any] = {"depth": 0, "file": None}


@contextlib.contextmanager
def _locked(blocking: bool = True) -> Iterator[bool]:
    """The registry's one exclusive lock (re-entrant in a process). Yields False when `blocking` is False and another
    process holds it (then nothing is locked)."""
    if not _LOCK.acquire(blocking=blocking):
        yield False
        return
    try:
        if _LOCK_STATE["depth"] == 0:
            home = bentoml_home()
            home.mkdir(parents=True, exist_ok=True)
            fh = open(home / LOCK_NAME, "a+")  # noqa: SIM115 - held across the yield
            try:
                fcntl.flock(fh, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.close()
                yield False
                return
            _LOCK_STATE["file"] = fh
        _LOCK_STATE["depth"] += 1
        try:
            yield True
        finally:
            _LOCK_STATE["depth"] -= 1
            if _LOCK_STATE["depth"] == 0:
                fh = _LOCK_STATE.pop("file")
                _LOCK_STATE["file"] = None
                fcntl.flock(fh, fcntl.LOCK_UN)
                fh.close()
    finally:
        _LOCK.release()


def _fault(point: str) -> None:
    """Crash injection for the kill tests: SIGKILL this process when $CTRFLOW_REGISTRY_FAULT names `point`."""
    if os.environ.get(FAULT_ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)


def atomic_write(path: Path, text: str) -> None:
    """Write through a temporary file in the same folder, fsync, rename: a reader sees the old or the new file, and
    a failed write leaves neither a half-written file nor the temporary one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _ledger_path() -> Path:
    return bentoml_home() / LEDGER_NAME


def _empty_ledger() -> dict[str, Any]:
    return {"version": 1, "models": {}, "pending": {}}


def _read_ledger() -> dict[str, Any]:
    path = _ledger_path()
    if not path.exists():
        return _empty_ledger()
    try:
        ledger = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise RegistryError(f"stage ledger {path} is not valid JSON ({exc}); restore it from a backup") from exc
    ledger.setdefault("models", {})
    ledger.setdefault("pending", {})
    return ledger


@contextlib.contextmanager
def _ledger() -> Iterator[dict[str, Any]]:
    """Read-modify-write of the ledger under the registry lock; written atomically when the block succeeds."""
    with _locked():
        ledger = _read_ledger()
        yield ledger
        atomic_write(_ledger_path(), json.dumps(ledger, indent=2, sort_keys=True, default=_json_default))


def _entry(ledger: dict[str, Any], name: str) -> dict[str, Any]:
    return ledger["models"].setdefault(
        name, {"production": None, "production_history": [], "stages": {}, "gates": {}, "history": []}
    )


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _who() -> str:
    user = os.environ.get("CTRFLOW_USER")
    if not user:
        try:
            user = getpass.getuser()
        except Exception:  # no passwd entry in some containers
            user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _transition(entry: dict[str, Any], tag: str, to: str, action: str, reason: str, **extra: Any) -> dict[str, Any]:
    record = {
        "at": _now(),
        "by": _who(),
        "action": action,
        "tag": tag,
        "from": entry["stages"].get(tag),
        "to": to,
        "reason": reason,
        **extra,
    }
    entry["stages"][tag] = to
    entry["history"].append(record)
    return record


def _version_dirs(name: str | None = None) -> list[Path]:
    """Every version folder of the store (of `name`), complete or not; pointer files and hidden entries skipped."""
    root = _models_dir()
    if not root.is_dir():
        return []
    names = [root / name] if name else sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    return sorted(v for n in names if n.is_dir() for v in n.iterdir() if v.is_dir() and not v.name.startswith("."))


def _complete(version_dir: Path) -> bool:
    return (version_dir / MODEL_YAML).is_file()


def _write_latest(name: str) -> None:
    """BentoML's `latest` pointer of `name`: the newest complete version, written via a temporary file + rename (an
    interrupted write never leaves it empty); removed when no complete version is left."""
    models = [m for m in _load_models(name) if m is not None]
    latest = _models_dir() / name / "latest"
    if not models:
        with contextlib.suppress(FileNotFoundError):
            latest.unlink()
        return
    newest = max(models, key=lambda m: m.info.creation_time)
    atomic_write(latest, str(newest.tag.version))


def _load_models(name: str | None = None) -> list[Any]:
    """The complete models of the store (of `name`), as BentoML Model objects; unreadable ones are skipped with a
    warning. Never goes through BentoML's listing, which stops at the first incomplete folder."""
    from bentoml._internal.models import Model

    out = []
    for d in _version_dirs(name):
        if not _complete(d):
            continue
        try:
            out.append(Model.from_path(d))
        except Exception as exc:  # noqa: BLE001 - one unreadable model must not hide the others
            log.warning("model store: %s cannot be read (%s); skipped", d, exc)
    return out


# ---- repair ---------------------------------------------------------------------------------------------
def repair() -> list[str]:
    """Bring the store and the ledger back to a consistent state after an interrupted write; returns what was done.

    Run under the registry lock by every write (so it never races a live registration): pending registrations are
    rolled back (their model folder removed, if it got into the store), the staging area is emptied, model folders
    without model.yaml are moved to .ctrflow_quarantine, and empty or dangling `latest` pointers are rewritten.
    """
    actions: list[str] = []
    with _locked():
        ledger = _read_ledger()
        pending = dict(ledger.get("pending") or {})
        if pending:
            with _ledger() as ledger:
                for tag, info in pending.items():
                    name, version = tag.split(":", 1)
                    target = _models_dir() / name / version
                    if target.exists():
                        shutil.rmtree(target)
                    actions.append(f"rolled back the interrupted registration of {tag} (started {info.get('at')})")
                    entry = _entry(ledger, name)
                    entry["history"].append(
                        {"at": _now(), "by": _who(), "action": "rollback-registration", "tag": tag, "from": None,
                         "to": None, "reason": "registration interrupted before its ledger entry was written"}
                    )  # fmt: skip
                    ledger["pending"].pop(tag, None)
        staging = bentoml_home() / STAGING_DIR
        if staging.exists() and any(staging.iterdir()):
            actions.append(f"removed staging leftovers in {staging}")
        shutil.rmtree(staging, ignore_errors=True)
        names: set[str] = set()
        for d in _version_dirs():
            names.add(d.parent.name)
            if not _complete(d):
                dest = bentoml_home() / QUARANTINE_DIR / f"{d.parent.name}-{d.name}-{uuid.uuid4().hex[:6]}"
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(d, dest)
                actions.append(f"moved the incomplete model folder {d} (no {MODEL_YAML}) to {dest}")
        root = _models_dir()
        for name in sorted(names | {p.name for p in root.iterdir() if p.is_dir()} if root.is_dir() else names):
            for tmp in (root / name).glob(".latest*.tmp"):
                tmp.unlink(missing_ok=True)
            latest = root / name / "latest"
            current = latest.read_text().strip() if latest.is_file() else None
            if current is None or not current or not _complete(root / name / current):
                _write_latest(name)
                if latest.is_file() or current is not None:
                    actions.append(f"rewrote the '{name}' latest pointer (was {current!r})")
    for a in actions:
        log.warning("registry repair: %s", a)
    return actions


# ---- registration ---------------------------------------------------------------------------------------
def register_model(
    artifact_dir: str | Path,
    name: str | None = None,
    *,
    metrics: dict,
    params: dict,
    feature_spec: Any,
    data_fingerprint: str,
    code_version: str,
    labels: dict | None = None,
    inputs: dict | None = None,
) -> str:
    """Copy a trained artifact directory into a new BentoML model and record it as a candidate; returns the tag.

    The artifact files sit at the root of the model's directory, so `load_model_artifact(model_path(tag))` loads it.
    `name` defaults to `default_model_name(<the spec's data set>)`. `inputs` records what the model was trained
    with beyond the spec (`model_inputs`: data set, feature service, feature names, item-side fingerprint); the
    service's start-up check (`ctrflow.fit_check`) compares it with the feature repository.

    A transaction: store and ledger change together or not at all (module docstring); a registration interrupted
    before it returns is rolled back by the next write.
    """
    import bentoml

    src = Path(artifact_dir)
    if not src.is_dir():
        raise RegistryError(f"artifact_dir {src} is not a directory (expected a saved model artifact)")
    if not any(src.iterdir()):
        raise RegistryError(f"artifact_dir {src} is empty (expected a saved model artifact)")
    spec = feature_spec.to_dict() if hasattr(feature_spec, "to_dict") else dict(feature_spec)
    dataset = str((spec.get("extra") or {}).get("dataset", ""))
    name = name or default_model_name(dataset)
    created = _now()
    all_labels = {
        "model_family": str(params.get("model", "")),
        "dataset": dataset,
        "registered_stage": CANDIDATE,  # labels are frozen: the current stage lives in the ledger
    }
    split = (params.get("data") or {}).get("split") if isinstance(params.get("data"), dict) else params.get("split")
    if split:
        all_labels["split"] = str(split)
    all_labels.update({k: str(v) for k, v in (labels or {}).items() if v is not None})
    registration = {
        "metrics": metrics,
        "params": params,
        "feature_spec": spec,
        "data_fingerprint": data_fingerprint,
        "code_version": code_version,
        "created_at": created,
        "registered_by": _who(),
        "source": str(src.resolve()),
        "inputs": inputs or model_inputs(spec),
    }
    with _locked():
        repair()
        staging = bentoml_home() / STAGING_DIR / uuid.uuid4().hex
        try:
            # 1. the complete model, built outside the store
            with bentoml.models.create(
                name, labels=all_labels, metadata=_metadata_safe(registration), _model_store=_store(staging / "models")
            ) as model:
                shutil.copytree(src, model.path, dirs_exist_ok=True, ignore=shutil.ignore_patterns("checkpoints"))
                _fault("copying")
                Path(model.path, REGISTRATION_FILE).write_text(json.dumps(registration, indent=2, default=_json_default))
            tag = str(model.tag)
            built = staging / "models" / model.tag.name / model.tag.version
            _fault("staged")
            # 2. the intent, so a crash after the move is rolled back
            with _ledger() as ledger:
                ledger["pending"][tag] = {"at": _now(), "by": _who(), "pid": os.getpid()}
            _fault("pending")
            # 3. one rename into the store
            target = _models_dir() / model.tag.name / model.tag.version
            target.parent.mkdir(parents=True, exist_ok=True)
            os.rename(built, target)
            _fault("moved")
            # 4. pending -> candidate in one ledger write
            with _ledger() as ledger:
                ledger["pending"].pop(tag, None)
                _transition(_entry(ledger, name), tag, CANDIDATE, "register", f"registered from {src}")
            _fault("recorded")
            # 5. BentoML's pointer, never truncated in place
            _write_latest(name)
        finally:
            _STORES.pop(str(staging / "models"), None)
            shutil.rmtree(staging, ignore_errors=True)
    return tag


def model_inputs(
    spec: Any,
    *,
    feature_service: str | None = None,
    item_fingerprint: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What a model needs from the feature repository: its data set, feature service, the feature columns it reads
    (every spec field but the request's own keys and scenario) and the item-side fingerprint (`item_fingerprint`)."""
    spec_d = spec.to_dict() if hasattr(spec, "to_dict") else dict(spec)
    from_request = {spec_d.get("user_key", "user_id"), spec_d.get("item_key", "item_id"), spec_d.get("scenario_field", "scenario")}
    features = [f.get("column") or f["name"] for f in spec_d.get("fields", [])]
    return {
        "dataset": str((spec_d.get("extra") or {}).get("dataset", "")),
        "feature_service": feature_service,
        "features": [c for c in features if c not in from_request],
        "item_fingerprint": item_fingerprint,
    }


def item_fingerprint(frame: pd.DataFrame, spec: Any, item_ids: Iterable[Any]) -> dict[str, Any]:
    """Per item-side feature, a SHA-256 of its values for the first `FINGERPRINT_ITEMS` ids of `item_ids` (sorted).

    `frame` has one or more rows per item (a training frame, or an online read); the first row of each item is
    used, so item features must be static per item (they are: item profiles). Vectors hash as float32 bytes,
    numbers as float64 (an integral float and an int hash alike), missing values as a marker: the same values give
    the same digest whether they come from the training frame or from the online store. Returns
    {"items": [ids], "features": {column: "sha256:..."}}; the ids are what the serving side must read.
    """
    spec_d = spec.to_dict() if hasattr(spec, "to_dict") else dict(spec)
    key = spec_d.get("item_key", "item_id")
    cols = [f.get("column") or f["name"] for f in spec_d.get("fields", []) if f.get("entity") == "item"]
    cols = [c for c in cols if c != key and c in frame.columns]
    ids = sorted({_canon_id(i) for i in item_ids if _canon_id(i) is not None}, key=lambda v: (str(type(v)), v))
    ids = ids[:FINGERPRINT_ITEMS]
    first = frame.drop_duplicates(subset=[key]).set_index(frame.drop_duplicates(subset=[key])[key].map(_canon_id))
    out: dict[str, str] = {}
    for col in cols:
        h = hashlib.sha256()
        for i in ids:
            h.update(_canon_value(first[col].get(i) if i in first.index else None))
        out[col] = "sha256:" + h.hexdigest()
    return {"items": ids, "features": out}


def _canon_id(v: Any) -> Any:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


def _canon_value(v: Any) -> bytes:
    """Bytes of one feature value that do not depend on how a reader typed it (see `item_fingerprint`)."""
    if isinstance(v, np.ndarray | list | tuple):
        arr = np.asarray(v)
        if arr.dtype.kind in "fiub":
            return b"v" + np.ascontiguousarray(arr, dtype=np.float32).tobytes() + b";"
        return b"l" + json.dumps([_canon_id(x) for x in arr.tolist()], default=str).encode() + b";"
    if v is None or (isinstance(v, float | np.floating) and math.isnan(float(v))) or v is pd.NA:
        return b"n;"
    if isinstance(v, bool | np.bool_):
        return b"b" + str(bool(v)).encode() + b";"
    if isinstance(v, int | float | np.integer | np.floating):
        return b"f" + np.float64(v).tobytes() + b";"
    return b"s" + str(v).encode() + b";"


def data_fingerprint(inputs: str | Path | pd.DataFrame | Iterable[str | Path | pd.DataFrame]) -> str:
    """A stable SHA-256 of the data a model was trained on: file contents (directories recursively) and frames.

    Frames are hashed by column names, dtypes and values (list cells by their values), not by a file format, so
    the same data gives the same fingerprint whatever wrote it.
    """
    items = [inputs] if isinstance(inputs, (str, Path, pd.DataFrame)) else list(inputs)
    h = hashlib.sha256()
    for item in items:
        if isinstance(item, pd.DataFrame):
            h.update(b"frame\0")
            _hash_frame(h, item)
            continue
        path = Path(item)
        if not path.exists():
            raise FileNotFoundError(f"data_fingerprint: {path} does not exist")
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            h.update(b"file\0" + (str(f.relative_to(path)) if path.is_dir() else f.name).encode() + b"\0")
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):  # noqa: B023
                    h.update(chunk)
    return "sha256:" + h.hexdigest()


def _hash_frame(h: Any, frame: pd.DataFrame) -> None:
    h.update(json.dumps([[str(c), str(t)] for c, t in frame.dtypes.items()]).encode())
    for col in frame.columns:
        s = frame[col]
        try:
            values = pd.util.hash_pandas_object(s, index=False).to_numpy()
        except TypeError:  # list / array cells
            values = pd.util.hash_pandas_object(s.map(_cell_repr), index=False).to_numpy()
        h.update(values.tobytes())


def _cell_repr(v: Any) -> str:
    if isinstance(v, np.ndarray):
        v = v.tolist()
    return repr(v)


def code_version() -> str:
    """The git commit of the ctrflow checkout (+dirty when it has local changes), else the package version."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        if commit:
            return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"ctrflow=={version('ctrflow')}"
    except PackageNotFoundError:
        return "unknown"


# ---- reading --------------------------------------------------------------------------------------------
def _get(tag: str) -> Any:
    """The BentoML Model of a tag; 'name' and 'name:latest' are the newest complete version (no pointer file read)."""
    import bentoml
    from bentoml.exceptions import BentoMLException, NotFound

    text = str(tag)
    name, _, version = text.partition(":")
    try:
        from bentoml._internal.tag import validate_tag_str

        validate_tag_str(name)
        if version and version != "latest":
            validate_tag_str(version)
    except (ValueError, BentoMLException) as exc:
        raise RegistryError(f"model tag '{tag}' is not valid: {exc}") from exc
    if not version or version == "latest":
        models = _load_models(name)
        if models:
            return max(models, key=lambda m: m.info.creation_time)
    elif _complete(_models_dir() / name / version):
        try:
            return bentoml.models.get(f"{name}:{version}", _model_store=_store())
        except (NotFound, BentoMLException) as exc:
            raise RegistryError(f"model '{tag}' in {_models_dir()} cannot be read: {exc}") from exc
    # a served Bento keeps its models in its own store, which BentoML installs as its global one; only looked at
    # inside a Bento, or without BENTOML_HOME, so a test or pipeline store never picks up another home's model
    if os.environ.get("BENTO_PATH") or not os.environ.get("BENTOML_HOME"):
        with contextlib.suppress(NotFound, ValueError, BentoMLException):
            return bentoml.models.get(text)
    known = [str(m.tag) for m in _load_models(name)]
    raise RegistryError(f"model '{tag}' is not in the model store {_models_dir()} (models named '{name}': {known or 'none'})")


def resolve_tag(tag: str) -> str:
    """A full 'name:version' tag ('name' or 'name:latest' resolve to the newest version)."""
    return str(_get(str(tag)).tag)


def model_path(tag: str) -> Path:
    """The directory of a registered model (the artifact files are at its root)."""
    return Path(_get(str(tag)).path)


def registration(tag: str) -> dict[str, Any]:
    """Everything recorded at registration: metrics, params, feature spec, data fingerprint, code version, inputs."""
    model = _get(str(tag))
    path = Path(model.path) / REGISTRATION_FILE
    if path.exists():
        return json.loads(path.read_text())
    return dict(model.info.metadata)


def _stage_of(ledger: dict[str, Any], tag: str) -> str:
    if tag in (ledger.get("pending") or {}):
        return REGISTERING
    return ledger["models"].get(tag.split(":")[0], {}).get("stages", {}).get(tag, UNRECORDED)


def stage(tag: str) -> str:
    """The current stage of a model: candidate, production, archived, or `unrecorded` (in the store, never recorded
    by the ledger: imported by hand or left by an interrupted write of an older version)."""
    return _stage_of(_read_ledger(), resolve_tag(tag))


def production_model(name: str = DEFAULT_NAME) -> str | None:
    """The tag of the production model of `name`, or None when nothing was promoted yet."""
    return _read_ledger()["models"].get(name, {}).get("production")


def production_models() -> dict[str, str]:
    """name -> production tag, for every name that has one."""
    return {n: e["production"] for n, e in _read_ledger()["models"].items() if e.get("production")}


def history(name: str = DEFAULT_NAME) -> list[dict[str, Any]]:
    """Every stage transition of `name`, oldest first: at, by, action, tag, from, to, reason."""
    return list(_read_ledger()["models"].get(name, {}).get("history", []))


def list_models(name: str | None = None) -> list[dict[str, Any]]:
    """Registered models, newest first: tag, stage, role (champion / challenger / ''), created, family, dataset and
    headline metrics.

    Repairs an interrupted registration first when no other process holds the registry lock (a held lock means a
    registration is under way: its model shows as `registering`). Models the ledger never recorded show as
    `unrecorded`, never as candidates.
    """
    with _locked(blocking=False) as free:
        if free:
            repair()
    ledger = _read_ledger()
    rows = []
    for model in _load_models(name):
        tag = str(model.tag)
        meta = dict(model.info.metadata)
        metrics = meta.get("metrics", {})
        rows.append(
            {
                "_created": model.info.creation_time,
                "tag": tag,
                "name": model.tag.name,
                "stage": _stage_of(ledger, tag),
                "created": model.info.creation_time.isoformat(timespec="seconds"),
                "role": _role(ledger, tag),
                "model_family": model.info.labels.get("model_family", ""),
                "dataset": model.info.labels.get("dataset", ""),
                "metrics": _headline(metrics),
                "data_fingerprint": meta.get("data_fingerprint", ""),
                "code_version": meta.get("code_version", ""),
            }
        )
    rows.sort(key=lambda r: r.pop("_created"), reverse=True)
    return rows


def _role(ledger: dict[str, Any], tag: str) -> str:
    """'champion' (the production model), 'challenger' (attached for shadow serving) or ''."""
    entry = ledger["models"].get(tag.split(":")[0], {})
    return "champion" if entry.get("production") == tag else "challenger" if entry.get("shadow") == tag else ""


def check_consistency() -> list[str]:
    """What is wrong between the store and the ledger right now (empty when consistent); reads only.

    Problems: a pending registration, staging leftovers, a model folder without model.yaml, an empty or dangling
    `latest` pointer, a ledger stage for a model missing from the store, a model in the store the ledger never
    recorded, more than one production model per name.
    """
    problems: list[str] = []
    ledger = _read_ledger()
    problems += [f"pending registration {t}" for t in ledger.get("pending") or {}]
    staging = bentoml_home() / STAGING_DIR
    if staging.exists() and any(staging.iterdir()):
        problems.append(f"staging leftovers in {staging}")
    in_store = set()
    for d in _version_dirs():
        if not _complete(d):
            problems.append(f"incomplete model folder {d}")
        else:
            in_store.add(f"{d.parent.name}:{d.name}")
    root = _models_dir()
    for name_dir in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        latest = name_dir / "latest"
        if latest.exists():
            pointed = latest.read_text().strip()
            if not pointed or not _complete(name_dir / pointed):
                problems.append(f"'{name_dir.name}' latest pointer is {pointed!r} (no such complete model)")
    recorded = {t for e in ledger["models"].values() for t in e.get("stages", {})}
    problems += [f"ledger records {t}, which is not in the store" for t in sorted(recorded - in_store)]
    problems += [f"{t} is in the store but not in the ledger" for t in sorted(in_store - recorded)]
    for n, e in ledger["models"].items():
        prods = [t for t, s in e.get("stages", {}).items() if s == PRODUCTION]
        if len(prods) > 1 or (e.get("production") and prods != [e["production"]]):
            problems.append(f"'{n}': production {e.get('production')} but stages say {prods}")
        if e.get("shadow") and e.get("stages", {}).get(e["shadow"]) != CANDIDATE:
            problems.append(f"'{n}': challenger {e['shadow']} is not a candidate")
    return problems


def _headline(metrics: dict) -> dict[str, float | None]:
    return {
        "valid_auc": _metric(metrics, "valid", "auc"),
        "test_auc": _metric(metrics, "test", "auc"),
        "valid_logloss": _metric(metrics, "valid", "logloss"),
        "test_logloss": _metric(metrics, "test", "logloss"),
    }


def _metric(metrics: dict, split: str, key: str) -> float | None:
    """metrics['valid']['auc'] (the trainer's layout) or metrics['valid_auc']; None when absent or NaN."""
    value = (metrics.get(split) or {}).get(key) if isinstance(metrics.get(split), dict) else None
    if value is None:
        value = metrics.get(f"{split}_{key}")
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return float(value)


def model_dataset(tag: str) -> str:
    """The data set a registered model was trained on ('' when it was not recorded)."""
    reg = registration(tag)
    return str((reg.get("inputs") or {}).get("dataset") or ((reg.get("feature_spec") or {}).get("extra") or {}).get("dataset", ""))


# ---- gate, promotion, rollback --------------------------------------------------------------------------
def gate(
    candidate_tag: str,
    *,
    min_valid_auc: float | None = None,
    tolerance: float = 0.005,
    reference_model: str | None = None,
    reference_metrics: dict | None = None,
    min_lift_over_reference: float = 0.0,
) -> GateDecision:
    """May this candidate go live? Every configured criterion must hold (validation AUC throughout):

    - reference (`reference_model` set): at least the AUC of a reference model trained in the same run on the same
      training set (`reference_metrics`, e.g. a logistic regression) plus `min_lift_over_reference`; a reference that
      is configured but was not trained (`reference_metrics` None) fails the gate;
    - production: not worse than the production model of the same name *and data set* by more than `tolerance`
      (a production model of another data set is not comparable and is not compared);
    - minimum (`min_valid_auc` not None): at least this fixed number (a data-set-specific floor, optional).

    Why a reference: an AUC floor is a property of one data set (0.65 is a MovieLens number; on other data sets
    every model, logistic regression included, lands lower), while "better than a linear model on the same data"
    holds on any. The decision is recorded in the ledger, so a later `promote(tag)` can check it.
    """
    tag = resolve_tag(candidate_tag)
    name = tag.split(":")[0]
    reg = registration(tag)
    cand_metrics = _headline(reg.get("metrics", {}))
    cand_auc = cand_metrics["valid_auc"]
    dataset = model_dataset(tag)
    reasons: list[str] = []
    passed = True
    recorded_stage = stage(tag)
    if recorded_stage == UNRECORDED:
        passed = False
        reasons.append(f"{tag} is not recorded in the stage ledger (stage 'unrecorded'); only registered models pass")
    if cand_auc is None:
        passed = False
        reasons.append(f"candidate {tag} has no validation AUC in its metrics (metrics.valid.auc)")

    ref_metrics = _headline(reference_metrics) if reference_metrics is not None else {}
    ref_auc = ref_metrics.get("valid_auc")
    if reference_model:
        if reference_metrics is None:
            passed = False
            reasons.append(f"the reference model '{reference_model}' was not trained in this run (no training set given: pass the "
                "training set, e.g. `ctrflow register --training-set`, or set gate.reference_model to null)")
        elif ref_auc is None:
            passed = False
            reasons.append(f"the reference model '{reference_model}' has no validation AUC")
        elif cand_auc is not None:
            need = ref_auc + min_lift_over_reference
            if cand_auc < need:
                passed = False
                reasons.append(
                    f"valid AUC {cand_auc:.4f} is below the reference {reference_model} ({ref_auc:.4f}) plus the required "
                    f"lift {min_lift_over_reference:.4f} (needs {need:.4f})"
                )
            else:
                reasons.append(
                    f"valid AUC {cand_auc:.4f} reaches the reference {reference_model} ({ref_auc:.4f}) plus the required "
                    f"lift {min_lift_over_reference:.4f}"
                )

    prod_tag = production_model(name)
    prod_metrics: dict[str, float | None] = {}
    prod_auc = None
    if prod_tag is None:
        reasons.append(f"no production model of '{name}' yet")
    elif prod_tag == tag:
        reasons.append(f"{tag} is already the production model")
    else:
        try:
            prod_dataset = model_dataset(prod_tag)
            prod_metrics = _headline(registration(prod_tag).get("metrics", {}))
        except RegistryError:
            prod_dataset = None
            reasons.append(f"production {prod_tag} is missing from the model store; not compared")
        if prod_dataset is not None and dataset and prod_dataset and prod_dataset != dataset:
            reasons.append(f"production {prod_tag} was trained on data set '{prod_dataset}', not '{dataset}'; not compared")
            prod_metrics = {}
        elif prod_dataset is not None:
            prod_auc = prod_metrics.get("valid_auc")
            if prod_auc is None:
                reasons.append(f"production {prod_tag} has no validation AUC; not compared")
            elif cand_auc is not None:
                floor = prod_auc - tolerance
                if cand_auc < floor:
                    passed = False
                    reasons.append(
                        f"valid AUC {cand_auc:.4f} is worse than production {prod_tag} ({prod_auc:.4f}) beyond the "
                        f"tolerance {tolerance:.4f} (floor {floor:.4f})"
                    )
                else:
                    reasons.append(
                        f"valid AUC {cand_auc:.4f} is within tolerance {tolerance:.4f} of production {prod_tag} "
                        f"({prod_auc:.4f}) or better"
                    )

    if min_valid_auc is not None and cand_auc is not None:
        if cand_auc < min_valid_auc:
            passed = False
            reasons.append(f"valid AUC {cand_auc:.4f} is below the minimum {min_valid_auc:.4f}")
        else:
            reasons.append(f"valid AUC {cand_auc:.4f} reaches the minimum {min_valid_auc:.4f}")
    if not reference_model and min_valid_auc is None and prod_auc is None and passed:
        reasons.append("no criterion applied (no reference, no minimum, no comparable production model)")

    decision = GateDecision(
        tag, passed, reasons, cand_auc, prod_tag, prod_auc,
        min_valid_auc=None if min_valid_auc is None else float(min_valid_auc),
        tolerance=float(tolerance),
        reference_model=reference_model or None,
        reference_valid_auc=ref_auc,
        min_lift_over_reference=float(min_lift_over_reference),
        dataset=dataset,
        candidate_metrics=cand_metrics,
        reference_metrics=ref_metrics,
        production_metrics=prod_metrics,
    )  # fmt: skip
    with _ledger() as ledger:
        _entry(ledger, name)["gates"][tag] = decision.to_dict()
    return decision


def last_gate(tag: str) -> GateDecision | None:
    """The gate decision last recorded for a model, if any."""
    tag = resolve_tag(tag)
    d = _read_ledger()["models"].get(tag.split(":")[0], {}).get("gates", {}).get(tag)
    return GateDecision.from_dict(d) if d else None


def promote(tag: str, *, reason: str, force: bool = False) -> dict[str, Any]:
    """Make `tag` the production model of its name; the previous one is archived. Returns the transition record.

    Without `force` the model must have passed the gate (`gate()` records its decision). If production changed since
    that decision, the gate is re-run with the same thresholds and reference. `force=True` skips the gate and records
    that it did, with the reason: the escape hatch for an on-call who knows better, never silent.
    """
    if not reason or not reason.strip():
        raise ValueError("promote: a reason is required (it goes into the stage history)")
    tag = resolve_tag(tag)
    name = tag.split(":")[0]
    current = production_model(name)
    if current == tag:
        raise RegistryError(f"{tag} is already the production model of '{name}'")
    gate_info: dict[str, Any] | None = None
    if not force:
        decision = last_gate(tag)
        if decision is None:
            raise PromotionError(f"{tag}: no gate decision recorded; run gate() first, or promote with force=True")
        if decision.passed and decision.production_tag != current:
            decision = gate(
                tag,
                min_valid_auc=decision.min_valid_auc,
                tolerance=decision.tolerance,
                reference_model=decision.reference_model,
                reference_metrics=_unheadline(decision.reference_metrics) if decision.reference_model else None,
                min_lift_over_reference=decision.min_lift_over_reference,
            )
        if not decision.passed:
            raise PromotionError(f"{tag}: the promotion gate failed: {'; '.join(decision.reasons)}")
        gate_info = decision.to_dict()
    with _ledger() as ledger:
        entry = _entry(ledger, name)
        if entry["production"] != current:
            raise RegistryError(f"'{name}': production changed during the promotion ({current} -> {entry['production']}); retry")
        if current:
            _transition(entry, current, ARCHIVED, "archive", f"replaced by {tag}: {reason}")
        record = _transition(entry, tag, PRODUCTION, "promote", reason, forced=force, gate=gate_info, replaced=current)
        entry["production"] = tag
        entry["production_history"].append(tag)
        if entry.get("shadow") == tag:  # a champion does not shadow itself: the challenger slot is freed
            entry["shadow"] = None
    return record


def _unheadline(headline: dict[str, float | None]) -> dict[str, Any]:
    """Headline metrics back to the trainer's nested layout (what `gate` reads)."""
    out: dict[str, dict[str, float | None]] = {"valid": {}, "test": {}}
    for key, value in (headline or {}).items():
        split, _, metric = key.partition("_")
        out.setdefault(split, {})[metric] = value
    return out


def rollback(name: str = DEFAULT_NAME, *, reason: str) -> str:
    """Put the previous production model of `name` back in production (the current one is archived); returns it.

    Repeated rollbacks walk further back through the production history; models deleted from the store are skipped.
    """
    if not reason or not reason.strip():
        raise ValueError("rollback: a reason is required (it goes into the stage history)")
    with _ledger() as ledger:
        entry = _entry(ledger, name)
        current = entry["production"]
        if current is None:
            raise RegistryError(f"'{name}' has no production model to roll back")
        stack = list(entry["production_history"])
        while stack and stack[-1] == current:
            stack.pop()
        existing = {str(m.tag) for m in _load_models(name)}
        while stack and (stack[-1] not in existing or stack[-1] == current):
            stack.pop()
        if not stack:
            raise RegistryError(f"'{name}': no earlier production model to roll back to (current {current})")
        previous = stack[-1]
        _transition(entry, current, ARCHIVED, "rollback", reason, replaced_by=previous)
        _transition(entry, previous, PRODUCTION, "rollback", reason, replaced=current)
        entry["production"] = previous
        entry["production_history"] = stack
    return previous


# ---- shadow serving: a challenger scored beside the production model, never returned ------------------------
def shadow_model(name: str = DEFAULT_NAME) -> str | None:
    """The challenger attached to the production model of `name` (`attach_shadow`), or None."""
    return _read_ledger()["models"].get(name, {}).get("shadow")


def attach_shadow(tag: str, *, reason: str = "shadow serving") -> dict[str, Any]:
    """Attach candidate `tag` as the challenger of the production model of its name; returns the history record.

    The service then scores every request with both (the challenger's scores go to the request log, never into the
    answer; see serving/service.py), within seconds (`ctrflow.shadow.ShadowSlot`). One challenger per name: attaching
    another replaces it.
    Refused (RegistryError) when the name has no production model, when `tag` is not a candidate (production,
    archived, unrecorded or registering), or when it was trained on another data set than the production model.
    """
    tag = resolve_tag(tag)
    name = tag.split(":")[0]
    dataset = model_dataset(tag)
    with _ledger() as ledger:
        entry = _entry(ledger, name)
        production = entry["production"]
        if production is None:
            raise RegistryError(f"'{name}' has no production model: a challenger shadows the production model; promote one first")
        current_stage = _stage_of(ledger, tag)
        if current_stage != CANDIDATE:
            raise RegistryError(f"{tag} is {current_stage}: only a candidate can be attached as a challenger")
        prod_dataset = model_dataset(production)
        if dataset and prod_dataset and dataset != prod_dataset:
            raise RegistryError(
                f"{tag} was trained on data set '{dataset}', production {production} on '{prod_dataset}': a challenger "
                "must score the same requests on the same features"
            )
        record = {
            "at": _now(), "by": _who(), "action": "shadow", "tag": tag, "from": current_stage, "to": current_stage,
            "reason": reason, "champion": production, "replaced": entry.get("shadow"),
        }  # fmt: skip
        entry["shadow"] = tag
        entry["history"].append(record)
    return record


def detach_shadow(name: str = DEFAULT_NAME, *, reason: str = "shadow serving ended") -> str | None:
    """Detach the challenger of `name` (it stays a candidate); returns its tag, or None when none was attached."""
    with _ledger() as ledger:
        entry = _entry(ledger, name)
        tag = entry.get("shadow")
        if tag:
            entry["shadow"] = None
            entry["history"].append(
                {"at": _now(), "by": _who(), "action": "unshadow", "tag": tag, "from": None, "to": None, "reason": reason}
            )
    return tag


def promote_challenger(name: str = DEFAULT_NAME, *, reason: str, force: bool = False) -> dict[str, Any]:
    """Promote the attached challenger of `name` to production (the champion is archived, the challenger slot freed),
    all under the registry lock: no other writer can attach, promote or roll back in between.

    Without `force` the challenger must have passed its promotion gate (as for `promote`); `force=True` records that
    a person overrode it. Raises RegistryError when no challenger is attached.
    """
    with _locked():
        tag = shadow_model(name)
        if not tag:
            raise RegistryError(f"'{name}' has no challenger attached (`ctrflow models shadow <tag>` attaches one)")
        return promote(tag, reason=f"challenger promoted: {reason}", force=force)


def archive(tag: str, *, reason: str) -> dict[str, Any]:
    """Retire a candidate (a production model is replaced by promote or rollback, not archived directly)."""
    tag = resolve_tag(tag)
    name = tag.split(":")[0]
    with _ledger() as ledger:
        entry = _entry(ledger, name)
        if entry["production"] == tag:
            raise RegistryError(f"{tag} is in production: promote another model or roll back instead")
        if entry.get("shadow") == tag:  # an archived model is no challenger
            entry["shadow"] = None
        return _transition(entry, tag, ARCHIVED, "archive", reason)


# ---- helpers --------------------------------------------------------------------------------------------
def _metadata_safe(value: Any) -> Any:
    """BentoML metadata takes basic types only: drop None dict values, numpy scalars to Python, paths to str."""
    if isinstance(value, dict):
        return {str(k): _metadata_safe(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_metadata_safe(v) if v is not None else "null" for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (str, int, float, bool, dt.datetime, dt.date)):
        return value
    return str(value)


def _json_default(o: object) -> object:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, (Path, dt.datetime, dt.date)):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")
