"""DGenCTR against the baselines, with every ablation, under the standard and the label-scarce protocols.

    python -m benchmarks.quality --suite baselines dgenctr --splits temporal random --seeds 0 1 2 --threads 1

Variants (model `dgenctr`):
- `full`                 diffusion pre-training (label included), then fine-tuning that transfers every tensor;
- `no-pretrain`          the same network trained on the CTR task from scratch;
- `emb-only-transfer`    only the embeddings (token tables, label/position/mask embeddings) transferred;
- `scorer-only-transfer` only the scoring network (Transformer, time embedding, heads) transferred;
- `no-label-diffusion`   pre-training with the label left out of the diffusion, then full transfer;
- `long-pretrain`        `full` with $DGENCTR_LONG_PRETRAIN_EPOCHS (default 12) pre-training epochs instead of
                         params.yaml's, to see whether more pre-training pays;
- `finetune-lr-3e-4`     `full` fine-tuned with lr 3e-4 instead of 1e-3 (label-scarce protocol only);
- `aux-denoise-0.5`      `full` with the denoising loss kept during fine-tuning at weight 0.5, a regulariser for
                         few labels (label-scarce protocol only).
Label-scarce protocols, `label-scarce` (`label_fraction` 0.1) and `label-scarce-1pct` (0.01): fine-tuning, and the
baselines, see 10% (1%) of the training labels (a seeded random subset per seed); pre-training sees the features of
every training row but only those labels. The transfer/label ablations run under the 10% protocol only.
Validation (early stopping) and test are the same full splits under both protocols.

Pre-training is done once per (dataset, split, seed, pre-training kind) and reused by every fine-tuning variant;
the standard pre-training also writes a generation report to benchmarks/results/generation.{json,md}.
$DGENCTR_ABLATION_PROTOCOLS (standard, label-scarce, or both comma-separated; default both) picks the protocols
that get the three transfer/label ablations; `full` and `no-pretrain` always run under both.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from argparse import Namespace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.harness import RESULTS, BenchContext, Experiment, mean_std, merge_records, train_and_evaluate
from ctrflow.config import load_params, merge
from ctrflow.models import build_model, known_models
from ctrflow.training.recipe import model_params

log = logging.getLogger(__name__)

LABEL_FRACTION = 0.1
SCARCE = "label-scarce"
# protocol -> share of the training labels kept (fine-tuning and the baselines; pre-training sees every row's features)
SCARCE_FRACTIONS = {SCARCE: LABEL_FRACTION, "label-scarce-1pct": 0.01}
BASELINES = ("lr", "deepfm", "dcnv2", "din")
GENERATION_ROWS = 5000
GENERATION_STEPS = 50

_PRETRAINED: dict[tuple, dict[str, Any]] = {}  # (dataset, split, split_seed, seed, kind) -> checkpoint dict
_SUBSETS: dict[tuple, torch.Tensor] = {}


def dgenctr_section(overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The models.dgenctr section of params.yaml with overrides (dotted keys reach into pretrain/finetune)."""
    section = dict(load_params().get("models", {}).get("dgenctr") or {})
    return merge(section, overrides) if overrides else section


def label_subset(ctx: BenchContext, seed: int, fraction: float = LABEL_FRACTION) -> torch.Tensor:
    """Indices of the training rows whose labels the label-scarce protocol keeps (seeded, sorted)."""
    key = (ctx.dataset.name, ctx.split, ctx.split_seed, seed, fraction)
    if key not in _SUBSETS:
        n = len(ctx.tensors["train"]["label"])
        rng = np.random.default_rng(10_000 + seed)
        keep = np.sort(rng.choice(n, size=max(1, int(round(n * fraction))), replace=False))
        _SUBSETS[key] = torch.from_numpy(keep)
    return _SUBSETS[key]


def scarce_train(ctx: BenchContext, seed: int, fraction: float = LABEL_FRACTION) -> dict[str, torch.Tensor]:
    idx = label_subset(ctx, seed, fraction)
    return {k: v[idx] for k, v in ctx.tensors["train"].items()}


def long_pretrain_epochs() -> int:
    return int(os.environ.get("DGENCTR_LONG_PRETRAIN_EPOCHS", "12"))


