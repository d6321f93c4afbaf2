"""DGenCTR pre-training, transfer into fine-tuning, and sample generation.

    ckpt = pretrain(params, train_tensors, encoder, out_dir)                 # diffusion pre-training
    model = load_pretrained_for_finetune(encoder, params, ckpt, "all")     # a DGenCTR ready for the Trainer
    Trainer(model, cfg).fit(train_tensors, valid_tensors)                    # CTR fine-tuning (label masked)
    rows = generate(model, 1000, bank=train_tensors)                         # iterative unmasking

`params` is either the whole params.yaml dict (the `models.dgenctr` section is used; `train.seed`,
`train.threads` and `train.embedding_dim` fill the gaps) or that section alone. Pre-training settings live in
`models.dgenctr.pretrain` (epochs, batch_size, lr, weight_decay, grad_clip, seed, threads, valid_rows,
select, patience). With validation rows and `select: best_valid`, the checkpoint holds the epoch with the lowest
validation denoising loss, and pre-training stops after `patience` epochs without improvement (on small data
the denoiser memorises the training rows: its validation loss turns up after a few epochs).

Label-scarce pre-training: add a bool tensor `label_known` [n] to `train_tensors`; rows where it is False keep
their features in the diffusion but their label is always masked and never a target.

The pre-trained checkpoint also carries the vocabulary sizes it was trained with; fine-tuning must use the very
same fitted encoder (fit on the same training split), which `load_pretrained_for_finetune` checks.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ctrflow.config import DGenCTRPretrain, TrainParams, typed
from ctrflow.data.encoding import FeatureEncoder
from ctrflow.data.spec import FieldKind
from ctrflow.models.dgenctr import DENSE, LABEL, DGenCTR, mask_rate, parameter_group
from ctrflow.training import distributed
from ctrflow.training.metrics import format_value
from ctrflow.training.objectives import Denoising
from ctrflow.training.trainer import TrainConfig, Trainer, as_tensors, atomic_save, seed_everything

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "pretrained.pt"
FORMAT = "dgenctr-pretrained"
TRANSFERS = ("all", "embeddings", "scorer")
# constructor arguments that change the network's shapes or meaning: a checkpoint only loads into the same ones
ARCHITECTURE_KEYS = ("d_model", "layers", "heads", "ffn_mult", "steps", "schedule", "time_conditioning")
# the typed section `models.dgenctr.pretrain` (ctrflow.config.DGenCTRPretrain) is the one place these defaults live
PRETRAIN_DEFAULTS: dict[str, Any] = DGenCTRPretrain().model_dump()
VALID_BATCH_SIZE = 4096  # the validation corruption is drawn per batch of this size: fixed, so epochs compare


# ---- settings -------------------------------------------------------------------------------------------
def dgenctr_settings(params: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model constructor arguments, pre-training settings) from params.yaml or its `models.dgenctr` section."""
    if "models" in params or "train" in params:
        train = dict(params.get("train") or {})
        section = dict((params.get("models") or {}).get("dgenctr") or {})
        if "embedding_dim" in train:
            section.setdefault("embedding_dim", train["embedding_dim"])
    else:
        train, section = {}, dict(params)
    pre = typed(DGenCTRPretrain, section.get("pretrain"), "models.dgenctr.pretrain").model_dump()
    if pre["seed"] is None:
        pre["seed"] = int(train.get("seed", TrainParams().seed))
    if pre["threads"] is None:
        pre["threads"] = int(train.get("threads", TrainParams().threads))
    return section, pre


def _as_tensors(data: Mapping[str, Any], what: str) -> dict[str, torch.Tensor]:
    out = as_tensors(data, what)
    if len(out[LABEL]) == 0:
        raise ValueError(f"{what}: 0 rows")
    return out


