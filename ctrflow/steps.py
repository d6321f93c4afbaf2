"""Each pipeline step once: the CLI, the KFP components and dvc.yaml all call these functions.

Every step takes the params dict (params.yaml) and explicit input/output paths, and returns a small JSON-able
dict of what it did, so orchestration layers stay thin.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import pandas as pd

log = logging.getLogger("ctrflow")

TRAINING_FRAME = "frame.parquet"
SPEC_FILE = "spec.json"


def use_bentoml_home(params: dict[str, Any]) -> str:
    """Point BentoML at the configured model store before bentoml is imported anywhere in this process."""
    home = os.environ.get("BENTOML_HOME") or str(Path(params.get("registry", {}).get("bentoml_home", "runs/bentoml")).resolve())
    os.environ["BENTOML_HOME"] = home
    Path(home).mkdir(parents=True, exist_ok=True)
    return home


# ---- validate -------------------------------------------------------------------------------------------
def validate_step(params: dict[str, Any], dataset_out: str | Path, report_dir: str | Path) -> dict[str, Any]:
    """Load the configured source, validate it (raises DataValidationError), save the canonical tables."""
    from ctrflow.data import load_source
    from ctrflow.data.validation import validate_dataset

    data = params["data"]
    synthetic = (data.get("synthetic") or {}) if data["source"] == "synthetic" else {}
    dataset = load_source(data["source"], path=data.get("path"), max_len=data.get("max_len", 50), **synthetic)
    v = params.get("validation", {})
    report = validate_dataset(
        dataset,
        report_dir,
        min_rows=v.get("min_rows", 1),
        max_rows=v.get("max_rows"),
        min_timestamp=v.get("min_timestamp", "1990-01-01"),
    )
    dataset.save(dataset_out)
    log.info("validated %s: %d interactions; report %s", dataset.name, len(dataset.interactions), report.html_path)
    return {
        "dataset": dataset.name,
        "rows": len(dataset.interactions),
        "report_html": str(report.html_path),
        "report_json": str(report.json_path),
    }


# ---- features -------------------------------------------------------------------------------------------
def features_step(params: dict[str, Any], dataset_dir: str | Path, repo_dir: str | Path, training_set_dir: str | Path) -> dict[str, Any]:
    """Feature tables → Feast apply → point-in-time training set (with its split) → materialise online."""
    from ctrflow import features
    from ctrflow.data.splits import make_split
    from ctrflow.data.tables import Dataset

    dataset = Dataset.load(dataset_dir)
    repo_dir = Path(repo_dir).resolve()
    if not (repo_dir / "feature_store.yaml").exists():
        features.copy_repo(repo_dir)
    data_dir = repo_dir / "data"
    features.write_feature_tables(dataset, data_dir)
    store = features.apply_repo(repo_dir, data_dir)

    entity_df = dataset.interactions.copy()
    entity_df["split"] = make_split(entity_df, params["data"].get("split", "temporal"), seed=params["data"].get("seed", 0)).to_numpy()
    service = params.get("features", {}).get("service", "ctr_ranking")
    frame = features.historical_frame(store, entity_df, service=service)
    out = Path(training_set_dir)
    out.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(out / TRAINING_FRAME, index=False)
    dataset.spec.save(out / SPEC_FILE)
    features.materialize(store)
    counts = frame["split"].value_counts().to_dict()
    log.info("training set %s: %s; Feast repo %s", out, counts, repo_dir)
    return {"feature_repo": str(repo_dir), "training_set": str(out), "rows": len(frame), "splits": counts}


def load_training_set(training_set_dir: str | Path) -> tuple[pd.DataFrame, Any]:
    from ctrflow.data.spec import FeatureSpec

    d = Path(training_set_dir)
    return pd.read_parquet(d / TRAINING_FRAME), FeatureSpec.load(d / SPEC_FILE)


# ---- train ----------------------------------------------------------------------------------------------
# Every training step resumes from its checkpoints (<out>/checkpoints, or the pre-training folder) when run again
# after an interruption; the recipe (ctrflow/training/recipe.py) is the one the benchmarks use too.
def split_data(training_set_dir: str | Path, encoder: Any = None) -> Any:
    """The training set's splits as tensors, with the encoder fitted on its train split (unless given)."""
    from ctrflow.training.recipe import SplitData

    frame, spec = load_training_set(training_set_dir)
    return SplitData.from_frame(frame, spec, encoder=encoder, where=f"training set {training_set_dir}")


