"""Shared machinery of the quality benchmark: data preparation, one training run, records, result files.

A suite (benchmarks/suites/<name>.py) lists experiments; each experiment is a function
`run(ctx: BenchContext, seed: int) -> dict` returning the metric fields of one record, trained and scored by the
pipeline's own recipe (`ctrflow.training.recipe.train_evaluate_save`, through `train_and_evaluate`). The harness adds the
identifying fields, merges the records into benchmarks/results/quality.json (replacing records with the same
key) and re-renders quality.md as mean ± std over seeds.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ctrflow.data.encoding import FeatureEncoder
from ctrflow.data.frames import point_in_time_frame
from ctrflow.data.splits import make_split
from ctrflow.data.tables import Dataset
from ctrflow.models.base import CTRModel
from ctrflow.registry import atomic_write
from ctrflow.training.recipe import SplitData, train_evaluate_save
from ctrflow.training.trainer import TrainConfig

log = logging.getLogger(__name__)

RESULTS = Path(__file__).resolve().parent / "results"
KEY = ("model", "variant", "dataset", "protocol", "split", "seed")
COLD_ITEM_THRESHOLD = 5
# published figures printed beside ours, per (dataset, protocol): test AUC overall ("auc") and per scenario
REFERENCES: dict[tuple[str, str], dict[str, Any]] = {
    ("ml-1m-swr", "published"): {
        "source": "Scenario-Wise Rec (Li et al., KDD 2024, arXiv 2412.17374), Table 4 overall and Table 7 per "
        "scenario, mean of 3 seeds",
        "variant": "published",  # our variant the published rows are set beside and compared with
        "rows": {
            "sharedbottom": {"auc": 0.8095, "<25": 0.8116, "25-34": 0.8128, ">=35": 0.8041},
            "mmoe": {"auc": 0.8086, "<25": 0.8029, "25-34": 0.8178, ">=35": 0.8016},
            "ple": {"auc": 0.8091, "<25": 0.8118, "25-34": 0.8187, ">=35": 0.8002},
            "star": {"auc": 0.8096, "<25": 0.8137, "25-34": 0.8133, ">=35": 0.7979},
        },
    },
}


@dataclass
class Experiment:
    model: str
    variant: str
    run: Callable[[BenchContext, int], dict[str, Any]]
    protocol: str = "standard"
    extra: dict[str, Any] = field(default_factory=dict)  # fixed record fields, e.g. {"sparse_scenario": "<25"}
    # why the experiment cannot run on a dataset (e.g. DIN on a spec without a behaviour sequence), None when it can:
    # such an experiment is skipped with a warning and no record, instead of failing the rest of the suite
    not_applicable: Callable[[BenchContext], str | None] | None = None


@dataclass
class BenchContext:
    """One dataset under one split: frames, a train-fitted encoder and tensors, built once and shared by runs."""

    dataset: Dataset
    split: str
    epochs: int = 20
    patience: int = 2
    batch_size: int = 1024
    threads: int = 1
    split_seed: int = 0

    @cached_property
    def frame(self) -> pd.DataFrame:
        frame = point_in_time_frame(self.dataset)
        frame["split"] = make_split(frame, self.split, seed=self.split_seed).to_numpy()
        return frame

    def part(self, name: str) -> pd.DataFrame:
        return self.frame[self.frame["split"] == name].reset_index(drop=True)

    @cached_property
    def data(self) -> SplitData:
        """The splits as tensors, the encoder fitted on train, raw user ids: what the training recipe takes."""
        return SplitData.from_frame(self.frame, self.dataset.spec, where=f"{self.dataset.name}/{self.split}")

    @property
    def encoder(self) -> FeatureEncoder:
        return self.data.encoder

    @property
    def tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        return self.data.tensors

    @cached_property
    def cold_item_mask(self) -> np.ndarray:
        """Test rows whose item has fewer than 5 training interactions."""
        counts = self.part("train")["item_id"].value_counts()
        return self.part("test")["item_id"].map(counts).fillna(0).to_numpy() < COLD_ITEM_THRESHOLD

    def train_config(self, seed: int, **overrides: Any) -> TrainConfig:
        values = {"epochs": self.epochs, "patience": self.patience, "batch_size": self.batch_size, "seed": seed, "threads": self.threads, "progress": False}
        values.update(overrides)
        return TrainConfig(**values)


def train_and_evaluate(ctx: BenchContext, build: Callable[[], CTRModel], seed: int, train: dict[str, torch.Tensor] | None = None, **config: Any) -> dict[str, Any]:
    """One record's metric fields: the pipeline's recipe (seed, build, fit with early stopping on the validation
    split, evaluate) with the test split's metrics (cold-item AUC included), no artifact saved."""
    run = train_evaluate_save(
        build, ctx.data, ctx.train_config(seed, **config), train=train, evaluate_splits=("test",), subsets={"test": {"cold_item": ctx.cold_item_mask}}
    )
    record = {k: v for k, v in run.metrics["test"].items() if k != "n"}
    record.update({"train_rows": run.metrics["train_rows"], "epochs": run.fit.epochs, "train_seconds": round(run.seconds, 1)})
    return record


