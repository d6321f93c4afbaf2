"""The one train-and-save recipe: build -> fit -> evaluate -> save.

    data = SplitData.from_frame(frame, spec)                          # train/valid/test tensors, encoder, user ids
    run = train_evaluate_save(lambda: build_model("dcnv2", data.encoder, mparams), data, TrainConfig(...),
                              model_dir="runs/model")                  # checkpoints in runs/model/checkpoints
    run.metrics["test"]["gauc"], run.summary()

The pipeline steps (ctrflow/steps.py: train, finetune, train-gsvr) and the quality benchmark (benchmarks/harness.py)
all run through `train_evaluate_save`, so a model is seeded, trained, stopped early and scored the same way
whichever command runs it: the one `Trainer` loop, and every metric from `metrics.evaluate` (gAUC grouped by the
raw user ids). With a `model_dir`, the trainer checkpoints every epoch into `<model_dir>/checkpoints` and a run
that was interrupted (killed, crashed) resumes from there when the same command is run again; the final weights
equal an uninterrupted run's.

`train_model` and `finetune_model` are the recipes of the pipeline's training steps, from params.yaml.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch

from ctrflow.data.encoding import FeatureEncoder
from ctrflow.data.spec import FeatureSpec, FieldKind
from ctrflow.models import MODELS, build_model, discover_models
from ctrflow.models.base import CTRModel, MultiScenarioModel, to_tensors
from ctrflow.models.blocks.embedding import embedding_widths, load_embedding_init, read_state_dict
from ctrflow.models.blocks.scenario import check_training_scenarios
from ctrflow.training import distributed
from ctrflow.training.artifact import save_model_artifact
from ctrflow.training.metrics import evaluate, format_value, one_class_note
from ctrflow.training.stream import iter_split
from ctrflow.training.trainer import TrainConfig, Trainer, TrainResult, seed_everything

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
CHECKPOINTS = "checkpoints"


@dataclass
class SplitData:
    """A training set's splits as tensors, the encoder fitted on its train split, and each split's raw user ids
    (gAUC groups). `tensors` must hold "train"; every other split is evaluated."""

    encoder: FeatureEncoder
    tensors: dict[str, dict[str, torch.Tensor]]
    user_ids: dict[str, np.ndarray] = field(default_factory=dict)
    spill: Any = None  # the temporary folder that streamed training rows live in (removed with this object)

    @classmethod
    def from_frame(
        cls,
        frame: pd.DataFrame,
        spec: FeatureSpec,
        encoder: FeatureEncoder | None = None,
        where: str = "training set",
        split_column: str = "split",
    ) -> SplitData:
        """From a frame with a `split` column (train / valid / test); the encoder is fitted on the train rows
        unless given (fine-tuning reuses the pre-training encoder). Raises ValueError naming an empty split."""
        if split_column not in frame.columns:
            raise KeyError(f"{where}: no '{split_column}' column (train / valid / test)")
        parts = {s: frame[frame[split_column] == s] for s in SPLITS}
        for s, part in parts.items():
            if part.empty:
                raise ValueError(f"{where}: the '{s}' split has 0 rows")
        encoder = encoder or FeatureEncoder(spec).fit(parts["train"])
        user_column = spec[spec.user_key].column
        return cls(
            encoder=encoder,
            tensors={s: to_tensors(encoder.transform(p)) for s, p in parts.items()},
            user_ids={s: p[user_column].to_numpy() for s, p in parts.items() if user_column in p.columns},
        )


    @classmethod
    def from_parquet(
        cls,
        path: str | Path,
        spec: FeatureSpec,
        encoder: FeatureEncoder | None = None,
        where: str = "training set",
        split_column: str = "split",
        memory_budget_mb: float | None = None,
    ) -> SplitData:
        """From a Parquet training set: as `from_frame(pd.read_parquet(path))` while the encoded training rows fit
        in `memory_budget_mb` (None: always), else the train split is encoded chunk by chunk to memory-mapped files
        in a temporary folder (`ctrflow.training.stream`) and only the valid and test splits are held as tensors.
        Both give the same encoder, tensors' values and user ids, so training on either gives the same model."""
        from ctrflow.training.stream import encode_to_disk, encoded_row_bytes

        splits = pq.read_table(path, columns=[split_column]).column(split_column).to_numpy(zero_copy_only=False)
        n_train = int((splits == "train").sum())
        need_mb = n_train * encoded_row_bytes(spec) / 2**20
        if memory_budget_mb is None or need_mb <= memory_budget_mb:
            return cls.from_frame(pd.read_parquet(path), spec, encoder=encoder, where=where, split_column=split_column)
        log.info(
            "%s: %d training rows need %.0f MB encoded, over train.memory_budget_mb=%s: streaming them from disk",
            where, n_train, need_mb, memory_budget_mb,
        )
        for s in SPLITS:
            if not (splits == s).any():
                raise ValueError(f"{where}: the '{s}' split has 0 rows")
        del splits
        user_column = spec[spec.user_key].column
        if encoder is None:  # fitted on the train rows; what fit does not read (sequences that share another field's
            # vocabulary, vectors) is not read: at 10M rows those cells would cost gigabytes of Python objects
            skip = {f.column for f in spec.fields if (f.kind is FieldKind.SEQUENCE and f.vocab_of) or f.kind is FieldKind.EMBEDDING}
            present = set(pq.ParquetFile(path).schema_arrow.names)
            columns = [c for c in dict.fromkeys(f.column for f in spec.fields) if c not in skip and c in present]
            train = pq.read_table(path, columns=[*columns, split_column], filters=[(split_column, "=", "train")]).to_pandas()
            for c in skip:
                train[c] = None
            encoder = FeatureEncoder(spec).fit(train)
            del train
        spill = tempfile.TemporaryDirectory(prefix="ctrflow-train-rows-")
        tensors: dict[str, Any] = {"train": encode_to_disk(path, encoder, "train", spill.name, split_column)}
        user_ids = {"train": np.concatenate([c[user_column].to_numpy() for c in iter_split(path, "train", [user_column], split_column)])}
        for s in ("valid", "test"):
            part = pq.read_table(path, filters=[(split_column, "=", s)]).to_pandas()
            tensors[s] = to_tensors(encoder.transform(part))
            if user_column in part.columns:
                user_ids[s] = part[user_column].to_numpy()
        return cls(encoder=encoder, tensors=tensors, user_ids=user_ids, spill=spill)


