"""The model registry: trained artifacts in the BentoML model store, plus stages and a promotion gate.

Why BentoML's store: the service loads from it, `bentoml build` packs from it, and `bentoml models export/import`
moves it to object storage, so a registered model is already a deployable one.

Why a ledger beside it: BentoML model labels and metadata are frozen at creation (``ModelInfo`` is an immutable
attrs class in 1.4; there is no update call), so a model's *stage* cannot live in its labels. The stages
(candidate / production / archived), the gate decisions and the history of every transition (who, when, why) are
kept in one small JSON file, ``$BENTOML_HOME/ctrflow_stages.json``, written atomically under a file lock. A model's
labels keep what never changes (family, dataset, split, ``registered_stage=candidate``); the ledger is the source of
truth for its current stage, and it guarantees at most one production model per name.

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
import math
import os
import shutil
import socket
import subprocess
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

DEFAULT_NAME = "ctrflow-ranker"
CANDIDATE, PRODUCTION, ARCHIVED = "candidate", "production", "archived"
STAGES = (CANDIDATE, PRODUCTION, ARCHIVED)
LEDGER_NAME = "ctrflow_stages.json"
REGISTRATION_FILE = "ctrflow_registration.json"  # full-fidelity copy of what went into the metadata


class RegistryError(RuntimeError):
    """A registry operation cannot be done; the message says which model and why."""


class PromotionError(RegistryError):
    """A promotion was refused (gate failed or never run) and was not forced."""


@dataclass
class GateDecision:
    """The promotion gate's verdict for one candidate, with every reason that led to it."""

    tag: str
    passed: bool
    reasons: list[str]
    candidate_valid_auc: float | None
    production_tag: str | None
    production_valid_auc: float | None
    min_valid_auc: float
    tolerance: float
    at: str = field(default_factory=lambda: _now())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- store and ledger -----------------------------------------------------------------------------------
def bentoml_home() -> Path:
    """$BENTOML_HOME when set, else BentoML's own default (~/bentoml)."""
    env = os.environ.get("BENTOML_HOME")
    if env:
        return Path(os.path.expandvars(env)).expanduser().resolve()
    from bentoml._internal.configuration.containers import BentoMLContainer

    return Path(BentoMLContainer.bentoml_home.get()).resolve()


_STORES: dict[str, Any] = {}


def _store() -> Any:
    """The ModelStore of the current BENTOML_HOME (cached per path)."""
    from bentoml._internal.models import ModelStore

    models_dir = bentoml_home() / "models"
    key = str(models_dir)
    if key not in _STORES:
        models_dir.mkdir(parents=True, exist_ok=True)
        _STORES[key] = ModelStore(key)
    return _STORES[key]


def _get(tag: str) -> Any:
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        return bentoml.models.get(tag, _model_store=_store())
    except NotFound:
        pass
    except ValueError as exc:  # a malformed tag
        raise RegistryError(f"model tag '{tag}' is not valid: {exc}") from exc
    # a served Bento keeps its models in its own store, which BentoML installs as its global one; only looked at
    # inside a Bento, or without BENTOML_HOME, so a test or pipeline store never picks up another home's model
    if os.environ.get("BENTO_PATH") or not os.environ.get("BENTOML_HOME"):
        with contextlib.suppress(NotFound, ValueError):
            return bentoml.models.get(tag)
    name = str(tag).split(":")[0]
    known = [str(m.tag) for m in _list_store(name)]
    raise RegistryError(f"model '{tag}' is not in the model store {bentoml_home() / 'models'} (models named '{name}': {known or 'none'})")


def _list_store(name: str | None = None) -> list[Any]:
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        return bentoml.models.list(name, _model_store=_store())
    except NotFound:
        return []


def _ledger_path() -> Path:
    return bentoml_home() / LEDGER_NAME


def _empty_ledger() -> dict[str, Any]:
    return {"version": 1, "models": {}}


def _read_ledger() -> dict[str, Any]:
    path = _ledger_path()
    if not path.exists():
        return _empty_ledger()
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise RegistryError(f"stage ledger {path} is not valid JSON ({exc}); restore it from a backup") from exc


@contextlib.contextmanager
def _ledger() -> Iterator[dict[str, Any]]:
    """Read-modify-write of the ledger under an exclusive lock; written atomically on success."""
    path = _ledger_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            ledger = _read_ledger()
            yield ledger
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(ledger, indent=2, sort_keys=True))
            os.replace(tmp, path)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


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