# ---- results ------------------------------------------------------------------------------------------
def _clean(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items() if _clean(v) is not None}
    if isinstance(x, float | np.floating):
        return None if math.isnan(x) else round(float(x), 5)
    if isinstance(x, np.integer):
        return int(x)
    return x


def merge_records(
    new: list[dict[str, Any]],
    path: Path,
    key: tuple[str, ...] = KEY,
    render: Callable[[list[dict[str, Any]]], str] | None = None,
) -> list[dict[str, Any]]:
    """Replace the records of `path` with the same `key` fields, keep the rest: every benchmark (quality, speed,
    serving, generation) can be re-run a piece at a time. With `render`, its text of the merged records is written
    beside as `<path stem>.md` under the same lock, so the table always shows what the JSON holds.

    Two benchmark processes often share a results file (grids run side by side): the read-modify-write holds an
    exclusive lock, and each file is replaced in one rename (`ctrflow.registry.atomic_write`), so a reader never
    sees half a file. A results file that is not valid JSON is moved aside as `<name>.corrupt-<time>` (logged) and
    the merge starts from its new records, so a finished run's records are never lost to an old file's damage.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        old: list[dict[str, Any]] = []
        if path.exists():
            try:
                old = json.loads(path.read_text())
                if not isinstance(old, list):
                    raise ValueError(f"a JSON {type(old).__name__}, not a list of records")
            except ValueError as e:  # json.JSONDecodeError is a ValueError
                aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
                os.replace(path, aside)
                log.error("results: %s is not a list of records (%s); moved to %s, starting from the new records", path, e, aside)
                old = []
        keys = {tuple(r.get(k) for k in key) for r in new}
        merged = [r for r in old if tuple(r.get(k) for k in key) not in keys] + new
        atomic_write(path, json.dumps(merged, indent=1))
        if render is not None:
            atomic_write(path.with_suffix(".md"), render(merged))
    return merged


def mean_std(values: list[float | None], digits: int = 4) -> str:
    """'mean ± sample std' of the values present; one value alone; '–' for none."""
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


def render_markdown(records: list[dict[str, Any]]) -> str:
    """One table per (dataset, split, protocol): mean ± std over seeds of AUC, gAUC, logloss, per-scenario, cold-item AUC."""
    if not records:
        return "# Quality\n\nNo results yet.\n"
    df = pd.DataFrame(records)
    lines = ["# Quality benchmark", "", "Test-split metrics, mean ± sample std over seeds. Written by `python -m benchmarks.quality`.", ""]
    group_cols = ["dataset", "split", "protocol"]
    for (dataset, split, protocol), block in df.groupby(group_cols, sort=True):
        extra = ""
        if "sparse_scenario" in block and block["sparse_scenario"].notna().any():
            extra = f", sparse scenario {block['sparse_scenario'].dropna().iloc[0]}"
            if "sparse_keep" in block and block["sparse_keep"].notna().any():
                keep, seed = block["sparse_keep"].dropna().iloc[0], block["sparse_seed"].dropna().iloc[0]
                extra += f" ({keep:.0%} of its training rows kept, sample seed {int(seed)})"
        if "label_fraction" in block and block["label_fraction"].notna().any() and protocol.startswith("label-scarce"):
            extra += f", label fraction {block['label_fraction'].dropna().iloc[0]}"
        lines += [f"## {dataset}, {split} split, {protocol} protocol{extra}", ""]
        reference = REFERENCES.get((dataset, protocol))
        scenarios = sorted({s for d in block["scenario_auc"].dropna() for s in d})
        header = ["model", "variant", "seeds", "AUC", "gAUC", "logloss", *[f"AUC {s}" for s in scenarios]]
        has_cold = "cold_item_auc" in block and block["cold_item_auc"].notna().any()
        if has_cold:
            header.append("cold-item AUC")
        header += ["epochs", "train s"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for (model, variant), rows in block.groupby(["model", "variant"], sort=False):
            cells = [model, variant, str(len(rows)), mean_std(rows["auc"].tolist()), mean_std(rows["gauc"].tolist()), mean_std(rows["logloss"].tolist())]
            for s in scenarios:
                cells.append(mean_std([d.get(s) if isinstance(d, dict) else None for d in rows["scenario_auc"]]))
            if has_cold:
                cells.append(mean_std(rows["cold_item_auc"].tolist()))
            cells.append(f"{rows['epochs'].mean():.1f}" if "epochs" in rows else "–")
            cells.append(f"{rows['train_seconds'].mean():.0f}" if "train_seconds" in rows else "–")
            lines.append("| " + " | ".join(cells) + " |")
            published = reference["rows"].get(model) if reference and variant == reference["variant"] else None
            if published:
                cells = [model, "paper (published)", "3", f"{published['auc']:.4f}", "–", "–"]
                cells += [f"{published[s]:.4f}" if s in published else "–" for s in scenarios]
                cells += ["–"] * (int(has_cold) + 2)
                lines.append("| " + " | ".join(cells) + " |")
        if "scenario_train_rows" in block and block["scenario_train_rows"].notna().any():
            counts = block["scenario_train_rows"].dropna().iloc[0]
            lines += ["", "Training rows per scenario: " + ", ".join(f"{s} {n:,}" for s, n in counts.items())]
        if reference:
            lines += [
                "",
                f"Published rows: {reference['source']}. Ours ({reference['variant']}) minus published, overall AUC "
                "(mean over seeds):",
            ]
            for model, rows in block[block["variant"] == reference["variant"]].groupby("model", sort=False):
                if model in reference["rows"]:
                    diff = rows["auc"].mean() - reference["rows"][model]["auc"]
                    lines.append(f"- {model}: {diff:+.4f} ({'within' if abs(diff) <= 0.005 else 'outside'} ±0.005)")
        lines.append("")
    return "\n".join(lines)


def run_experiments(
    experiments: list[Experiment],
    ctx: BenchContext,
    seeds: list[int],
    out_dir: Path = RESULTS,
    progress: bool = True,
    resume: bool = False,
) -> list[dict[str, Any]]:
    """Run every experiment for every seed; merge into quality.json and re-render quality.md after each record.
    resume: skip (model, variant, protocol, seed) already recorded for this dataset and split."""
    from tqdm import tqdm

    records = []
    todo = [(e, s) for e in experiments for s in seeds]
    path = out_dir / "quality.json"
    if resume and path.exists():
        done = {
            (r["model"], r["variant"], r["protocol"], r["seed"])
            for r in json.loads(path.read_text())
            if (r["dataset"], r["split"]) == (ctx.dataset.name, ctx.split)
        }
        todo = [(e, s) for e, s in todo if (e.model, e.variant, e.protocol, s) not in done]
    skipped = {}
    for e, _ in todo:
        reason = e.not_applicable(ctx) if e.not_applicable is not None else None
        if reason and (e.model, e.variant) not in skipped:
            skipped[(e.model, e.variant)] = reason
            log.warning("%s/%s on %s: not run: %s", e.model, e.variant, ctx.dataset.name, reason)
    todo = [(e, s) for e, s in todo if (e.model, e.variant) not in skipped]
    bar = tqdm(todo, disable=not progress, desc=f"{ctx.dataset.name}/{ctx.split}")
    for exp, seed in bar:
        bar.set_postfix_str(f"{exp.model}/{exp.variant} seed {seed}")
        metrics = exp.run(ctx, seed)
        record = {"model": exp.model, "variant": exp.variant, "dataset": ctx.dataset.name, "protocol": exp.protocol, "split": ctx.split, "seed": seed}
        record.update(exp.extra)
        record.update(metrics)
        record = _clean(record)
        records.append(record)
        merge_records([record], out_dir / "quality.json", render=render_markdown)
    return records
