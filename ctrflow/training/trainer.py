"""The one training loop of the project: every model, CTR training and diffusion pre-training alike.

    seed_everything(cfg.seed)                 # before building the model, so its initial weights are seeded too
    model = build_model("dcnv2", encoder, params)
    result = Trainer(model, cfg).fit(train_tensors, valid_tensors)   # the best epoch's weights end up in `model`
    Trainer(dgenctr, pre_cfg, objective=Denoising()).fit(...)          # pre-training: same loop, other objective

As FuxiCTR's `rank_model.py` (`BaseModel.fit` / `train_epoch` / `train_step` / `checkpoint_and_earlystop`):
- an objective (ctrflow.training.objectives) gives the loss of a batch and the validation metrics of an epoch;
- `TrainConfig.monitor` names the validation metric that picks the best epoch and stops early, with its
  direction (`monitor_mode`: max for `valid_auc`, min for `valid_logloss` / `valid_loss`), and `patience` epochs
  without improvement stop the run ("none": no early stopping, the last epoch is kept). An AUC monitor on a
  validation split that holds one class (AUC undefined) falls back to the objective's loss metric, with a warning;
- optimisers: Adam or AdamW for dense parameters, SparseAdam for sparse embedding tables
  (`FieldEmbedding(sparse=True)` on large fields); optional gradient clipping of the dense gradients (`grad_clip`).

Why it looks like this:
- batches are explicit slices of pre-built tensors over a seeded permutation (`batch_indices`); a per-row
  Dataset/DataLoader costs 15-20%. One place decides which rows a step sees (a later data-parallel run shards it).
  Training rows larger than memory come as `ctrflow.training.stream.DiskRows` (memory-mapped tensors): the same
  slices gather the same batches from disk, and the loop calls its `release()` every RELEASE_EVERY steps so the
  resident set stays bounded;
- every epoch reseeds torch/numpy/random from (seed, epoch), and a checkpoint after each epoch holds the model,
  optimizers, best state, history and RNG states, so `fit(..., resume=True)` after an interruption (even a
  SIGKILL) ends with the same weights as an uninterrupted run. A checkpoint made with other settings (the
  fingerprint: model and its parameters, vocabulary sizes, data sizes, optimiser settings, objective, monitor) is
  refused with a clear error;
- every named part of the loss is logged as `train_<name>`; a model with a `set_epoch(epoch)` method is told the
  epoch first (warm-ups such as GSVR's β);
- in a process group (torchrun, a PyTorchJob; ctrflow.training.distributed) the same loop trains data-parallel:
  each global batch is split by rank, DDP all-reduces the gradients (each rank's loss weighted by its share, so
  the step equals one process's), rank 0 validates and its record is broadcast (every rank stops at the same
  epoch), and only rank 0 writes checkpoints. A checkpoint resumes with any number of processes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ctrflow.config import TrainParams
from ctrflow.training import allocator, distributed
from ctrflow.training.metrics import format_metrics, one_class_note
from ctrflow.training.objectives import CTR, Objective

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "last.pt"
OPTIMIZERS = ("adam", "adamw")
MONITOR_MODES = ("max", "min")
STREAM_ORDERS = ("rows", "blocks")
RELEASE_EVERY = 64  # steps between DiskRows.release() calls (drop the mapped pages of the batches read so far)


def monitor_direction(monitor: str) -> str | None:
    """The direction a metric improves in, from its name: '...auc' -> max, '...loss' -> min, else None."""
    if monitor.endswith("auc"):
        return "max"
    if monitor.endswith("loss"):
        return "min"
    return None


_TRAIN = TrainParams().model_dump()

@dataclass
class TrainConfig:
    # the settings that params.yaml's `train` section holds take their defaults from the typed section (one place)
    epochs: int = _TRAIN["epochs"]
    batch_size: int = _TRAIN["batch_size"]
    lr: float = _TRAIN["lr"]
    weight_decay: float = _TRAIN["weight_decay"]
    lr_step_size: int = _TRAIN["lr_step_size"]  # StepLR: lr * lr_gamma ** ((epoch - 1) // lr_step_size); 0: constant
    lr_gamma: float = _TRAIN["lr_gamma"]
    patience: int = _TRAIN["patience"]  # epochs without a better monitored value before stopping
    seed: int = _TRAIN["seed"]
    threads: int = _TRAIN["threads"]  # torch intra-op threads
    checkpoint_dir: str | None = None  # None: no checkpoints, no resume
    progress: bool = _TRAIN["progress"]
    eval_batch_size: int = 8192
    optimizer: str = "adam"  # adam | adamw (dense parameters; sparse tables always use SparseAdam)
    grad_clip: float | None = None  # max L2 norm of the dense gradients per step; None or 0: no clipping
    monitor: str = _TRAIN["monitor"]  # validation metric that picks the best epoch and stops early; "none": last epoch
    monitor_mode: str | None = _TRAIN["monitor_mode"]  # max | min; None: from the metric's name (see monitor_direction)
    # streamed rows (DiskRows) only: "rows" reads the in-memory permutation, "blocks" shuffled contiguous blocks
    stream_order: str = _TRAIN["stream_order"]
    stream_block_rows: int = _TRAIN["stream_block_rows"]
    stream_window_blocks: int = _TRAIN["stream_window_blocks"]
    keep_freed_memory: bool = _TRAIN["keep_freed_memory"]  # glibc keeps freed memory for reuse during fit

    def __post_init__(self) -> None:
        if self.stream_order not in STREAM_ORDERS:
            raise ValueError(f"train config: stream_order must be one of {STREAM_ORDERS}, got '{self.stream_order}'")
        for name in ("epochs", "batch_size", "patience", "threads", "eval_batch_size", "stream_block_rows",
                     "stream_window_blocks"):
            value = getattr(self, name)
            if int(value) != value or value < (0 if name == "epochs" else 1):
                raise ValueError(f"train config: {name} must be a positive integer, got {value!r}")
        if self.lr < 0 or self.weight_decay < 0:
            raise ValueError(f"train config: lr and weight_decay must be >= 0, got {self.lr}, {self.weight_decay}")
        if int(self.lr_step_size) != self.lr_step_size or self.lr_step_size < 0 or not 0 < self.lr_gamma <= 1:
            raise ValueError(
                f"train config: lr_step_size must be an integer >= 0 and lr_gamma in (0, 1], got "
                f"{self.lr_step_size!r}, {self.lr_gamma!r}"
            )
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"train config: optimizer must be one of {OPTIMIZERS}, got '{self.optimizer}'")
        if self.grad_clip is not None and self.grad_clip < 0:
            raise ValueError(f"train config: grad_clip must be >= 0 or null, got {self.grad_clip}")
        if self.monitor != "none":
            implied = monitor_direction(self.monitor)
            mode = self.monitor_mode or implied
            if mode not in MONITOR_MODES:
                raise ValueError(
                    f"train config: monitor_mode must be one of {MONITOR_MODES} (it cannot be read from the name "
                    f"'{self.monitor}'), got {self.monitor_mode!r}"
                )
            if implied is not None and mode != implied:
                raise ValueError(
                    f"train config: monitor '{self.monitor}' improves towards {implied}, but monitor_mode is "
                    f"'{mode}'; set monitor_mode: {implied}"
                )
            self.monitor_mode = mode
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
    history: list[dict]  # per epoch: epoch, train_loss (+ train_<part>), valid_<metric>..., seconds
    best_epoch: int  # 1-based; 0 when no epoch ran
    best_valid_auc: float | None  # valid_auc of the best epoch (None when undefined or not computed)
    stopped_early: bool
    monitor: str  # what picked the best epoch: the configured metric, its fallback, or "none"
    seconds: float  # training + validation time over all epochs, resumed runs included
    resumed_from: int = 0  # epochs already done when this fit started
    config: dict = field(default_factory=dict)
    best_score: float | None = None  # the monitored value of the best epoch

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


def as_tensors(data: Mapping[str, object], what: str) -> dict[str, torch.Tensor]:
    """Field arrays to tensors (no copy), checked: a `label` [n] (made float) and the same row count everywhere;
    a `label_known` mask is made bool. Errors name `what` and the fields."""
    if not data:
        raise ValueError(f"{what}: no arrays")
    if hasattr(data, "release"):  # DiskRows (ctrflow.training.stream): memory-mapped tensors, checked when written
        return data  # type: ignore[return-value]
    out = {k: v if isinstance(v, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(v)) for k, v in data.items()}
    if "label" not in out:
        raise KeyError(f"{what}: no 'label' array (encode the frame with with_label=True)")
    lengths = {k: len(v) for k, v in out.items()}
    if len(set(lengths.values())) != 1:
        n = lengths["label"]
        bad = {k: v for k, v in lengths.items() if v != n}
        raise ValueError(f"{what}: fields {sorted(bad)} have row counts {bad}, the label has {n}")
    out["label"] = out["label"].float()
    if "label_known" in out:  # label-scarce pre-training: which rows' labels may be seen
        out["label_known"] = out["label_known"].bool()
    return out


def gather_rows(data: Mapping[str, torch.Tensor], idx: torch.Tensor) -> dict[str, torch.Tensor]:
    """The rows `idx` of every field: `index_select` on dim 0, the same rows as `v[idx]` but without advanced
    indexing's per-call overhead (about 100x less for a 1-d field at batch 4096, on CPU)."""
    return {k: v.index_select(0, idx) for k, v in data.items()}


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