def train_step(params: dict[str, Any], training_set_dir: str | Path, model_dir: str | Path, model_name: str | None = None) -> dict[str, Any]:
    """Fit the encoder on the train split, train with early stopping on valid, evaluate valid and test."""
    from ctrflow.training.recipe import train_model

    return train_model(params, split_data(training_set_dir), model_dir, model_name or params["train"]["model"]).summary()


# ---- DGenCTR: diffusion pre-training, then CTR fine-tuning ---------------------------------------------
def pretrain_step(params: dict[str, Any], training_set_dir: str | Path, pretrained_dir: str | Path) -> dict[str, Any]:
    """Discrete-diffusion pre-training on the train split; writes the checkpoint and the encoder it was fitted with."""
    from ctrflow.training.pretrain import pretrain

    data = split_data(training_set_dir)
    path = pretrain(params, data.tensors["train"], data.encoder, pretrained_dir, valid_tensors=data.tensors["valid"], resume=True, progress=params["train"].get("progress", True))
    return {"checkpoint": str(path), "pretrained_dir": str(pretrained_dir)}


def finetune_step(params: dict[str, Any], training_set_dir: str | Path, pretrained_dir: str | Path, model_dir: str | Path) -> dict[str, Any]:
    """CTR fine-tuning of the pre-trained network (every parameter transferred, only the label masked)."""
    from ctrflow.data.encoding import FeatureEncoder
    from ctrflow.training.pretrain import CHECKPOINT_NAME
    from ctrflow.training.recipe import finetune_model

    pretrained_dir = Path(pretrained_dir)
    data = split_data(training_set_dir, encoder=FeatureEncoder.load(pretrained_dir / "encoder.json"))
    return finetune_model(params, data, pretrained_dir / CHECKPOINT_NAME, model_dir).summary()


# ---- GSVR: the multi-scenario variational model ---------------------------------------------------------
def gsvr_step(params: dict[str, Any], training_set_dir: str | Path, model_dir: str | Path, init_embeddings: str | Path | None = None) -> dict[str, Any]:
    """Train GSVR around the configured backbone, optionally initialised from diffusion-pretrained embeddings."""
    from ctrflow.training.recipe import train_model

    init = None
    if init_embeddings:
        from ctrflow.training.pretrain import CHECKPOINT_NAME

        init = Path(init_embeddings) / CHECKPOINT_NAME if Path(init_embeddings).is_dir() else Path(init_embeddings)
    return train_model(params, split_data(training_set_dir), model_dir, "gsvr", init_embeddings=init).summary()


# ---- DMAE: item modalities as features ------------------------------------------------------------------
def embed_step(params: dict[str, Any], dataset_dir: str | Path, dataset_out: str | Path) -> dict[str, Any]:
    """Per-item modality embeddings (text, knowledge graph, user-provided) added to the dataset as spec fields."""
    from ctrflow.embeddings import embed_items_step

    return embed_items_step(params, dataset_dir, dataset_out)