@dataclass
class RecipeResult:
    model: CTRModel  # trained: the best epoch's weights
    fit: TrainResult
    metrics: dict[str, Any]  # {split: evaluate(...)} + best_epoch, epochs, train_rows (the artifact's metrics.json)
    label: str  # the name in logs and step outputs (GSVR: gsvr-<backbone>)
    model_dir: Path | None
    seconds: float  # fit + evaluation, wall time

    def summary(self) -> dict[str, Any]:
        """What a pipeline step returns: model, model_dir, valid_auc, test_auc (None when undefined), metrics."""
        return {
            "model": self.label,
            "model_dir": str(self.model_dir) if self.model_dir is not None else None,
            "valid_auc": (self.metrics.get("valid") or {}).get("auc"),
            "test_auc": (self.metrics.get("test") or {}).get("auc"),
            "metrics": self.metrics,
        }


def train_evaluate_save(
    build: Callable[[], CTRModel],
    data: SplitData,
    config: TrainConfig,
    *,
    train: Mapping[str, torch.Tensor] | None = None,
    model_dir: str | Path | None = None,
    label: str | None = None,
    model_params: Mapping[str, Any] | None = None,
    train_params: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    evaluate_splits: Sequence[str] | None = None,
    subsets: Mapping[str, Mapping[str, np.ndarray]] | None = None,
    resume: bool = True,
) -> RecipeResult:
    """Seed (`config.seed`), build, `prepare` with the training rows, fit with early stopping on the validation
    split, evaluate the other splits, and save the artifact when `model_dir` is given.

    train: training tensors other than `data.tensors["train"]` (label-scarce or sparse-scenario protocols).
    model_dir: the artifact folder; checkpoints go to `<model_dir>/checkpoints` (unless `config.checkpoint_dir`
    is set) and, with `resume`, an interrupted run continues from them (ValueError when made with other settings).
    model_params / train_params: recorded in params.json as {"model": name, **model_params, "train": train_params}
    (default: the model's own parameters and the trainer settings). evaluate_splits: default every split but
    train. subsets: split -> {name: bool mask} for `<name>_auc` / `<name>_rows` (e.g. cold items).
    """
    source = data.tensors["train"] if train is None else train
    # DiskRows (streamed rows) stay themselves: the trainer reads them by window and releases their mapped pages
    train_t = source if hasattr(source, "read_window") else dict(source)
    seed_everything(config.seed)  # before building: the initial weights are a function of the seed
    model = build()
    label = label or model.name
    model.prepare(train_t)
    if model_dir is not None and config.checkpoint_dir is None:
        config = replace(config, checkpoint_dir=str(Path(model_dir) / CHECKPOINTS))
    started = time.perf_counter()
    result = Trainer(model, config).fit(
        train_t, data.tensors.get("valid"), resume=resume and config.checkpoint_dir is not None
    )
    if not distributed.current().is_main:  # a data-parallel run: rank 0 evaluates and saves (same weights)
        return RecipeResult(model, result, {}, label, None, round(time.perf_counter() - started, 3))
    splits = [s for s in data.tensors if s != "train"] if evaluate_splits is None else list(evaluate_splits)
    metrics: dict[str, Any] = {
        s: evaluate(
            model,
            data.tensors[s],
            data.encoder,
            user_ids=data.user_ids.get(s),
            batch_size=config.eval_batch_size,
            subsets=(subsets or {}).get(s),
        )
        for s in splits
    }
    seconds = time.perf_counter() - started
    metrics.update(best_epoch=result.best_epoch, epochs=result.epochs, train_rows=int(len(train_t["label"])))
    for s in splits:
        if metrics[s]["auc"] is None:
            log.warning("%s: %s split: %s, so its AUC is undefined (reported as null)", label, s,
                        one_class_note(data.tensors[s]["label"]))  # fmt: skip
    if model_dir is not None:
        model_dir = Path(model_dir)
        provenance = {
            "model": model.name,
            **dict(model.params if model_params is None else model_params),
            "train": dict(train_params) if train_params is not None else result.config,
        }
        training = {"history": result.history, "monitor": result.monitor, "resumed_from": result.resumed_from}
        save_model_artifact(model_dir, model, data.encoder, metrics, provenance, extra={**training, **(extra or {})})
    log.info(
        "%s: %s%s",
        label,
        ", ".join(f"{s} AUC {format_value(metrics[s]['auc'])}" for s in splits),
        f" (model in {model_dir})" if model_dir is not None else "",
    )
    return RecipeResult(model, result, metrics, label, model_dir, round(seconds, 3))


