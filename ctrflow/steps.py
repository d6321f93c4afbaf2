"""Each pipeline step once: the CLI, the KFP components and dvc.yaml all call these functions.

Every step takes the params dict (params.yaml) and explicit input/output paths, and returns a small JSON-able
dict of what it did, so orchestration layers stay thin.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from ctrflow.config import REPO_ROOT, section
from ctrflow.meter import current as current_meter
from ctrflow.meter import metered, progress

log = logging.getLogger("ctrflow")

TRAINING_FRAME = "frame.parquet"
SPEC_FILE = "spec.json"


def use_bentoml_home(params: dict[str, Any]) -> str:
    """Point BentoML at the configured model store before bentoml is imported anywhere in this process."""
    home = os.environ.get("BENTOML_HOME") or str(Path(section(params, "registry").bentoml_home).resolve())
    os.environ["BENTOML_HOME"] = home
    Path(home).mkdir(parents=True, exist_ok=True)
    return home


# ---- validate -------------------------------------------------------------------------------------------
@metered("validate")
def validate_step(params: dict[str, Any], dataset_out: str | Path, report_dir: str | Path) -> dict[str, Any]:
    """Load the configured source, validate it (raises DataValidationError), save the canonical tables.

    The split rules check the features step's split (data.split, data.seed). Warnings (a split or scenario with one
    class, a mostly-missing field) do not stop the step: they are logged and returned under "warnings".
    """
    from ctrflow.data import load_source
    from ctrflow.data.validation import validate_dataset

    data = section(params, "data")
    synthetic = data.synthetic.model_dump() if data.source == "synthetic" else {}
    dataset = load_source(data.source, path=data.path, max_len=data.max_len, **synthetic)
    v = section(params, "validation")
    report = validate_dataset(
        dataset,
        report_dir,
        min_rows=v.min_rows,
        max_rows=v.max_rows,
        min_timestamp=v.min_timestamp,
        split_method=data.split,
        seed=data.seed,
        warn_null_share=v.warn_null_share,
    )
    dataset.save(dataset_out)
    log.info("validated %s: %d interactions; report %s", dataset.name, len(dataset.interactions), report.html_path)
    return {
        "dataset": dataset.name,
        "rows": len(dataset.interactions),
        "report_html": str(report.html_path),
        "report_json": str(report.json_path),
        "warnings": report.warning_lines(),
    }


# ---- features -------------------------------------------------------------------------------------------
def template_repo(params: dict[str, Any]) -> Path:
    """`features.repo`: the Feast repository a new run's repo is copied from (definitions + feature_store.yaml,
    which picks the stores). A relative path is looked up in the working directory, then in the project root."""
    repo = Path(section(params, "features").repo)
    for candidate in (repo,) if repo.is_absolute() else (Path.cwd() / repo, REPO_ROOT / repo):
        if (candidate / "feature_store.yaml").exists():
            return candidate.resolve()
    raise FileNotFoundError(f"features.repo '{repo}': no feature_store.yaml there (looked in {Path.cwd()} and {REPO_ROOT})")


@metered("features")
def features_step(params: dict[str, Any], dataset_dir: str | Path, repo_dir: str | Path, training_set_dir: str | Path) -> dict[str, Any]:
    """Feature tables → Feast apply → point-in-time training set (with its split) → materialise online.

    Bounded memory: the behaviour table and the training set are built `features.chunk_rows` rows at a time, and
    DuckDB (Feast's offline store, the ASOF joins) is capped at `features.duckdb_memory_mb`, spilling beyond it."""
    from ctrflow import features

    with features.duckdb_memory_limit(section(params, "features").duckdb_memory_mb):
        return _features(params, dataset_dir, repo_dir, training_set_dir)


def _features(params: dict[str, Any], dataset_dir: str | Path, repo_dir: str | Path, training_set_dir: str | Path) -> dict[str, Any]:
    from ctrflow import features
    from ctrflow.data.splits import make_split
    from ctrflow.data.tables import Dataset

    dataset = Dataset.load(dataset_dir)
    spec = dataset.spec
    repo_dir = Path(repo_dir).resolve()
    profile = section(params, "features").profile
    if not (repo_dir / "feature_store.yaml").exists():
        features.copy_repo(repo_dir, template=template_repo(params), profile=profile)
    elif (repo_dir / "feature_store.yaml").read_text() != features.profile_file(template_repo(params), profile).read_text():
        log.warning("feature repo %s keeps its own feature_store.yaml, not profile '%s's (a new --repo gets it)", repo_dir, profile)
    data_dir = repo_dir / "data"
    n = len(dataset.interactions)
    chunk_rows = section(params, "features").chunk_rows
    features.write_feature_tables(dataset, data_dir, chunk_rows=chunk_rows)
    progress(0, n, "feature tables written", every_s=0)
    store = features.apply_repo(repo_dir, data_dir)

    entity_df = dataset.interactions
    del dataset  # the profiles and spec are in the repo now; the events are the entity rows
    data = section(params, "data")
    entity_df["split"] = make_split(entity_df, data.split, seed=data.seed).to_numpy()
    out = Path(training_set_dir)
    out.mkdir(parents=True, exist_ok=True)
    # behaviour through the ASOF join (linear in rows), a user range of ~chunk_rows rows at a time, written with one
    # fixed schema and merged back into the events' order: memory bounded by the chunk, not the rows in all
    rows = features.write_historical_frame(
        store, entity_df, out / TRAINING_FRAME, service=section(params, "features").service, chunk_rows=chunk_rows,
        slice_rows=WRITE_SLICE_ROWS,
    )
    spec.save(out / SPEC_FILE)
    progress(n, n, "training set written", every_s=0)
    counts = entity_df["split"].value_counts().to_dict()
    del entity_df  # written: materialization must not run on top of the events' memory
    features.materialize(store)
    log.info("training set %s: %s; Feast repo %s", out, counts, repo_dir)
    return {"feature_repo": str(repo_dir), "training_set": str(out), "rows": rows, "splits": counts}


WRITE_SLICE_ROWS = 250_000  # rows converted to Arrow at once when a training set is written


def write_frame(frame: pd.DataFrame, path: str | Path, slice_rows: int | None = None) -> Path:
    """`frame.to_parquet(path, index=False)`, converted to Arrow `slice_rows` rows at a time: the same file
    contents (the schema is inferred once from the whole frame, column by column), without a second copy of
    every list and vector cell in memory at once."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    slice_rows = slice_rows or WRITE_SLICE_ROWS
    schema = pa.Schema.from_pandas(frame, preserve_index=False)
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, max(len(frame), 1), slice_rows):
            part = frame.iloc[start : start + slice_rows]
            writer.write_table(pa.Table.from_pandas(part, schema=schema, preserve_index=False))
    return Path(path)


def load_training_set(training_set_dir: str | Path) -> tuple[pd.DataFrame, Any]:
    from ctrflow.data.spec import FeatureSpec

    d = Path(training_set_dir)
    return pd.read_parquet(d / TRAINING_FRAME), FeatureSpec.load(d / SPEC_FILE)


def last_split_rows(training_set_dir: str | Path, split: str, n: int, batch_rows: int = 65_536) -> tuple[pd.DataFrame, Any]:
    """The last `n` rows of one split of the training set (in the frame's row order) and its spec, read batch by
    batch: memory ~ n rows + one batch, not the whole training set (millions of rows with 50-item lists).

    Equals `frame[frame["split"] == split].tail(n).reset_index(drop=True)` of `load_training_set`.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from ctrflow.data.spec import FeatureSpec

    d = Path(training_set_dir)
    file = pq.ParquetFile(d / TRAINING_FRAME)
    kept: list[pa.Table] = []
    held = 0
    for batch in file.iter_batches(batch_size=batch_rows):
        part = pa.Table.from_batches([batch]).filter(pc.equal(batch.column("split"), split))
        if part.num_rows:
            kept.append(part)
            held += part.num_rows
        while kept and held - kept[0].num_rows >= n:  # the oldest part is no longer needed for the last n rows
            held -= kept.pop(0).num_rows
    table = pa.concat_tables(kept) if kept else file.schema_arrow.empty_table()
    table = table.slice(max(table.num_rows - n, 0))
    return table.to_pandas().reset_index(drop=True), FeatureSpec.load(d / SPEC_FILE)


# ---- train ----------------------------------------------------------------------------------------------
# Every training step resumes from its checkpoints (<out>/checkpoints, or the pre-training folder) when run again
# after an interruption; the recipe (ctrflow/training/recipe.py) is the one the benchmarks use too.
def split_data(training_set_dir: str | Path, encoder: Any = None, params: dict[str, Any] | None = None) -> Any:
    """The training set's splits as tensors, with the encoder fitted on its train split (unless given); training
    rows over `train.memory_budget_mb` are streamed from disk (`SplitData.from_parquet`)."""
    from ctrflow.data.spec import FeatureSpec
    from ctrflow.training.recipe import SplitData

    d = Path(training_set_dir)
    spec = FeatureSpec.load(d / SPEC_FILE)
    budget = section(params, "train").memory_budget_mb  # no params: the typed default
    return SplitData.from_parquet(d / TRAINING_FRAME, spec, encoder=encoder, where=f"training set {d}", memory_budget_mb=budget)


@metered("train")
def train_step(params: dict[str, Any], training_set_dir: str | Path, model_dir: str | Path, model_name: str | None = None) -> dict[str, Any]:
    """Fit the encoder on the train split, train with early stopping on valid, evaluate valid and test."""
    from ctrflow.training.recipe import train_model

    return train_model(params, split_data(training_set_dir, params=params), model_dir, model_name or params["train"]["model"]).summary()


# ---- DGenCTR: diffusion pre-training, then CTR fine-tuning ---------------------------------------------
@metered("pretrain")
def pretrain_step(params: dict[str, Any], training_set_dir: str | Path, pretrained_dir: str | Path) -> dict[str, Any]:
    """Discrete-diffusion pre-training on the train split; writes the checkpoint and the encoder it was fitted with."""
    from ctrflow.training.pretrain import pretrain

    data = split_data(training_set_dir, params=params)
    path = pretrain(params, data.tensors["train"], data.encoder, pretrained_dir, valid_tensors=data.tensors["valid"], resume=True, progress=params["train"]["progress"])
    return {"checkpoint": str(path), "pretrained_dir": str(pretrained_dir)}


@metered("finetune")
def finetune_step(params: dict[str, Any], training_set_dir: str | Path, pretrained_dir: str | Path, model_dir: str | Path) -> dict[str, Any]:
    """CTR fine-tuning of the pre-trained network (every parameter transferred, only the label masked)."""
    from ctrflow.data.encoding import FeatureEncoder
    from ctrflow.training.pretrain import CHECKPOINT_NAME
    from ctrflow.training.recipe import finetune_model

    pretrained_dir = Path(pretrained_dir)
    data = split_data(training_set_dir, encoder=FeatureEncoder.load(pretrained_dir / "encoder.json"), params=params)
    return finetune_model(params, data, pretrained_dir / CHECKPOINT_NAME, model_dir).summary()


# ---- GSVR: the multi-scenario variational model ---------------------------------------------------------
@metered("train-gsvr")
def gsvr_step(params: dict[str, Any], training_set_dir: str | Path, model_dir: str | Path, init_embeddings: str | Path | None = None) -> dict[str, Any]:
    """Train GSVR around the configured backbone, optionally initialised from diffusion-pretrained embeddings."""
    from ctrflow.training.recipe import train_model

    init = None
    if init_embeddings:
        from ctrflow.training.pretrain import CHECKPOINT_NAME

        init = Path(init_embeddings) / CHECKPOINT_NAME if Path(init_embeddings).is_dir() else Path(init_embeddings)
    return train_model(params, split_data(training_set_dir, params=params), model_dir, "gsvr", init_embeddings=init).summary()


# ---- DMAE: item modalities as features ------------------------------------------------------------------
@metered("embed")
def embed_step(params: dict[str, Any], dataset_dir: str | Path, dataset_out: str | Path) -> dict[str, Any]:
    """Per-item modality embeddings (text, knowledge graph, user-provided) added to the dataset as spec fields."""
    from ctrflow.embeddings import embed_items_step

    return embed_items_step(params, dataset_dir, dataset_out)


# ---- register + gate ------------------------------------------------------------------------------------
def first_rows_per_key(path: str | Path, key: str, columns: list[str], batch_rows: int = 500_000) -> pd.DataFrame:
    """The first row (in file order) of each distinct `key` value of a Parquet file, `columns` of it (those the file
    has): what `pd.read_parquet(path, columns).drop_duplicates(subset=[key])` keeps, read `batch_rows` rows at a time
    so memory grows with the distinct keys, not the rows (10M training rows hold ~100k items)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    file = pq.ParquetFile(path)
    names = [c for c in dict.fromkeys([key, *columns]) if c in set(file.schema_arrow.names)]
    seen = np.array([], dtype=np.int64)
    parts = []
    for batch in file.iter_batches(batch_size=batch_rows, columns=names):
        keys = batch.column(key).to_numpy(zero_copy_only=False)
        _, first = np.unique(keys, return_index=True)
        first = np.sort(first)
        new = first[~np.isin(keys[first], seen)]
        if len(new):
            parts.append(pa.Table.from_batches([batch]).take(pa.array(new)))
            seen = np.concatenate([seen, keys[new]]) if len(seen) else keys[new]
    table = pa.concat_tables(parts) if parts else file.schema_arrow.empty_table().select(names)
    return table.to_pandas()


def model_name(params: dict[str, Any], dataset: str | None) -> str:
    """The registry name: registry.model_name when set, else one per data set (`ctrflow-<dataset>`)."""
    from ctrflow.registry import model_name_for

    return model_name_for(params, dataset)


@metered("register")
def register_step(
    params: dict[str, Any],
    model_dir: str | Path,
    dataset_dir: str | Path | None = None,
    training_set_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Register the trained model in the model store as a candidate, with what it needs from the feature repository.

    Recorded with it: the data fingerprint (of `dataset_dir`'s tables, else the encoder), the code version, and its
    inputs (data set, feature service, feature columns and, when `training_set_dir` is given, the fingerprint of the
    item features it was trained with), which `ctrflow.fit_check` compares with a feature repository before serving.
    """
    use_bentoml_home(params)
    import pyarrow.parquet as pq

    from ctrflow import registry
    from ctrflow.data.encoding import FeatureEncoder
    from ctrflow.data.spec import Entity, FeatureSpec

    model_dir = Path(model_dir)
    metrics = json.loads((model_dir / "metrics.json").read_text())
    mparams = json.loads((model_dir / "params.json").read_text())
    encoder = FeatureEncoder.load(model_dir / "encoder.json")
    spec = FeatureSpec.from_dict(encoder.spec.to_dict())
    dataset = str(spec.extra.get("dataset", ""))
    fingerprint_inputs = sorted(Path(dataset_dir).glob("*.parquet")) if dataset_dir else [model_dir / "encoder.json"]
    items = None
    rows = metrics.get("train_rows")  # the closing line's rows: the training-set rows read, else the model's
    if training_set_dir is not None:
        path = Path(training_set_dir) / TRAINING_FRAME
        rows = pq.ParquetFile(path).metadata.num_rows
        wanted = [spec.item_key, *(f.column for f in spec.fields if f.entity is Entity.ITEM)]  # all the fingerprint reads
        frame = first_rows_per_key(path, spec.item_key, [c for c in dict.fromkeys(wanted)])
        key_field = next((f.name for f in spec.fields if f.column == spec.item_key), None)
        vocab = encoder.vocabs.get(key_field, []) if key_field else []
        items = registry.item_fingerprint(frame, spec, vocab or frame[spec.item_key].unique())
    service = params["features"]["service"]
    tag = registry.register_model(
        model_dir,
        name=model_name(params, dataset),
        metrics=metrics,
        params=mparams,
        feature_spec=spec.to_dict(),
        data_fingerprint=registry.data_fingerprint(fingerprint_inputs),
        code_version=registry.code_version(),
        labels={"model_family": str(mparams.get("model", "")), "dataset": dataset},
        inputs=registry.model_inputs(spec, feature_service=service, item_fingerprint=items),
    )
    log.info("registered %s", tag)
    if (meter := current_meter()) is not None and isinstance(rows, int):
        meter.rows = rows
    return {"tag": str(tag), "dataset": dataset}


@metered("gate")
def gate_step(params: dict[str, Any], tag: str, training_set_dir: str | Path | None = None) -> dict[str, Any]:
    """The promotion gate from params.yaml (gate section): better than a reference model trained here on the same
    training set (gate.reference_model, plus gate.min_lift_over_reference), not worse than the production model of the
    same data set beyond gate.tolerance, and at least gate.min_valid_auc when that is set.

    The reference (a logistic regression by default: cheap, and meaningful on any data set) is trained into a
    temporary folder and kept only as metrics in the gate decision. Without `training_set_dir` it cannot be trained,
    and the gate fails saying so (set gate.reference_model to null to gate without one).
    """
    use_bentoml_home(params)
    from ctrflow import registry

    g = section(params, "gate")  # a params file without `gate:` gets the typed defaults, never "promote anything"
    reference_metrics = None
    if g.reference_model and training_set_dir is not None:
        with tempfile.TemporaryDirectory(prefix="ctrflow-reference-") as tmp:
            quiet = {**params, "train": {**params["train"], "progress": False}}
            reference_metrics = train_step(quiet, training_set_dir, Path(tmp) / "model", g.reference_model)["metrics"]
    decision = registry.gate(
        tag,
        min_valid_auc=g.min_valid_auc,
        tolerance=g.tolerance,
        reference_model=g.reference_model or None,
        reference_metrics=reference_metrics,
        min_lift_over_reference=g.min_lift_over_reference,
    )
    log.info("%s", decision.summary())
    rows = (reference_metrics or {}).get("train_rows")  # the rows the gate read: the reference's training rows
    if (meter := current_meter()) is not None and isinstance(rows, int):
        meter.rows = rows
    return {
        "tag": str(tag),
        "gate_passed": bool(decision.passed),
        "reasons": list(decision.reasons),
        "summary": decision.summary(),
        "metrics": {
            "candidate": decision.candidate_metrics,
            "reference": decision.reference_metrics,
            "production": decision.production_metrics,
        },
    }


@metered("deploy")
def deploy_step(params: dict[str, Any], tag: str, repo_dir: str | Path, deployment_file: str | Path) -> dict[str, Any]:
    """Check that the model fits the feature repository, promote it to production and record what the service must
    load (model tag, feature repo). A model that does not fit is never promoted (`ModelDoesNotFitError`)."""
    home = use_bentoml_home(params)
    from ctrflow import registry
    from ctrflow.fit_check import check_model_fits

    service = params["features"]["service"]
    check_model_fits(tag, repo_dir, service)
    registry.promote(tag, reason="promotion gate passed in the training pipeline")
    deployment = {
        "model_tag": str(tag),
        "model_name": str(tag).split(":")[0],
        "feature_repo": str(Path(repo_dir).resolve()),
        "feature_service": service,
        "bentoml_home": home,
        "host": section(params, "serving").host,
        "port": section(params, "serving").port,
    }
    Path(deployment_file).parent.mkdir(parents=True, exist_ok=True)
    Path(deployment_file).write_text(json.dumps(deployment, indent=2))
    return deployment


# ---- drift ----------------------------------------------------------------------------------------------
@metered("quality")
def quality_step(params: dict[str, Any], requests: str | Path, labels: str | Path, out_dir: str | Path | None) -> Any:
    """Online quality: the request log's join columns (sampled to `quality.max_log_rows`) joined to the label feed."""
    from ctrflow.monitoring.current import CurrentInputError, read_current
    from ctrflow.monitoring.quality import (
        LOG_COLUMNS,
        SHADOW_MODEL,
        SHADOW_SCORE,
        QualityInputError,
        quality_report,
        read_labels,
    )

    q = section(params, "quality")
    try:
        log, sampling = read_current(
            requests, max_rows=q.max_log_rows, seed=section(params, "drift").sample_seed, columns=[*LOG_COLUMNS, SHADOW_SCORE, SHADOW_MODEL]
        )
    except CurrentInputError as exc:
        raise QualityInputError(str(exc)) from exc
    return quality_report(log, read_labels(labels), out_dir, settings=q, sampling=sampling)


@metered("drift")
def drift_step(
    params: dict[str, Any],
    training_set_dir: str | Path,
    current: str | Path,
    out_dir: str | Path,
    model_dir: str | Path | None = None,
    timestamp: Any = None,
) -> Any:
    """Evidently drift: the training data (its last `drift.reference_rows` train rows, scored by the model) as
    reference; the request log or a slice as current, sampled to `drift.max_current_rows` (`read_current`)."""
    from ctrflow.monitoring import DriftInputError, drift_report
    from ctrflow.monitoring.current import CurrentInputError, read_current
    from ctrflow.training.artifact import Scorer, load_model_artifact

    d = section(params, "drift")
    reference, spec = last_split_rows(training_set_dir, "train", d.reference_rows)
    try:
        current_df, sampling = read_current(current, max_rows=d.max_current_rows, seed=d.sample_seed)
    except CurrentInputError as exc:
        raise DriftInputError(str(exc)) from exc
    if (meter := current_meter()) is not None:
        meter.rows = len(reference) + len(current_df)  # the rows compared (the report object carries no row count)
    if model_dir is not None:
        loaded = load_model_artifact(model_dir)
        scorer = Scorer(loaded.model, loaded.encoder)
        reference["prediction"] = scorer.score(reference)
        if "prediction" not in current_df.columns and len(current_df):  # an empty log: nothing to score
            current_df["prediction"] = scorer.score(current_df)
    return drift_report(
        reference,
        current_df,
        spec,
        out_dir,
        prediction_column="prediction" if "prediction" in reference.columns else None,
        settings=d,
        sampling=sampling,
        timestamp=timestamp,
    )