def _head(data: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    return {k: v[:n] for k, v in data.items()}


# ---- pre-training ---------------------------------------------------------------------------------------
def pretrain_config(pre: Mapping[str, Any], out_dir: str | Path, with_valid: bool, progress: bool) -> TrainConfig:
    """The trainer settings of pre-training: AdamW with gradient clipping; with validation rows and
    `select: best_valid`, the epoch with the lowest validation denoising loss (`valid_loss`, min) is kept and
    `patience` epochs without a lower one stop the run; otherwise the last epoch is kept."""
    return TrainConfig(
        epochs=int(pre["epochs"]),
        batch_size=int(pre["batch_size"]),
        lr=float(pre["lr"]),
        weight_decay=float(pre["weight_decay"]),
        patience=int(pre["patience"]),
        seed=int(pre["seed"]),
        threads=int(pre["threads"]),
        checkpoint_dir=str(out_dir),
        progress=progress,
        eval_batch_size=VALID_BATCH_SIZE,
        optimizer="adamw",
        grad_clip=float(pre["grad_clip"]) if pre["grad_clip"] else None,
        monitor="valid_loss" if with_valid and pre["select"] == "best_valid" else "none",
        monitor_mode="min",
    )


def pretrain(
    params: Mapping[str, Any],
    train_tensors: Mapping[str, Any],
    encoder: FeatureEncoder,
    out_dir: str | Path,
    valid_tensors: Mapping[str, Any] | None = None,
    resume: bool = True,
    progress: bool = True,
) -> Path:
    """Diffusion pre-training on the training rows; writes `out_dir/pretrained.pt` and returns its path.

    The training loop is the project's one `Trainer` with the `Denoising` objective: a checkpoint (`last.pt`:
    model, optimizer, RNG, history) is written after every epoch, and with `resume=True` an interrupted run
    continues from it when its settings match (a different setting is a ValueError naming it). `pretrain.json`
    holds the settings and the per-epoch history.
    """
    section, pre = dgenctr_settings(params)
    seed_everything(int(pre["seed"]))  # before building: the initial weights are seeded too
    model = DGenCTR(encoder, **section)
    train = _as_tensors(train_tensors, "pretrain train")
    valid = _head(_as_tensors(valid_tensors, "pretrain valid"), int(pre["valid_rows"])) if valid_tensors else None
    out = Path(out_dir)
    main = distributed.current().is_main  # in a data-parallel run only rank 0 writes
    if main:
        out.mkdir(parents=True, exist_ok=True)
        encoder.save(out / "encoder.json")
    n = len(train[LABEL])
    labelled = int(train["label_known"].sum()) if "label_known" in train else n
    log.info(
        "pretrain: %d rows (%d with labels), %d tokens/sample, %d epochs, schedule %s, T=%d -> %s",
        n, labelled, model.n_tokens, int(pre["epochs"]), model.schedule, model.steps, out,
    )  # fmt: skip
    cfg = pretrain_config(pre, out, valid is not None, progress)
    model.prepare(train)
    result = Trainer(model, cfg, objective=Denoising()).fit(train, valid, resume=resume)
    if cfg.monitor != "none":
        log.info(
            "pretrain: keeping epoch %d (lowest validation denoising loss %s)",
            result.best_epoch,
            format_value(result.best_score),
        )
    path = out / CHECKPOINT_NAME
    if not main:
        return path
    atomic_save(
        {
            "format": FORMAT,
            "model_params": _plain(model.params),
            "vocab_sizes": encoder.vocab_sizes,
            "state_dict": model.state_dict(),
            "history": result.history,
            "best_epoch": result.best_epoch,
        },
        path,
    )
    (out / "pretrain.json").write_text(json.dumps({"settings": _plain(pre), "history": result.history}, indent=1))
    log.info("pretrained checkpoint: %s", path)
    return path


def _plain(x: Any) -> Any:
    """JSON round-trip: what a weights_only checkpoint can hold and compare."""
    return json.loads(json.dumps(x))


# ---- transfer -------------------------------------------------------------------------------------------
def load_pretrained_for_finetune(
    encoder: FeatureEncoder,
    params: Mapping[str, Any],
    checkpoint: str | Path | Mapping[str, Any],
    transfer: str = "all",
) -> DGenCTR:
    """A fine-tune-ready DGenCTR with the chosen pre-trained tensors loaded.

    transfer: "all" (the method: every tensor), "embeddings" (token/label/position/mask embeddings only) or
    "scorer" (Transformer, time embedding and output heads only); the rest keeps its fresh initialisation, so
    seed before calling. The loaded names are in `model.transferred`. `checkpoint` may be a path or the loaded
    dict.
    """
    if transfer not in TRANSFERS:
        raise ValueError(f"load_pretrained_for_finetune: transfer must be one of {TRANSFERS}, got '{transfer}'")
    section, _ = dgenctr_settings(params)
    ckpt = (
        torch.load(checkpoint, map_location="cpu", weights_only=True)
        if isinstance(checkpoint, (str, Path))
        else checkpoint
    )
    if ckpt.get("format") != FORMAT:
        raise ValueError(f"{checkpoint}: not a DGenCTR pre-trained checkpoint (format {ckpt.get('format')!r})")
    model = DGenCTR(encoder, **section)
    theirs = ckpt["model_params"]
    diff = {k: (theirs.get(k), model.params.get(k)) for k in ARCHITECTURE_KEYS if theirs.get(k) != model.params.get(k)}
    if diff:
        raise ValueError(f"{checkpoint}: pre-trained with other architecture settings (checkpoint, now): {diff}")
    vdiff = {
        k: (v, encoder.vocab_sizes.get(k)) for k, v in ckpt["vocab_sizes"].items() if encoder.vocab_sizes.get(k) != v
    }
    if vdiff or set(ckpt["vocab_sizes"]) != set(encoder.vocab_sizes):
        raise ValueError(
            f"{checkpoint}: vocabulary sizes differ (checkpoint, now): {vdiff or 'different fields'}; fine-tune with "
            "the encoder fitted for pre-training (same training split)"
        )
    state = ckpt["state_dict"]
    if transfer != "all":
        state = {k: v for k, v in state.items() if parameter_group(k) == transfer}
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"{checkpoint}: tensors the model does not have: {result.unexpected_keys}")
    if transfer == "all" and result.missing_keys:
        raise ValueError(f"{checkpoint}: tensors missing from the checkpoint: {result.missing_keys}")
    model.transferred = sorted(state)
    log.info("fine-tune model: %d of %d tensors transferred (%s)", len(state), len(model.state_dict()), transfer)
    return model