# ---- the pipeline's training steps, from params.yaml ------------------------------------------------------
def model_params(params: Mapping[str, Any], name: str, backbone: str | None = None, **overrides: Any) -> dict[str, Any]:
    """A model's constructor arguments from params.yaml: its `models.<name>` section (+ `overrides`) with the
    shared `train.embedding_dim`. GSVR: `models.gsvr` with its backbone's own section (`models.<backbone>`,
    `backbone` overriding `models.gsvr.backbone`) nested under `backbone_params` (explicit
    `models.gsvr.backbone_params` keys win), so `ctrflow train --model gsvr`, `ctrflow train-gsvr` and the
    benchmark build the same model."""
    models = params.get("models") or {}
    embedding_dim = (params.get("train") or {}).get("embedding_dim", 16)
    section = {**(models.get(name) or {}), **overrides}
    if name != "gsvr":
        return {"embedding_dim": embedding_dim, **section}
    bb = backbone or section.get("backbone", "star")
    nested = {**(models.get(bb) or {}), **(section.get("backbone_params") or {})}
    return {"embedding_dim": embedding_dim, **section, "backbone": bb, "backbone_params": nested}


def _check_scenarios(name: str, mparams: Mapping[str, Any], data: SplitData) -> None:
    """A multi-scenario model (a backbone or GSVR around one): the train split's scenarios against the spec and
    the ones asked for, with row counts, before anything is built."""
    if name not in MODELS:
        discover_models()
    cls = MODELS.get(name)
    if name == "gsvr":
        required = (mparams.get("backbone_params") or {}).get("scenarios")
    elif cls is not None and issubclass(cls, MultiScenarioModel):
        required = mparams.get("scenarios")
    else:
        return
    spec = data.encoder.spec
    if spec.scenario_field in data.tensors["train"]:  # else the model's constructor names the missing field
        check_training_scenarios(data.encoder, data.tensors["train"][spec.scenario_field], required)