def _plain(x: object) -> object:
    """JSON round trip: what a weights_only checkpoint can hold and compare (tuples become lists)."""
    return json.loads(json.dumps(x, default=str))


def atomic_save(obj: object, path: Path) -> None:
    """torch.save through a temp file and a rename: an interruption never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class Trainer:
    """Fits one model with one objective; see the module docstring for the guarantees."""

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig | None = None,
        on_epoch_end: Callable[[dict], None] | None = None,
        objective: Objective | None = None,
    ):
        self.model = model
        self.config = config or TrainConfig()
        self.on_epoch_end = on_epoch_end
        self.objective = objective or CTR()
        self.optimizers, self.dense_params = self._build_optimizers()
        self.world = distributed.World()  # set by fit from the process group
        self._loss_fn: nn.Module = _ObjectiveLoss(model, self.objective)  # wrapped in DDP by fit when distributed

    # ---- setup ---------------------------------------------------------------------------------------
    def _build_optimizers(self) -> tuple[list[torch.optim.Optimizer], list[nn.Parameter]]:
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
        return opts, dense

    @property
    def checkpoint_path(self) -> Path | None:
        return Path(self.config.checkpoint_dir) / CHECKPOINT_NAME if self.config.checkpoint_dir else None

    def _fingerprint(self, train: dict[str, torch.Tensor], n_valid: int, monitor: str) -> dict:
        """What a checkpoint must share with this run to be resumed (epochs and patience may change)."""
        cfg = self.config
        encoder = getattr(self.model, "encoder", None)
        skip = getattr(self.model, "training_params", ())  # constructor arguments that do not shape the network
        return _plain(
            {
                "model": getattr(self.model, "name", type(self.model).__name__),
                "model_params": {k: v for k, v in getattr(self.model, "params", {}).items() if k not in skip},
                "vocab_sizes": getattr(encoder, "vocab_sizes", None),
                "objective": self.objective.name,
                "seed": cfg.seed,
                "batch_size": cfg.batch_size,
                "lr": cfg.lr,
                "weight_decay": cfg.weight_decay,
                **({"lr_step": [cfg.lr_step_size, cfg.lr_gamma]} if cfg.lr_step_size else {}),
                "optimizer": cfg.optimizer,
                "grad_clip": cfg.grad_clip or None,
                "monitor": monitor,
                "n_train": len(train["label"]),
                "train_clicks": float(train["label"].double().sum()),  # a cheap check that the rows are the same
                "train_labels_known": int(train["label_known"].sum()) if "label_known" in train else None,
                "n_valid": n_valid,
            }
        )

    def _resolve_monitor(self, valid: dict[str, torch.Tensor] | None) -> str:
        cfg = self.config
        if cfg.monitor != "none" and cfg.monitor not in self.objective.metrics:
            raise ValueError(
                f"train config: monitor '{cfg.monitor}' is not a validation metric of the {self.objective.name} "
                f"objective (one of {list(self.objective.metrics)}, or 'none')"
            )
        if cfg.monitor == "none" or valid is None:
            return "none"
        if cfg.monitor.endswith("auc"):
            note = one_class_note(valid["label"])
            if note is not None:
                fallback = self.objective.loss_metric
                log.warning(
                    "validation split: %s, so AUC is undefined there; early stopping and the best epoch use %s "
                    "instead of %s (AUC is logged as n/a)",
                    note,
                    fallback,
                    cfg.monitor,
                )
                return fallback
        return cfg.monitor

    def _mode(self, monitor: str) -> str:
        if monitor == self.config.monitor:
            return str(self.config.monitor_mode)
        return monitor_direction(monitor) or "min"

    # ---- checkpoints ---------------------------------------------------------------------------------
    def _save(self, state: dict) -> None:
        path = self.checkpoint_path
        if path is None or not self.world.is_main:
            return
        ckpt = {
            **state,
            "model": self.model.state_dict(),
            "optimizers": [o.state_dict() for o in self.optimizers],
            "rng": _rng_state(),
        }
        atomic_save(ckpt, path)

    def _load(self, fingerprint: dict) -> dict | None:
        path = self.checkpoint_path
        if path is None:
            raise ValueError("trainer: resume=True needs config.checkpoint_dir")
        # rank 0 reads and checks it, every rank gets it (or the error): the ranks need no shared disk
        ckpt, error = distributed.broadcast(self._read_checkpoint(path, fingerprint), self.world)
        if error is not None:
            raise ValueError(error)
        if ckpt is None:
            log.info("no checkpoint at %s: starting from epoch 1", path)
            return None
        self.model.load_state_dict(ckpt["model"])
        for opt, s in zip(self.optimizers, ckpt["optimizers"], strict=True):
            opt.load_state_dict(s)
        _set_rng_state(ckpt["rng"])
        log.info("resuming from %s after epoch %d", path, ckpt["epoch"])
        return ckpt

    def _read_checkpoint(self, path: Path, fingerprint: dict) -> tuple[dict | None, str | None]:
        """(checkpoint or None when there is none, error text when it was made with other settings); rank 0 only."""
        if not self.world.is_main or not path.exists():
            return None, None
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        theirs = ckpt.get("fingerprint", {})
        diff = {k: (theirs.get(k), v) for k, v in fingerprint.items() if theirs.get(k) != v}
        if diff:
            return None, (
                f"trainer: checkpoint {path} was made with different settings (checkpoint, now): {diff}; "
                f"use another output folder, delete {path.parent}, or run with the same settings"
            )
        return ckpt, None

    # ---- training ------------------------------------------------------------------------------------
    def fit(
        self,
        train: Mapping[str, object],
        valid: Mapping[str, object] | None = None,
        resume: bool = False,
    ) -> TrainResult:
        """Train until `epochs` or early stopping; the best epoch's weights are loaded into the model at the end.

        `train`/`valid`: field name -> array/tensor [n, ...] with a `label` [n]. With `resume=True`, continue from
        the checkpoint in `checkpoint_dir` when there is one (raises ValueError when it was made with other
        settings); a finished run is not trained again. With `keep_freed_memory`, freed memory stays in the C heap
        while this runs (ctrflow.training.allocator: no page faults on every step's large tensors).
        """
        with allocator.keep_freed_memory(self.config.keep_freed_memory):
            return self._fit(train, valid, resume)

    def _fit(self, train: Mapping[str, object], valid: Mapping[str, object] | None, resume: bool) -> TrainResult:
        cfg = self.config
        torch.set_num_threads(cfg.threads)
        seed_everything(cfg.seed)
        self.world = distributed.current()
        train_t = as_tensors(train, "train")
        valid_t = as_tensors(valid, "valid") if valid is not None and len(valid) else None
        if valid_t is not None and len(valid_t["label"]) == 0:
            valid_t = None
        if len(train_t["label"]) == 0:
            raise ValueError("train: 0 rows")
        if len(train_t["label"]) < self.world.size:
            raise ValueError(f"train: {len(train_t['label'])} rows, fewer than the {self.world.size} processes")
        monitor = self._resolve_monitor(valid_t)
        mode = self._mode(monitor)
        fingerprint = self._fingerprint(train_t, len(valid_t["label"]) if valid_t is not None else 0, monitor)

        state = {
            "epoch": 0,
            "history": [],
            "best_epoch": 0,
            "best_score": None,
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
        if self.world.distributed:  # after resuming: DDP starts every rank from rank 0's weights
            # some models leave parameters out of some batches (a scenario's tower, sampled softmax tables)
            self._loss_fn = nn.parallel.DistributedDataParallel(
                _ObjectiveLoss(self.model, self.objective), find_unused_parameters=True
            )

        while state["epoch"] < cfg.epochs and not state["stopped_early"]:
            epoch = state["epoch"] + 1
            started = time.perf_counter()
            self._set_epoch_lr(epoch)
            record = {"epoch": epoch, **self.train_epoch(train_t, epoch)}
            if valid_t is not None and self.world.is_main:
                record.update(self.objective.validate(self.model, valid_t, cfg.eval_batch_size))
            record["seconds"] = round(time.perf_counter() - started, 3)
            record = distributed.broadcast(record, self.world)  # rank 0's scores decide for every rank
            self._checkpoint_and_early_stop(state, record, monitor, mode)
            log.info(
                "%s epoch %d/%d: %s", self.objective.name, epoch, cfg.epochs, format_metrics(
                    {k: v for k, v in record.items() if k != "epoch"}, skip=self.objective.log_skip
                )
            )  # fmt: skip
            self._save(state)
            if cfg.keep_freed_memory:  # blocks freed by validation (other sizes than a step's) go back once an epoch
                allocator.release()
            if self.on_epoch_end is not None and self.world.is_main:
                self.on_epoch_end(record)

        if state["best_state"] is not None:
            self.model.load_state_dict(state["best_state"])
        if state["stopped_early"]:
            log.info(
                "early stop after epoch %d: best epoch %d (%s, %s)", state["epoch"], state["best_epoch"], monitor, mode
            )
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
            best_score=state["best_score"],
        )

    def epoch_lr(self, epoch: int) -> float:
        """The learning rate of 1-based `epoch`: torch's StepLR stepped once per epoch, computed from the epoch number
        alone (so a resumed run gets the same rate without a scheduler state in the checkpoint)."""
        cfg = self.config
        if cfg.lr_step_size <= 0:
            return cfg.lr
        return cfg.lr * cfg.lr_gamma ** ((epoch - 1) // cfg.lr_step_size)

    def _set_epoch_lr(self, epoch: int) -> None:
        lr = self.epoch_lr(epoch)
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = lr

    def _checkpoint_and_early_stop(self, state: dict, record: dict, monitor: str, mode: str) -> None:
        """Keep the epoch's weights when the monitored value improved; count the epochs since, and stop after
        `patience` of them. Without a monitor every epoch is the best (the last one is kept). An undefined (None
        or NaN) value never counts as an improvement, but the first epoch is always kept as a starting point."""
        epoch = record["epoch"]
        if monitor == "none":
            improved, value = True, None
        else:
            value = record.get(monitor)
            if value is not None and math.isnan(value):
                value = None
            best = state["best_score"]
            improved = value is not None and (best is None or (value > best if mode == "max" else value < best))
        if improved or state["best_state"] is None:
            if improved:
                state["best_score"] = value
            state["best_epoch"], state["bad_epochs"] = epoch, 0
            state["best_state"] = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        else:
            state["bad_epochs"] += 1
            if state["bad_epochs"] >= self.config.patience:
                state["stopped_early"] = True
        state["history"] = [*state["history"], record]
        state["epoch"] = epoch

    def batch_indices(self, n: int, epoch: int) -> Iterator[torch.Tensor]:
        """The row indices of each training step of `epoch`: a permutation seeded by (seed, epoch), cut into
        `batch_size` slices (the last one may be shorter)."""
        cfg = self.config
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(_epoch_seed(cfg.seed, epoch)))
        for start in range(0, n, cfg.batch_size):
            yield perm[start : start + cfg.batch_size]

    def epoch_batches(self, train: Mapping[str, torch.Tensor], epoch: int) -> Iterator[tuple[Mapping[str, torch.Tensor], torch.Tensor]]:
        """(source, rows) of each training step of `epoch`: the batch is `gather_rows(source, rows)`.

        In-memory rows, and streamed rows with `stream_order: rows`: `train` and the slices of `batch_indices`.
        Streamed rows (`DiskRows`) with `stream_order: blocks`: a window of `stream_window_blocks` blocks of
        `stream_block_rows` contiguous rows (`stream.block_windows`, seeded by (seed, epoch)) is read into memory at
        once, its rows permuted and cut into `batch_size` slices (the window's last one may be shorter). Every row
        is still seen once per epoch, but a batch mixes only its window's blocks: a different (and coarser)
        shuffle than the in-memory one, which reads each block with sequential I/O instead of one page per row.
        """
        cfg = self.config
        n = len(train["label"])
        read_window = getattr(train, "read_window", None)
        if read_window is None or cfg.stream_order == "rows":
            for rows in self.batch_indices(n, epoch):
                yield train, rows
            return
        from ctrflow.training.stream import block_windows

        generator = torch.Generator().manual_seed(_epoch_seed(cfg.seed, epoch))
        for blocks in block_windows(n, cfg.stream_block_rows, cfg.stream_window_blocks, generator):
            window = read_window(blocks)
            perm = torch.randperm(len(window["label"]), generator=generator)
            for start in range(0, len(perm), cfg.batch_size):
                yield window, perm[start : start + cfg.batch_size]
            del window

    def train_step(
        self, batch: dict[str, torch.Tensor], epoch: int, step: int, weight: float = 1.0
    ) -> dict[str, torch.Tensor]:
        """One optimiser step on one batch; returns the objective's named losses. `weight` scales the loss that is
        back-propagated (a rank's share of a data-parallel batch, see distributed.loss_weight)."""
        losses = self._loss_fn(batch)
        loss = losses["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"epoch {epoch}, batch {step}: the loss is {loss.item()} (diverged)")
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        (loss * weight if weight != 1.0 else loss).backward()
        if self.config.grad_clip:
            nn.utils.clip_grad_norm_(self.dense_params, float(self.config.grad_clip))
        for opt in self.optimizers:
            opt.step()
        return losses

    def train_epoch(self, train: dict[str, torch.Tensor], epoch: int) -> dict:
        """One pass over the training rows; returns the row-weighted mean of each named loss as `train_<name>`."""
        cfg = self.config
        # dropout, sampling: a function of (seed, epoch) only (and the rank: each rank draws its own masks)
        seed_everything(_epoch_seed(cfg.seed, epoch) + self.world.rank)
        if hasattr(self.model, "set_epoch"):
            self.model.set_epoch(epoch)
        n = len(train["label"])
        sums: dict[str, float] = {}
        self.model.train()
        bar = tqdm(
            total=n,
            unit="rows",
            unit_scale=True,
            desc=f"{self.objective.name} {epoch}/{cfg.epochs}",
            disable=not cfg.progress or not self.world.is_main,
            leave=False,
        )
        release = getattr(train, "release", None)
        try:
            for step, (source, rows) in enumerate(self.epoch_batches(train, epoch)):
                idx, weight = self._local_rows(rows)
                losses = self.train_step(gather_rows(source, idx), epoch, step, weight)
                if release is not None and step % RELEASE_EVERY == RELEASE_EVERY - 1:
                    release()
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach()) * len(idx) * (weight > 0)
                bar.update(len(rows))
                if step % 20 == 0:
                    bar.set_postfix(loss=f"{losses['loss'].item():.4f}")
        finally:
            bar.close()
        sums = distributed.all_reduce_sums(sums, self.world)
        return {f"train_{k}": v / n for k, v in sums.items()}

    def _local_rows(self, rows: torch.Tensor) -> tuple[torch.Tensor, float]:
        """This rank's rows of a global batch and the weight of its loss. A rank left without rows (a last batch
        shorter than the world) still steps with every rank, on one row at weight 0, so the collectives match."""
        idx = distributed.shard(rows, self.world)
        if len(idx) == 0:
            return rows[:1], 0.0
        return idx, distributed.loss_weight(len(idx), len(rows), self.world)


class _ObjectiveLoss(nn.Module):
    """The objective's loss as a module's forward, so DistributedDataParallel can wrap it (DDP all-reduces the
    gradients of what its forward computed); the parameters are the model's own."""

    def __init__(self, model: nn.Module, objective: Objective):
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.objective.loss(self.model, batch)