# ---- registration ---------------------------------------------------------------------------------------
def register_model(
    artifact_dir: str | Path,
    name: str = DEFAULT_NAME,
    *,
    metrics: dict,
    params: dict,
    feature_spec: Any,
    data_fingerprint: str,
    code_version: str,
    labels: dict | None = None,
) -> str:
    """Copy a trained artifact directory into a new BentoML model and record it as a candidate; returns the tag.

    The artifact files sit at the root of the model's directory, so `load_model_artifact(model_path(tag))` loads it.
    """
    import bentoml

    src = Path(artifact_dir)
    if not src.is_dir():
        raise RegistryError(f"artifact_dir {src} is not a directory (expected a saved model artifact)")
    if not any(src.iterdir()):
        raise RegistryError(f"artifact_dir {src} is empty (expected a saved model artifact)")
    spec = feature_spec.to_dict() if hasattr(feature_spec, "to_dict") else dict(feature_spec)
    created = _now()
    all_labels = {
        "model_family": str(params.get("model", "")),
        "dataset": str((spec.get("extra") or {}).get("dataset", "")),
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
    }
    with bentoml.models.create(
        name, labels=all_labels, metadata=_metadata_safe(registration), _model_store=_store()
    ) as model:
        shutil.copytree(src, model.path, dirs_exist_ok=True, ignore=shutil.ignore_patterns("checkpoints"))
        Path(model.path, REGISTRATION_FILE).write_text(json.dumps(registration, indent=2, default=_json_default))
    tag = str(model.tag)
    with _ledger() as ledger:
        _transition(_entry(ledger, name), tag, CANDIDATE, "register", f"registered from {src}")
    return tag


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
def resolve_tag(tag: str) -> str:
    """A full 'name:version' tag ('name' or 'name:latest' resolve to the newest version)."""
    return str(_get(str(tag)).tag)


def model_path(tag: str) -> Path:
    """The directory of a registered model (the artifact files are at its root)."""
    return Path(_get(str(tag)).path)


def registration(tag: str) -> dict[str, Any]:
    """Everything recorded at registration: metrics, params, feature spec, data fingerprint, code version."""
    model = _get(str(tag))
    path = Path(model.path) / REGISTRATION_FILE
    if path.exists():
        return json.loads(path.read_text())
    return dict(model.info.metadata)


def stage(tag: str) -> str:
    """The current stage of a model (a model registered outside this module counts as a candidate)."""
    tag = resolve_tag(tag)
    entry = _read_ledger()["models"].get(tag.split(":")[0], {})
    return entry.get("stages", {}).get(tag, CANDIDATE)


def production_model(name: str = DEFAULT_NAME) -> str | None:
    """The tag of the production model of `name`, or None when nothing was promoted yet."""
    return _read_ledger()["models"].get(name, {}).get("production")


def history(name: str = DEFAULT_NAME) -> list[dict[str, Any]]:
    """Every stage transition of `name`, oldest first: at, by, action, tag, from, to, reason."""
    return list(_read_ledger()["models"].get(name, {}).get("history", []))


def list_models(name: str | None = None) -> list[dict[str, Any]]:
    """Registered models, newest first: tag, stage, created, family, dataset and headline metrics."""
    ledger = _read_ledger()["models"]
    rows = []
    for model in _list_store(name):
        tag = str(model.tag)
        meta = dict(model.info.metadata)
        metrics = meta.get("metrics", {})
        rows.append(
            {
                "_created": model.info.creation_time,
                "tag": tag,
                "name": model.tag.name,
                "stage": ledger.get(model.tag.name, {}).get("stages", {}).get(tag, CANDIDATE),
                "created": model.info.creation_time.isoformat(timespec="seconds"),
                "model_family": model.info.labels.get("model_family", ""),
                "dataset": model.info.labels.get("dataset", ""),
                "metrics": {
                    "valid_auc": _metric(metrics, "valid", "auc"),
                    "test_auc": _metric(metrics, "test", "auc"),
                    "valid_logloss": _metric(metrics, "valid", "logloss"),
                    "test_logloss": _metric(metrics, "test", "logloss"),
                },
                "data_fingerprint": meta.get("data_fingerprint", ""),
                "code_version": meta.get("code_version", ""),
            }
        )
    rows.sort(key=lambda r: r.pop("_created"), reverse=True)
    return rows