# ---- register + gate ------------------------------------------------------------------------------------
def register_step(params: dict[str, Any], model_dir: str | Path, dataset_dir: str | Path | None = None) -> dict[str, Any]:
    """Register the trained model in the model store as a candidate (its data fingerprint and code version with it)."""
    use_bentoml_home(params)
    from ctrflow import registry
    from ctrflow.data.spec import FeatureSpec

    model_dir = Path(model_dir)
    metrics = json.loads((model_dir / "metrics.json").read_text())
    mparams = json.loads((model_dir / "params.json").read_text())
    enc = json.loads((model_dir / "encoder.json").read_text())
    fingerprint_inputs = sorted(Path(dataset_dir).glob("*.parquet")) if dataset_dir else [model_dir / "encoder.json"]
    tag = registry.register_model(
        model_dir,
        name=params.get("registry", {}).get("model_name", "ctrflow-ranker"),
        metrics=metrics,
        params=mparams,
        feature_spec=FeatureSpec.from_dict(enc["spec"]).to_dict(),
        data_fingerprint=registry.data_fingerprint(fingerprint_inputs),
        code_version=registry.code_version(),
        labels={"model_family": str(mparams.get("model", "")), "dataset": str(enc["spec"].get("extra", {}).get("dataset", ""))},
    )
    log.info("registered %s", tag)
    return {"tag": str(tag)}


def gate_step(params: dict[str, Any], tag: str) -> dict[str, Any]:
    """The promotion gate from params.yaml: a minimum validation AUC, and no worse than production beyond a tolerance."""
    use_bentoml_home(params)
    from ctrflow import registry

    g = params.get("gate", {})
    decision = registry.gate(tag, min_valid_auc=g.get("min_valid_auc", 0.0), tolerance=g.get("tolerance", 0.0))
    log.info("gate for %s %s: %s", tag, "passed" if decision.passed else "failed", "; ".join(decision.reasons))
    return {"tag": str(tag), "gate_passed": bool(decision.passed), "reasons": list(decision.reasons)}


def deploy_step(params: dict[str, Any], tag: str, repo_dir: str | Path, deployment_file: str | Path) -> dict[str, Any]:
    """Promote the model to production and record what the service must load (model tag, feature repo)."""
    home = use_bentoml_home(params)
    from ctrflow import registry

    registry.promote(tag, reason="promotion gate passed in the training pipeline")
    deployment = {
        "model_tag": str(tag),
        "feature_repo": str(Path(repo_dir).resolve()),
        "bentoml_home": home,
        "host": params.get("serving", {}).get("host", "127.0.0.1"),
        "port": params.get("serving", {}).get("port", 3000),
    }
    Path(deployment_file).parent.mkdir(parents=True, exist_ok=True)
    Path(deployment_file).write_text(json.dumps(deployment, indent=2))
    return deployment


# ---- drift ----------------------------------------------------------------------------------------------
def drift_step(
    params: dict[str, Any],
    training_set_dir: str | Path,
    current: str | Path,
    out_dir: str | Path,
    model_dir: str | Path | None = None,
    reference_rows: int = 20_000,
) -> Any:
    """Evidently drift: the training data (scored by the model) as reference, the request log or a slice as current."""
    from ctrflow.monitoring import drift_report, read_request_log
    from ctrflow.training.artifact import Scorer, load_model_artifact

    frame, spec = load_training_set(training_set_dir)
    reference = frame[frame["split"] == "train"].tail(reference_rows).reset_index(drop=True)
    current_path = Path(current)
    current_df = read_request_log(current_path) if current_path.is_dir() else pd.read_parquet(current_path)
    if model_dir is not None:
        loaded = load_model_artifact(model_dir)
        scorer = Scorer(loaded.model, loaded.encoder)
        reference["prediction"] = scorer.score(reference)
        if "prediction" not in current_df.columns:
            current_df["prediction"] = scorer.score(current_df)
    d = params.get("drift", {})
    return drift_report(
        reference,
        current_df,
        spec,
        out_dir,
        prediction_column="prediction" if "prediction" in reference.columns else None,
        stattest_threshold=d.get("stattest_threshold", 0.05),
        max_drifted_share=d.get("max_drifted_share", 0.5),
        fail_on_prediction_drift=d.get("fail_on_prediction_drift", True),
    )