# ---- generation -----------------------------------------------------------------------------------------
@torch.no_grad()
def generate(
    model: DGenCTR,
    n: int,
    bank: Mapping[str, torch.Tensor] | None = None,
    steps: int | None = None,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 4096,
) -> dict[str, torch.Tensor]:
    """Sample `n` rows by iterative unmasking: all tokens start masked; going from step t to t−1 each masked token
    is revealed with probability (λ(t) − λ(t−1)) / λ(t), its value drawn from the model's p(x₀ | x_t).

    Ids come back per field as the encoder's token ids (never the unknown id 0 for large fields); sequence and
    embedding fields are drawn among the rows of `bank` (real rows, e.g. a sample of the training tensors) by
    the same cosine softmax the model was trained with. The label is generated only when it was diffused.
    """
    if n <= 0:
        raise ValueError(f"generate: n must be > 0, got {n}")
    steps = int(steps or model.steps)
    if not 1 <= steps <= model.steps:
        raise ValueError(f"generate: steps must be in 1..{model.steps}, got {steps}")
    dense = [p for p, k in enumerate(model.kinds) if k == DENSE]
    if dense and bank is None:
        raise ValueError(
            f"generate: fields {[model.token_names[p] for p in dense]} are dense; pass a bank of real rows"
        )
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    bank_values = {}
    if dense:
        bank = {k: v for k, v in bank.items()}
        for p in dense:
            bank_values[p] = model.embedding.embed_field(bank, model.fields[p])
    # the reverse chain visits `steps` points of the model's T-step grid
    grid = torch.round(torch.linspace(0, model.steps, steps + 1)).long()
    rates = mask_rate(grid, model.steps, model.schedule)
    outs: list[dict[str, torch.Tensor]] = []
    try:
        for start in range(0, n, batch_size):
            outs.append(
                _generate_chunk(model, min(batch_size, n - start), bank, bank_values, grid, rates, temperature, gen)
            )
    finally:
        model.train(was_training)
    return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}


def _generate_chunk(
    model: DGenCTR,
    b: int,
    bank: Mapping[str, torch.Tensor] | None,
    bank_values: dict[int, torch.Tensor],
    grid: torch.Tensor,
    rates: torch.Tensor,
    temperature: float,
    gen: torch.Generator,
) -> dict[str, torch.Tensor]:
    values: dict[int, torch.Tensor] = {p: torch.zeros(b, dtype=torch.long) for p in range(model.n_tokens)}
    masked = torch.ones(b, model.n_tokens, dtype=torch.bool)
    todo = [p for p in range(model.n_tokens) if p != model.label_pos or model.label_in_diffusion]

    def assemble() -> dict[str, torch.Tensor]:
        batch: dict[str, torch.Tensor] = {}
        for p, f in enumerate(model.fields):
            if model.kinds[p] == DENSE:
                batch[f.name] = bank[f.name][values[p]]
            else:
                batch[f.name] = values[p]
        batch[LABEL] = values[model.label_pos].float()
        return batch

    for s in range(len(grid) - 1, 0, -1):
        t, rate, prev_rate = int(grid[s]), float(rates[s]), float(rates[s - 1])
        reveal = 1.0 if s == 1 or rate <= 0 else (rate - prev_rate) / rate
        batch = assemble()
        h = model.encode(
            model.values(batch), masked | model.unknown(batch), torch.full((b,), max(t, 1), dtype=torch.long)
        )
        for p in todo:
            rows = masked[:, p] & (torch.rand(b, generator=gen) < reveal)
            idx = torch.nonzero(rows, as_tuple=True)[0]
            if len(idx) == 0:
                continue
            logits = model.position_logits(h[idx], p, bank_values.get(p)) / temperature
            values[p][idx] = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=gen).squeeze(1)
            masked[idx, p] = False
    out = {}
    for p, f in enumerate(model.fields):
        out[f.name] = bank[f.name][values[p]] if model.kinds[p] == DENSE else values[p]
    if model.label_in_diffusion:
        out[LABEL] = values[model.label_pos]
    return out