def pretrained(
    ctx: BenchContext,
    seed: int,
    kind: str,
    out: Path = RESULTS,
    epochs: int | None = None,
    fraction: float = LABEL_FRACTION,
) -> dict[str, Any]:
    """The pre-trained checkpoint for (ctx, seed, kind, epochs), made on first use: kind = standard | scarce |
    no-label; epochs None = params.yaml's; fraction: the labels a `scarce` pre-training sees (label_subset)."""
    from ctrflow.training.pretrain import generation_report, load_pretrained_for_finetune, pretrain

    key = (ctx.dataset.name, ctx.split, ctx.split_seed, seed, kind, epochs, fraction if kind == "scarce" else None)
    if key in _PRETRAINED:
        return _PRETRAINED[key]
    overrides: dict[str, Any] = {"pretrain.seed": seed, "pretrain.threads": ctx.threads}
    if epochs is not None:
        overrides["pretrain.epochs"] = epochs
    if kind == "no-label":
        overrides["label_in_diffusion"] = False
    section = dgenctr_section(overrides)
    train = dict(ctx.tensors["train"])
    if kind == "scarce":
        known = torch.zeros(len(train["label"]), dtype=torch.bool)
        known[label_subset(ctx, seed, fraction)] = True
        train["label_known"] = known
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dgenctr-pretrain-") as tmp:
        path = pretrain(section, train, ctx.encoder, tmp, ctx.tensors["valid"], resume=False, progress=False)
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    ckpt["seconds"] = round(time.perf_counter() - started, 1)
    _PRETRAINED[key] = ckpt
    log.info("pre-trained %s in %.0f s", key, ckpt["seconds"])
    if kind == "standard" and epochs is None:
        model = load_pretrained_for_finetune(ctx.encoder, section, ckpt, "all")
        report = generation_report(
            model, ctx.encoder, ctx.tensors["train"], None, n=GENERATION_ROWS, steps=GENERATION_STEPS, seed=seed
        )
        write_generation({"dataset": ctx.dataset.name, "split": ctx.split, "seed": seed, **report}, out)
    return ckpt


def dgenctr_experiment(
    variant: str,
    transfer: str | None,
    kind: str | None,
    protocol: str = "standard",
    out: Path = RESULTS,
    pretrain_epochs: int | None = None,
    overrides: dict[str, Any] | None = None,
) -> Experiment:
    """transfer None = no pre-training; kind = which pre-training (standard | scarce | no-label); overrides: the
    fine-tuning's models.dgenctr settings (dotted keys), never architecture keys (the checkpoint is shared)."""
    from ctrflow.training.pretrain import load_pretrained_for_finetune

    fraction = SCARCE_FRACTIONS.get(protocol)  # None: every label (standard)

    def run(ctx: BenchContext, seed: int) -> dict[str, Any]:
        section = dgenctr_section(overrides)
        ckpt = pretrained(ctx, seed, kind, out, pretrain_epochs, fraction or LABEL_FRACTION) if transfer is not None else None
        if transfer is None:
            build = lambda: build_model("dgenctr", ctx.encoder, section)  # noqa: E731
        else:
            build = lambda: load_pretrained_for_finetune(ctx.encoder, section, ckpt, transfer)  # noqa: E731
        train = scarce_train(ctx, seed, fraction) if fraction else None
        lr = (section.get("finetune") or {}).get("lr")
        record = train_and_evaluate(ctx, build, seed, train=train, **({"lr": float(lr)} if lr else {}))
        if ckpt is not None:
            record["pretrain_seconds"] = ckpt["seconds"]
            record["pretrain_epochs"] = len(ckpt["history"])
            record["pretrain_best_epoch"] = ckpt["best_epoch"]
            zero_shot = ckpt["history"][ckpt["best_epoch"] - 1].get("valid_zero_shot_auc")
            if zero_shot is not None:  # the pre-trained label head alone, before fine-tuning
                record["pretrain_valid_zero_shot_auc"] = zero_shot
        if fraction:
            record["label_fraction"] = fraction
        return record

    extra = {"label_fraction": fraction} if fraction else {}
    return Experiment(model="dgenctr", variant=variant, run=run, protocol=protocol, extra=extra)


def scarce_baseline(name: str, protocol: str = SCARCE) -> Experiment:
    fraction = SCARCE_FRACTIONS[protocol]

    def run(ctx: BenchContext, seed: int) -> dict[str, Any]:
        params = model_params(load_params(), name)
        return train_and_evaluate(
            ctx, lambda: build_model(name, ctx.encoder, params), seed, train=scarce_train(ctx, seed, fraction)
        )

    return Experiment(model=name, variant="full", run=run, protocol=protocol, extra={"label_fraction": fraction})


