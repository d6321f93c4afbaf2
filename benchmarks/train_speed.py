"""Training and inference speed (samples/s) and peak memory (RSS) of every model, with DeepCTR-Torch's DeepFM
measured on the same data in the same run.

    python -m benchmarks.train_speed                       # ML-100K + Criteo-shaped synthetic, all models
    python -m benchmarks.train_speed --datasets criteo-shaped-synthetic --models deepfm --threads 2

Datasets:
- `ml-100k`: the temporal split's training rows, encoded as every model reads them (12 fields, 2 sequences);
- `criteo-shaped-synthetic`: built here: 13 bucketised numeric + 26 categorical fields whose cardinalities are
  Criteo's scaled to ~1M embedding rows in total (the big fields are marked `large`), Zipf-like ids, a
  learnable label.

Each (dataset, model, implementation) is measured in a fresh subprocess, so its peak RSS is its own. Training
throughput = rows / wall time of one epoch through the production trainer (ctrflow) or `model.fit` (the
reference), same batch size, embedding dim, MLP, optimizer (Adam, lr 1e-3) and threads; the reference runs with
its regularisers and per-batch metrics off (they are off in ours too). Inference = `predict` over the same rows.
ctrflow models run with dense gradients and, where the spec marks large fields, again with sparse gradients
(SparseAdam on the large tables).

DeepCTR-Torch is optional, installed only for this benchmark:
    .venv/bin/pip install --no-deps deepctr-torch==0.3.0     (it needs torch, tqdm, scikit-learn, requests)
Without it the reference rows are skipped with a message. Writes benchmarks/results/train_speed.{json,md}.
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
DATASETS = ("ml-100k", "criteo-shaped-synthetic")
BACKBONES = ("sharedbottom", "mmoe", "ple", "star")
MODELS = ("lr", "deepfm", "dcnv2", "din", "dgenctr", *BACKBONES, *(f"gsvr-{b}" for b in BACKBONES))
REFERENCE = "deepctr-torch"
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


def prepare(dataset: str, rows: int, directory: Path) -> Path:
    """Build a dataset once and store it for the measuring subprocesses."""
    encoder, arrays = ml100k() if dataset == "ml-100k" else criteo_shaped(rows)
    path = directory / dataset
    path.mkdir(parents=True, exist_ok=True)
    encoder.save(path / "encoder.json")
    np.savez(path / "arrays.npz", **arrays)
    return path


# ---- one measurement (runs in its own process) ----------------------------------------------------------
def _peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)  # Linux: KiB


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
    cfg = TrainConfig(epochs=1, batch_size=job["batch_size"], lr=1e-3, threads=job["threads"], progress=False)
    result = Trainer(model, cfg).fit(tensors)
    train_rss = _peak_rss_mb()
    started = time.perf_counter()
    predict(model, tensors, job["batch_size"])
    infer_s = time.perf_counter() - started
    out = [
        {"phase": "train", "samples_per_s": n / result.seconds, "seconds": result.seconds, "peak_rss_mb": train_rss,
         "rows": n},
        {"phase": "inference", "samples_per_s": n / infer_s, "seconds": infer_s, "peak_rss_mb": _peak_rss_mb(), "rows": n},
    ]  # fmt: skip
    if job["model"] == "dgenctr":  # the pre-training step (diffusion loss) on a slice of the same rows
        from ctrflow.training.pretrain import pretrain

        m = min(n, job["pretrain_rows"])
        section = {**params, "pretrain": {"epochs": 1, "batch_size": job["batch_size"], "threads": job["threads"]}}
        with tempfile.TemporaryDirectory() as tmp:
            pretrain(section, {k: v[:m] for k, v in tensors.items()}, encoder, tmp, progress=False)
            seconds = json.loads((Path(tmp) / "pretrain.json").read_text())["history"][0]["seconds"]
        out.append({"phase": "pretrain", "samples_per_s": m / seconds, "seconds": seconds, "peak_rss_mb": _peak_rss_mb(),
                    "rows": m})  # fmt: skip
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
        arrays = {k: z[k] for k in z.files}
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
    started = time.perf_counter()
    model.fit(x, y, batch_size=job["batch_size"], epochs=1, verbose=0, shuffle=True)
    train_s = time.perf_counter() - started
    train_rss = _peak_rss_mb()
    started = time.perf_counter()
    model.predict(x, batch_size=job["batch_size"])
    infer_s = time.perf_counter() - started
    return [
        {"phase": "train", "samples_per_s": n / train_s, "seconds": train_s, "peak_rss_mb": train_rss, "rows": n},
        {
            "phase": "inference",
            "samples_per_s": n / infer_s,
            "seconds": infer_s,
            "peak_rss_mb": _peak_rss_mb(),
            "rows": n,
        },
    ]


def run_one(job: dict[str, Any]) -> list[dict[str, Any]]:
    """Launch one measurement in a fresh interpreter; its records (or an error record) come back."""
    cmd = [sys.executable, "-m", "benchmarks.train_speed", "--one", json.dumps(job)]
    env = {**os.environ, "OMP_NUM_THREADS": str(job["threads"])}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[1])
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = (proc.stderr or proc.stdout)[-2000:]
    raise RuntimeError(f"{job['impl']} {job['model']} on {job['dataset']} failed (exit {proc.returncode}):\n{tail}")


# ---- output -----------------------------------------------------------------------------------------------
KEY = ("dataset", "model", "impl", "sparse", "phase")  # records merged by these (datasets, models one run at a time)


def ratios(records: list[dict[str, Any]], dataset: str) -> dict[str, Any] | None:
    """ctrflow DeepFM (its faster gradient setting) over the reference DeepFM, from records of one run."""
    rows = [r for r in records if r["dataset"] == dataset and r["model"] == "deepfm"]
    ref = {r["phase"]: r for r in rows if r["impl"] == REFERENCE}
    ours = [r for r in rows if r["impl"] == "ctrflow"]
    if "train" not in ref or not any(r["phase"] == "train" for r in ours):
        return None
    best = max((r for r in ours if r["phase"] == "train"), key=lambda r: r["samples_per_s"])
    inference = max((r["samples_per_s"] for r in ours if r["phase"] == "inference"), default=None)
    return {
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


def render_markdown(records: list[dict[str, Any]], notes: list[str] = ()) -> str:
    first = records[0]
    lines = [
        "# Training speed",
        "",
        f"Samples/s (higher is better) and peak RSS of one process per model; batch {first['batch_size']}, "
        f"torch threads per row, embedding {first.get('embedding_dim', 16)}, DeepFM MLP "
        f"{first.get('mlp', [400, 400, 400])}, one epoch through the production trainer (ctrflow) or `fit` (reference), "
        "Adam lr 1e-3 for both; with repeats, the median run (interleaved, so load from other processes hits every "
        "implementation alike). Rows with the same `run` were measured in one invocation; compare speeds within a run "
        "(the machine is shared and noisy). Written by `python -m benchmarks.train_speed`.",
        "",
    ]
    for dataset in dict.fromkeys(r["dataset"] for r in records):
        rows = [r for r in records if r["dataset"] == dataset]
        sizes = sorted({r["rows"] for r in rows})
        what = f"{sizes[-1]:,} training rows" + (f"; DGenCTR timed on {sizes[0]:,}" if len(sizes) > 1 else "")
        lines += [f"## {dataset} ({what})", ""]
        lines += [
            "| model | impl | gradients | threads | train samples/s | inference samples/s | pretrain samples/s "
            "| peak RSS MB | run |"
        ]
        lines += ["|---|---|---|---|---|---|---|---|---|"]
        keys = list(dict.fromkeys((r["model"], r["impl"], r.get("sparse")) for r in rows))
        for model, impl, sparse in keys:
            got = {r["phase"]: r for r in rows if (r["model"], r["impl"], r.get("sparse")) == (model, impl, sparse)}
            cells = [_speed(got.get(p)) for p in ("train", "inference", "pretrain")]
            grads = "–" if sparse is None else ("sparse (large tables)" if sparse else "dense")
            rss = max(r["peak_rss_mb"] for r in got.values())
            any_rec = next(iter(got.values()))
            lines.append(
                f"| {model} | {impl} | {grads} | {any_rec['threads']} | {' | '.join(cells)} | {rss:,.0f} "
                f"| {any_rec.get('run', '–')} |"
            )
        ratio = ratios(records, dataset)
        if ratio:
            inf = f"; inference {ratio['inference']:.2f}×" if ratio["inference"] else ""
            when = "measured in the same run" if ratio["same_run"] else "measured in different runs"
            lines += ["", f"ctrflow DeepFM vs {REFERENCE} DeepFM, training throughput: **{ratio['train']:.2f}×** "
                      f"(ctrflow with {ratio['setting']}; target ≥ 1.5×){inf}; {when}."]  # fmt: skip
        lines.append("")
    lines += [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def _records(
    job: dict[str, Any], runs: list[list[dict[str, Any]]], args: argparse.Namespace, run_id: str
) -> list[dict]:
    """One record per phase: the median samples/s over the repeats (all of them kept in `samples_per_s_runs`)."""
    out = []
    for phase in dict.fromkeys(r["phase"] for results in runs for r in results):
        got = [r for results in runs for r in results if r["phase"] == phase]
        speeds = [r["samples_per_s"] for r in got]
        rec = {"model": job["model"], "impl": job["impl"], "dataset": job["dataset"], "phase": phase,
               "samples_per_s": round(float(np.median(speeds)), 1), "peak_rss_mb": max(r["peak_rss_mb"] for r in got),
               "threads": args.threads, "batch_size": args.batch_size, "rows": got[0]["rows"],
               "seconds": round(float(np.median([r["seconds"] for r in got])), 2), "embedding_dim": args.embedding_dim,
               "mlp": args.mlp, "run": run_id}  # fmt: skip
        if len(speeds) > 1:
            rec["samples_per_s_runs"] = [round(v, 1) for v in speeds]
        if job["sparse"] is not None:
            rec["sparse"] = job["sparse"]
        out.append(rec)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--rows", type=int, default=100_000, help="Rows of the Criteo-shaped set.")
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
    p.add_argument("--no-reference", action="store_true", help=f"Skip {REFERENCE}.")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: one measurement, JSON job
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.one:
        job = json.loads(args.one)
        records = measure_reference(job) if job["impl"] == REFERENCE else measure_ctrflow(job)
        print("RESULT " + json.dumps(records), flush=True)
        return
    have_reference = importlib.util.find_spec("deepctr_torch") is not None and not args.no_reference
    notes = []
    if not have_reference and not args.no_reference:
        msg = (f"{REFERENCE} is not installed: its reference rows are skipped "
               "(install: .venv/bin/pip install --no-deps deepctr-torch==0.3.0)")  # fmt: skip
        print(msg, file=sys.stderr)
        notes.append(msg)
    run_id = time.strftime("%Y-%m-%dT%H:%M:%S")
    common = {
        "batch_size": args.batch_size,
        "threads": args.threads,
        "embedding_dim": args.embedding_dim,
        "mlp": args.mlp,
    }
    from benchmarks.harness import merge_records  # here, not at the top: the measuring subprocesses stay lean

    out_json = args.out / "train_speed.json"
    failures = 0
    with tempfile.TemporaryDirectory(prefix="train-speed-") as tmp:
        for dataset in args.datasets:
            print(f"[{dataset}] building the data...", file=sys.stderr, flush=True)
            path = prepare(dataset, args.rows, Path(tmp))
            from ctrflow.data.encoding import FeatureEncoder

            encoder = FeatureEncoder.load(path / "encoder.json")
            with np.load(path / "arrays.npz") as z:
                n = len(z["label"])
            has_large = any(f.large for f in encoder.spec.fields)
            has_sequence = any(f.kind.value == "sequence" for f in encoder.spec.fields)
            has_scenario = encoder.spec.scenario_field in encoder.vocabs
            jobs = []
            for model in args.models:
                if model == "din" and not has_sequence:
                    notes.append(f"din is not measured on {dataset}: it has no behaviour sequence field")
                    continue
                if (model in BACKBONES or model.startswith("gsvr-")) and not has_scenario:
                    notes.append(f"{model} is not measured on {dataset}: it has no scenario field")
                    continue
                sparse_options = [False, True] if has_large and model in ("lr", "deepfm", "dcnv2", "din") else [False]
                jobs += [{"model": model, "impl": "ctrflow", "sparse": s} for s in sparse_options]
            if have_reference and "deepfm" in args.models:
                jobs.insert(0, {"model": "deepfm", "impl": REFERENCE, "sparse": None})
            for job in jobs:
                limit = args.slow_rows if job["model"] == "dgenctr" else n
                job.update(common, dataset=dataset, data=str(path), pretrain_rows=args.pretrain_rows, rows_limit=limit)
            # repeats go round the jobs in turn, so a burst of load from elsewhere hits every implementation alike
            runs: dict[int, list[list[dict[str, Any]]]] = {i: [] for i in range(len(jobs))}
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
                    if rep == args.repeats - 1:
                        records = merge_records(_records(job, runs[i], args, run_id), out_json, KEY)
                        (args.out / "train_speed.md").write_text(render_markdown(records, notes))
            ratio = ratios(json.loads(out_json.read_text()), dataset) if out_json.exists() else None
            if ratio:
                print(f"{dataset}: ctrflow DeepFM / {REFERENCE} DeepFM training throughput = {ratio['train']:.2f}x",
                      file=sys.stderr)  # fmt: skip
    print(f"results: {out_json} and {args.out / 'train_speed.md'}")
    if failures:
        sys.exit(f"{failures} measurement(s) failed")


if __name__ == "__main__":
    main()