def train_model(
    params: Mapping[str, Any],
    data: SplitData,
    model_dir: str | Path,
    name: str | None = None,
    init_embeddings: str | Path | None = None,
) -> RecipeResult:
    """The `train` / `train-gsvr` steps: model `name` (default `train.model`) from params.yaml, trained with the
    `train` settings, saved to `model_dir` (resuming from its checkpoints).

    init_embeddings: a state dict (file, trainer checkpoint, artifact folder or pre-trained DGenCTR checkpoint)
    whose FieldEmbedding tables are copied into the model by field name and shape before training. Raises
    UnseenScenarioError when a multi-scenario model's train split holds an undeclared scenario or lacks a
    required one.
    """
    name = name or params["train"]["model"]
    mparams = model_params(params, name)
    _check_scenarios(name, mparams, data)
    init_report: dict[str, Any] = {}
    init_state = None
    if init_embeddings:
        init_state = read_state_dict(init_embeddings)
        widths = embedding_widths(init_state)
        if len(widths) == 1 and mparams.get("embedding_dim") != (width := widths.pop()):
            # a copy needs equal widths: the pre-trained tables (e.g. DGenCTR's d_model, 32) set the model's width,
            # instead of every table being skipped and the run failing (the gsvr-pretrained DAG with defaults did)
            log.warning(
                "%s: embedding width %s (the pre-trained tables' in %s) instead of the configured %s",
                name, width, init_embeddings, mparams.get("embedding_dim"),
            )  # fmt: skip
            init_report["embedding_dim"] = {"configured": mparams.get("embedding_dim"), "used": width}
            mparams = {**mparams, "embedding_dim": width}

    def build() -> CTRModel:
        model = build_model(name, data.encoder, mparams)
        if init_state is not None:
            init_report.update(load_embedding_init(model, init_state))
        return model

    return train_evaluate_save(
        build,
        data,
        TrainConfig.from_params(params["train"]),
        model_dir=model_dir,
        label=f"gsvr-{mparams['backbone']}" if name == "gsvr" else name,
        model_params=mparams,
        train_params=params["train"],
        extra={"init_embeddings": init_report} if init_embeddings else None,
    )


def finetune_model(
    params: Mapping[str, Any], data: SplitData, pretrained: str | Path | Mapping[str, Any], model_dir: str | Path
) -> RecipeResult:
    """The `finetune` step: DGenCTR's CTR fine-tuning of a pre-trained checkpoint (`pretrained`: its path or the
    loaded dict), transferring `models.dgenctr.finetune.transfer` (all by default), at `finetune.lr` (null:
    `train.lr`); `data` must use the encoder pre-training was fitted with."""
    from ctrflow.config import DGenCTRFinetune, typed
    from ctrflow.training.pretrain import dgenctr_settings, load_pretrained_for_finetune

    section, _ = dgenctr_settings(params)
    finetune = typed(DGenCTRFinetune, section.get("finetune"), "models.dgenctr.finetune")
    train_params = dict(params["train"])
    if finetune.lr is not None:
        train_params["lr"] = finetune.lr
    transferred: dict[str, int] = {}

    def build() -> CTRModel:
        model = load_pretrained_for_finetune(data.encoder, params, pretrained, finetune.transfer)
        transferred["transferred"] = len(model.transferred)
        return model

    return train_evaluate_save(
        build, data, TrainConfig.from_params(train_params), model_dir=model_dir, train_params=train_params,
        extra=transferred,
    )  # fmt: skip