def experiments(args: Namespace) -> list[Experiment]:
    """Every variant under both protocols. $DGENCTR_ABLATION_PROTOCOLS (comma-separated: standard, label-scarce;
    default both; empty: none) limits the transfer/label ablations to some protocols, to bound the wall time."""
    out = Path(getattr(args, "out", RESULTS))
    available = set(known_models())
    ablate = {p.strip() for p in os.environ.get("DGENCTR_ABLATION_PROTOCOLS", f"standard,{SCARCE}").split(",") if p.strip()}
    unknown = ablate - {"standard", SCARCE}
    if unknown:
        raise ValueError(f"DGENCTR_ABLATION_PROTOCOLS: unknown protocols {sorted(unknown)} (standard, {SCARCE})")
    exps = [
        dgenctr_experiment("full", "all", "standard", out=out),
        dgenctr_experiment("no-pretrain", None, None, out=out),
    ]
    if "standard" in ablate:
        exps += [
            dgenctr_experiment("emb-only-transfer", "embeddings", "standard", out=out),
            dgenctr_experiment("scorer-only-transfer", "scorer", "standard", out=out),
            dgenctr_experiment("no-label-diffusion", "all", "no-label", out=out),
            dgenctr_experiment("long-pretrain", "all", "standard", out=out, pretrain_epochs=long_pretrain_epochs()),
        ]
    for protocol in SCARCE_FRACTIONS:
        exps += [scarce_baseline(name, protocol) for name in BASELINES if name in available]
        exps += [
            dgenctr_experiment("full", "all", "scarce", protocol=protocol, out=out),
            dgenctr_experiment("no-pretrain", None, None, protocol=protocol, out=out),
        ]
    if SCARCE in ablate:
        exps += [
            dgenctr_experiment("emb-only-transfer", "embeddings", "scarce", protocol=SCARCE, out=out),
            dgenctr_experiment("scorer-only-transfer", "scorer", "scarce", protocol=SCARCE, out=out),
            dgenctr_experiment("no-label-diffusion", "all", "no-label", protocol=SCARCE, out=out),
            dgenctr_experiment(
                "long-pretrain", "all", "scarce", protocol=SCARCE, out=out, pretrain_epochs=long_pretrain_epochs()
            ),
            dgenctr_experiment("finetune-lr-3e-4", "all", "scarce", SCARCE, out, overrides={"finetune.lr": 3e-4}),
            dgenctr_experiment("aux-denoise-0.5", "all", "scarce", SCARCE, out, overrides={"finetune_aux_weight": 0.5}),
        ]
    return exps


# ---- generation report ----------------------------------------------------------------------------------
def write_generation(record: dict[str, Any], out: Path = RESULTS) -> None:
    """Merge one generation report (keyed by dataset, split, seed) into generation.json; re-render generation.md."""
    merge_records([record], out / "generation.json", key=("dataset", "split", "seed"), render=render_generation)


def _ms(values: list[float | None]) -> str:
    return mean_std(values, digits=3)


def render_generation(records: list[dict[str, Any]]) -> str:
    lines = [
        "# DGenCTR as a sample generator",
        "",
        f"Rows drawn from the pre-trained model by iterative unmasking ({GENERATION_STEPS} reverse steps, all tokens "
        "masked at the start), compared with the same number of real training rows. TV = total variation distance "
        "between token marginals (0 = identical). The floor column compares a second, disjoint sample of real "
        "training rows with the first: what sampling noise alone gives. Mean ± std over seeds. Written by "
        "`python -m benchmarks.quality --suite dgenctr`.",
        "",
    ]
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["dataset"], r["split"]), []).append(r)
    for (dataset, split), rs in sorted(groups.items()):
        lines += [f"## {dataset}, {split} split ({len(rs)} seeds, {rs[0]['rows']} generated rows each)", ""]
        lines += ["| field | kind | vocab | TV generated vs real | TV real vs real (floor) |", "|---|---|---|---|---|"]
        for i, f in enumerate(rs[0]["fields"]):
            gen = [r["fields"][i]["tv_generated"] for r in rs]
            hold = [r["fields"][i].get("tv_holdout") for r in rs]
            lines.append(f"| {f['field']} | {f['kind']} | {f['vocab']} | {_ms(gen)} | {_ms(hold)} |")
        lines.append(
            f"| **mean** | | | {_ms([r['mean_tv_generated'] for r in rs])} | "
            f"{_ms([r.get('mean_tv_holdout') for r in rs])} |"
        )
        lines.append("")
        if "label_rate_by_scenario" in rs[0]:
            lines += ["Click rate per scenario (real training rows vs generated rows; share of rows in brackets):", ""]
            lines += [
                "| scenario | real rate | generated rate | real share | generated share |",
                "|---|---|---|---|---|",
            ]
            names = sorted({s for r in rs for s in r["label_rate_by_scenario"]})
            for s in names:
                cells = [r["label_rate_by_scenario"].get(s, {}) for r in rs]
                lines.append(
                    f"| {s} | {_ms([c.get('real_rate') for c in cells])} | {_ms([c.get('generated_rate') for c in cells])} "
                    f"| {_ms([c.get('real_share') for c in cells])} | {_ms([c.get('generated_share') for c in cells])} |"
                )
            lr = [r["label_rate"] for r in rs]
            lines.append(f"| **all** | {_ms([x['real'] for x in lr])} | {_ms([x['generated'] for x in lr])} | 1 | 1 |")
            lines.append("")
        lines.append(f"Generation time: {_ms([r['seconds'] for r in rs])} s per {rs[0]['rows']} rows.")
        lines.append("")
    return "\n".join(lines)