def _tv(a: np.ndarray, b: np.ndarray, size: int) -> float:
    pa = np.bincount(a, minlength=size) / max(len(a), 1)
    pb = np.bincount(b, minlength=size) / max(len(b), 1)
    return float(0.5 * np.abs(pa - pb).sum())


def _sample_rows(data: Mapping[str, torch.Tensor], n: int, seed: int) -> dict[str, torch.Tensor]:
    total = len(data[LABEL])
    idx = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[: min(n, total)]
    return {k: v[idx] for k, v in data.items()}


def generation_report(
    model: DGenCTR,
    encoder: FeatureEncoder,
    real: Mapping[str, torch.Tensor],
    holdout: Mapping[str, torch.Tensor] | None = None,
    n: int = 5000,
    steps: int | None = None,
    seed: int = 0,
    scenario_field: str | None = None,
) -> dict[str, Any]:
    """How well generated rows reproduce the data: per-field total variation between generated and real token
    marginals (categorical, bucketised numeric, label), next to the same distance between a second real sample
    and the first (`holdout` rows if given, else disjoint rows of `real`: the sampling-noise floor), and the click
    rate per scenario (generated vs real)."""
    real = _as_tensors(real, "generation real")
    if holdout is None:  # the floor: a second, disjoint sample of the same real rows
        perm = torch.randperm(len(real[LABEL]), generator=torch.Generator().manual_seed(seed))
        n = min(n, len(perm) // 2)
        real_s = {k: v[perm[:n]] for k, v in real.items()}
        hold_s = {k: v[perm[n : 2 * n]] for k, v in real.items()}
    else:
        real_s = _sample_rows(real, n, seed)
        hold_s = _sample_rows(_as_tensors(holdout, "generation holdout"), n, seed + 1)
    bank = _sample_rows(real, 4096, seed + 2)
    started = time.perf_counter()
    gen = generate(model, n, bank=bank, steps=steps, seed=seed)
    seconds = time.perf_counter() - started
    fields = []
    for f in encoder.spec.fields:
        if f.kind not in (FieldKind.CATEGORICAL, FieldKind.NUMERIC):
            continue
        size = encoder.vocab_size(f.name)
        fields.append(
            {
                "field": f.name,
                "kind": f.kind.value,
                "vocab": size,
                "tv_generated": _tv(gen[f.name].numpy(), real_s[f.name].numpy(), size),
                "tv_holdout": _tv(hold_s[f.name].numpy(), real_s[f.name].numpy(), size),
            }
        )
    report: dict[str, Any] = {"rows": n, "steps": steps or model.steps, "seconds": round(seconds, 1), "fields": fields}
    if LABEL in gen:
        y_gen, y_real = gen[LABEL].numpy(), real_s[LABEL].numpy().astype(np.int64)
        y_hold = hold_s[LABEL].numpy().astype(np.int64)
        fields.append(
            {
                "field": LABEL,
                "kind": "label",
                "vocab": 2,
                "tv_generated": _tv(y_gen, y_real, 2),
                "tv_holdout": _tv(y_hold, y_real, 2),
            }
        )
        sf = scenario_field or encoder.spec.scenario_field
        if sf in encoder.vocabs:
            names = ["<unknown>", *map(str, encoder.vocabs[sf])]
            per = {}
            for sid, sname in enumerate(names):
                g, r = gen[sf].numpy() == sid, real_s[sf].numpy() == sid
                if g.sum() == 0 and r.sum() == 0:
                    continue
                per[sname] = {
                    "real_rate": float(y_real[r].mean()) if r.any() else None,
                    "generated_rate": float(y_gen[g].mean()) if g.any() else None,
                    "real_share": float(r.mean()),
                    "generated_share": float(g.mean()),
                }
            report["label_rate_by_scenario"] = per
        report["label_rate"] = {"real": float(y_real.mean()), "generated": float(y_gen.mean())}
    tvs = [r["tv_generated"] for r in fields]
    report["mean_tv_generated"] = float(np.mean(tvs)) if tvs else math.nan
    report["mean_tv_holdout"] = float(np.mean([r["tv_holdout"] for r in fields]))
    return report


__all__ = [
    "CHECKPOINT_NAME",
    "TRANSFERS",
    "dgenctr_settings",
    "generate",
    "generation_report",
    "load_pretrained_for_finetune",
    "pretrain",
]