def _metric(metrics: dict, split: str, key: str) -> float | None:
    """metrics['valid']['auc'] (the trainer's layout) or metrics['valid_auc']; None when absent or NaN."""
    value = (metrics.get(split) or {}).get(key) if isinstance(metrics.get(split), dict) else None
    if value is None:
        value = metrics.get(f"{split}_{key}")
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return float(value)


# ---- gate, promotion, rollback --------------------------------------------------------------------------
def gate(candidate_tag: str, *, min_valid_auc: float, tolerance: float) -> GateDecision:
    """May this candidate go live? Its validation AUC must reach `min_valid_auc` and must not be worse than the
    production model's by more than `tolerance`. With no production model yet, the minimum alone decides.

    The decision is recorded in the ledger, so a later `promote(tag)` (another process, another pipeline step) can
    check it without re-deriving the thresholds.
    """
    tag = resolve_tag(candidate_tag)
    name = tag.split(":")[0]
    cand_auc = _metric(registration(tag).get("metrics", {}), "valid", "auc")
    prod_tag = production_model(name)
    reasons: list[str] = []
    prod_auc = None
    if prod_tag:
        try:
            prod_auc = _metric(registration(prod_tag).get("metrics", {}), "valid", "auc")
        except RegistryError:
            reasons.append(f"production {prod_tag} is missing from the model store")
    passed = True
    if cand_auc is None:
        passed = False
        reasons.append(f"candidate {tag} has no validation AUC in its metrics (metrics.valid.auc)")
    elif cand_auc < min_valid_auc:
        passed = False
        reasons.append(f"valid AUC {cand_auc:.4f} is below the minimum {min_valid_auc:.4f}")
    else:
        reasons.append(f"valid AUC {cand_auc:.4f} reaches the minimum {min_valid_auc:.4f}")
    if prod_tag is None:
        reasons.append("no production model yet")
    elif prod_tag == tag:
        reasons.append(f"{tag} is already the production model")
    elif prod_auc is None:
        reasons.append(f"production {prod_tag} has no validation AUC; compared with the minimum only")
    elif cand_auc is not None:
        floor = prod_auc - tolerance
        if cand_auc < floor:
            passed = False
            reasons.append(
                f"valid AUC {cand_auc:.4f} is worse than production {prod_tag} ({prod_auc:.4f}) beyond the tolerance "
                f"{tolerance:.4f} (floor {floor:.4f})"
            )
        else:
            reasons.append(
                f"valid AUC {cand_auc:.4f} is within tolerance {tolerance:.4f} of production {prod_tag} ({prod_auc:.4f}) or better"
            )
    decision = GateDecision(tag, passed, reasons, cand_auc, prod_tag, prod_auc, float(min_valid_auc), float(tolerance))
    with _ledger() as ledger:
        _entry(ledger, name)["gates"][tag] = decision.to_dict()
    return decision


def last_gate(tag: str) -> GateDecision | None:
    """The gate decision last recorded for a model, if any."""
    tag = resolve_tag(tag)
    d = _read_ledger()["models"].get(tag.split(":")[0], {}).get("gates", {}).get(tag)
    return GateDecision(**d) if d else None


def promote(tag: str, *, reason: str, force: bool = False) -> dict[str, Any]:
    """Make `tag` the production model of its name; the previous one is archived. Returns the transition record.

    Without `force` the model must have passed the gate (`gate()` records its decision). If production changed since
    that decision, the gate is re-run with the same thresholds. `force=True` skips the gate and records that it did,
    with the reason: the escape hatch for an on-call who knows better, never silent.
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
            decision = gate(tag, min_valid_auc=decision.min_valid_auc, tolerance=decision.tolerance)
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
    return record


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
        existing = {str(m.tag) for m in _list_store(name)}
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


def archive(tag: str, *, reason: str) -> dict[str, Any]:
    """Retire a candidate (a production model is replaced by promote or rollback, not archived directly)."""
    tag = resolve_tag(tag)
    name = tag.split(":")[0]
    with _ledger() as ledger:
        entry = _entry(ledger, name)
        if entry["production"] == tag:
            raise RegistryError(f"{tag} is in production: promote another model or roll back instead")
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
