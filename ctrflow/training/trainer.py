"""One trainer for every model: seeded batching, early stopping on validation AUC, checkpoint and resume.

    seed_everything(cfg.seed)                 # before building the model, so its initial weights are seeded too
    model = build_model("dcnv2", encoder, params)
    result = Trainer(model, cfg).fit(train_tensors, valid_tensors)   # the best epoch's weights end up in `model`

Why it looks like this:
- batches are slices of pre-built tensors over a seeded permutation (a per-row Dataset/DataLoader costs 15-20%);
- every epoch reseeds torch/numpy/random from (seed, epoch), and a checkpoint after each epoch holds the model,
  optimizers, best state, history and RNG states, so `fit(..., resume=True)` after an interruption ends with the
  same weights as an uninterrupted run;
- the trainer optimises `model.loss(batch)["loss"]`, so models add terms (KL, reconstruction) without a new trainer;
  every named part is logged as `train_<name>`. A model with a `set_epoch(epoch)` method is told the epoch first
  (warm-ups);
- sparse embedding tables (`FieldEmbedding(sparse=True)` on large fields) go to SparseAdam, the rest to Adam/AdamW.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ctrflow.training.metrics import auc, logloss, predict

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "last.pt"
OPTIMIZERS = ("adam", "adamw")


@dataclass
class TrainConfig:
    epochs: int = 20
    batch_size: int = 1024
    lr: float = 1e-3
    weight_decay: float = 0.0
    patience: int = 2  # epochs without a better validation AUC before stopping
    seed: int = 0
    threads: int = 2  # torch intra-op threads
    checkpoint_dir: str | None = None  # None: no checkpoints, no resume
    progress: bool = True
    eval_batch_size: int = 8192
    optimizer: str = "adam"  # adam | adamw (dense parameters; sparse tables always use SparseAdam)

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "patience", "threads", "eval_batch_size"):
            value = getattr(self, name)
            if int(value) != value or value < (0 if name == "epochs" else 1):
                raise ValueError(f"train config: {name} must be a positive integer, got {value!r}")
        if self.lr < 0 or self.weight_decay < 0:
            raise ValueError(f"train config: lr and weight_decay must be >= 0, got {self.lr}, {self.weight_decay}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"train config: optimizer must be one of {OPTIMIZERS}, got '{self.optimizer}'")
        if self.checkpoint_dir is not None:
            self.checkpoint_dir = str(self.checkpoint_dir)

    @classmethod
    def from_params(cls, section: Mapping[str, object], **overrides: object) -> TrainConfig:
        """From the `train` section of params.yaml; keys that are not trainer settings (model, embedding_dim) are
        left for the model."""
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in {**section, **overrides}.items() if k in names}
        return cls(**values)


@dataclass
class TrainResult:
    history: list[dict]  # per epoch: epoch, train_loss (+ train_<part>), valid_auc, valid_logloss, seconds
    best_epoch: int  # 1-based; 0 when no epoch ran
    best_valid_auc: float | None
    stopped_early: bool
    monitor: str  # what early stopping watched: valid_auc, or valid_logloss when AUC is undefined, or none
    seconds: float  # training + validation time over all epochs, resumed runs included
    resumed_from: int = 0  # epochs already done when this fit started
    config: dict = field(default_factory=dict)

    @property
    def epochs(self) -> int:
        return len(self.history)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (call before building a model so its initialisation is reproducible)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919) % 2**31


def _to_tensors(data: Mapping[str, object], what: str) -> dict[str, torch.Tensor]:
    if not data:
        raise ValueError(f"{what}: no arrays")
    out = {k: v if isinstance(v, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(v)) for k, v in data.items()}
    if "label" not in out:
        raise KeyError(f"{what}: no 'label' array (encode the frame with with_label=True)")
    lengths = {k: len(v) for k, v in out.items()}
    if len(set(lengths.values())) != 1:
        n = lengths["label"]
        bad = {k: v for k, v in lengths.items() if v != n}
        raise ValueError(f"{what}: fields {sorted(bad)} have row counts {bad}, the label has {n}")
    out["label"] = out["label"].float()
    return out


def _rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "python": random.getstate(),
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(_tuples(state["python"]))


def _tuples(x: object) -> object:
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def _clean(x: float) -> float | None:
    return None if x is None or math.isnan(x) else float(x)


class Trainer:
    """Fits one `CTRModel`; see the module docstring for the guarantees."""

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig | None = None,
        on_epoch_end: Callable[[dict], None] | None = None,
    ):
        self.model = model
        self.config = config or TrainConfig()
        self.on_epoch_end = on_epoch_end
        self.optimizers = self._build_optimizers()

    # ---- setup ---------------------------------------------------------------------------------------
    def _build_optimizers(self) -> list[torch.optim.Optimizer]:
        cfg = self.config
        sparse_ids: set[int] = set()
        sparse: list[nn.Parameter] = []
        for m in self.model.modules():
            if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse and m.weight.requires_grad:
                if id(m.weight) not in sparse_ids:
                    sparse_ids.add(id(m.weight))
                    sparse.append(m.weight)
        dense = [p for p in self.model.parameters() if p.requires_grad and id(p) not in sparse_ids]
        opts: list[torch.optim.Optimizer] = []
        if dense:
            cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
            opts.append(cls(dense, lr=cfg.lr, weight_decay=cfg.weight_decay))
        if sparse:
            opts.append(torch.optim.SparseAdam(sparse, lr=cfg.lr))
        if not opts:
            raise ValueError("trainer: the model has no trainable parameters")
        return opts

    @property
    def checkpoint_path(self) -> Path | None:
        return Path(self.config.checkpoint_dir) / CHECKPOINT_NAME if self.config.checkpoint_dir else None

    def _fingerprint(self, n_train: int, n_valid: int) -> dict:
        cfg = self.config
        return {
            "model": getattr(self.model, "name", type(self.model).__name__),
            "seed": cfg.seed,
            "batch_size": cfg.batch_size,
            "lr": cfg.lr,
            "weight_decay": cfg.weight_decay,
            "optimizer": cfg.optimizer,
            "n_train": n_train,
            "n_valid": n_valid,
        }

    # ---- checkpoints ---------------------------------------------------------------------------------
    def _save(self, state: dict) -> None:
        path = self.checkpoint_path
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        ckpt = {
            **state,
            "model": self.model.state_dict(),
            "optimizers": [o.state_dict() for o in self.optimizers],
            "rng": _rng_state(),
        }
        tmp = path.with_suffix(".tmp")
        torch.save(ckpt, tmp)
        os.replace(tmp, path)  # atomic: an interruption never leaves a half-written checkpoint

    def _load(self, fingerprint: dict) -> dict | None:
        path = self.checkpoint_path
        if path is None:
            raise ValueError("trainer: resume=True needs config.checkpoint_dir")
        if not path.exists():
            log.info("no checkpoint at %s: starting from epoch 1", path)
            return None
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        diff = {k: (ckpt["fingerprint"].get(k), v) for k, v in fingerprint.items() if ckpt["fingerprint"].get(k) != v}
        if diff:
            raise ValueError(
                f"trainer: checkpoint {path} was made with different settings (checkpoint, now): {diff}; "
                "use another checkpoint_dir or the same settings"
            )
        self.model.load_state_dict(ckpt["model"])
        for opt, s in zip(self.optimizers, ckpt["optimizers"], strict=True):
            opt.load_state_dict(s)
        _set_rng_state(ckpt["rng"])
        log.info("resuming from %s after epoch %d", path, ckpt["epoch"])
        return ckpt

    # ---- training ------------------------------------------------------------------------------------
    def fit(
        self,
        train: Mapping[str, object],
        valid: Mapping[str, object] | None = None,
        resume: bool = False,
    ) -> TrainResult:
        """Train until `epochs` or early stopping; the best epoch's weights are loaded into the model at the end."""
        cfg = self.config
        torch.set_num_threads(cfg.threads)
        seed_everything(cfg.seed)
        train_t = _to_tensors(train, "train")
        valid_t = _to_tensors(valid, "valid") if valid is not None and len(valid) else None
        n = len(train_t["label"])
        if n == 0:
            raise ValueError("train: 0 rows")
        fingerprint = self._fingerprint(n, len(valid_t["label"]) if valid_t is not None else 0)

        if valid_t is None or len(valid_t["label"]) == 0:
            monitor = "none"
        elif len(torch.unique(valid_t["label"])) < 2:
            monitor = "valid_logloss"
            log.warning("validation labels hold one class: AUC is undefined, early stopping watches logloss")
        else:
            monitor = "valid_auc"

        state = {
            "epoch": 0,
            "history": [],
            "best_epoch": 0,
            "best_score": -math.inf,
            "best_state": None,
            "bad_epochs": 0,
            "stopped_early": False,
            "fingerprint": fingerprint,
        }
        resumed_from = 0
        if resume:
            ckpt = self._load(fingerprint)
            if ckpt is not None:
                for k in state:
                    state[k] = ckpt[k]
                resumed_from = state["epoch"]

        while state["epoch"] < cfg.epochs and not state["stopped_early"]:
            epoch = state["epoch"] + 1
            started = time.perf_counter()
            record = {"epoch": epoch, **self._train_epoch(train_t, epoch)}
            if valid_t is not None:
                scores = predict(self.model, valid_t, cfg.eval_batch_size)
                labels = valid_t["label"].numpy()
                record["valid_auc"] = _clean(auc(labels, scores))
                record["valid_logloss"] = _clean(logloss(labels, scores))
            record["seconds"] = round(time.perf_counter() - started, 3)

            score = self._score(record, monitor)
            if state["best_state"] is None or score > state["best_score"]:
                state["best_score"], state["best_epoch"], state["bad_epochs"] = score, epoch, 0
                state["best_state"] = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            else:
                state["bad_epochs"] += 1
                if monitor != "none" and state["bad_epochs"] >= cfg.patience:
                    state["stopped_early"] = True
            state["history"] = [*state["history"], record]
            state["epoch"] = epoch
            log.info(
                "epoch %d/%d: %s",
                epoch,
                cfg.epochs,
                ", ".join(
                    f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items() if k != "epoch"
                ),
            )
            self._save(state)
            if self.on_epoch_end is not None:
                self.on_epoch_end(record)

        if state["best_state"] is not None:
            self.model.load_state_dict(state["best_state"])
        if state["stopped_early"]:
            log.info("early stop after epoch %d: best epoch %d (%s)", state["epoch"], state["best_epoch"], monitor)
        best = state["history"][state["best_epoch"] - 1] if state["best_epoch"] else {}
        return TrainResult(
            history=list(state["history"]),
            best_epoch=state["best_epoch"],
            best_valid_auc=best.get("valid_auc"),
            stopped_early=state["stopped_early"],
            monitor=monitor,
            seconds=round(sum(r["seconds"] for r in state["history"]), 3),
            resumed_from=resumed_from,
            config=asdict(cfg),
        )

    @staticmethod
    def _score(record: dict, monitor: str) -> float:
        """Higher is better; NaN/None never counts as an improvement."""
        if monitor == "none":
            return float(record["epoch"])  # no validation: the last epoch is the best
        value = record.get(monitor)
        if value is None:
            return -math.inf
        return value if monitor == "valid_auc" else -value

    def _train_epoch(self, train: dict[str, torch.Tensor], epoch: int) -> dict:
        cfg = self.config
        seed_everything(_epoch_seed(cfg.seed, epoch))  # dropout, sampling: a function of (seed, epoch) only
        if hasattr(self.model, "set_epoch"):
            self.model.set_epoch(epoch)
        n = len(train["label"])
        gen = torch.Generator().manual_seed(_epoch_seed(cfg.seed, epoch))
        perm = torch.randperm(n, generator=gen)
        sums: dict[str, float] = {}
        self.model.train()
        bar = tqdm(
            total=n,
            unit="rows",
            unit_scale=True,
            desc=f"epoch {epoch}/{cfg.epochs}",
            disable=not cfg.progress,
            leave=False,
        )
        try:
            for step, start in enumerate(range(0, n, cfg.batch_size)):
                idx = perm[start : start + cfg.batch_size]
                batch = {k: v[idx] for k, v in train.items()}
                losses = self.model.loss(batch)
                loss = losses["loss"]
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"epoch {epoch}, batch {step}: the loss is {loss.item()} (diverged)")
                for opt in self.optimizers:
                    opt.zero_grad(set_to_none=True)
                loss.backward()
                for opt in self.optimizers:
                    opt.step()
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach()) * len(idx)
                bar.update(len(idx))
                if step % 20 == 0:
                    bar.set_postfix(loss=f"{loss.item():.4f}")
        finally:
            bar.close()
        return {f"train_{k}": v / n for k, v in sums.items()}
