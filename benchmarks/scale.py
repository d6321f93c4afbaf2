"""Scale benchmark: each step of the standard pipeline on growing data, with wall time, rows/s and peak RSS.

    nice -n 10 python -m benchmarks.scale --datasets syn-100k syn-1m ml-100k ml-1m   # -> results/scale.{json,md,png}

Every step runs as its own `ctrflow` command (validate, features, train, register = register + gate) in a fresh process,
measured from outside by `benchmarks.measure` (wall seconds, peak RSS of the process tree, CPU seconds), so one
step's memory never hides in another's. Training runs one epoch (train.epochs=1) on every data set: the benchmark
is about cost per row, not quality. The gate (in the register command) trains its reference model (logistic
regression) on the same rows. Each record also keeps the steps' own closing lines (`ctrflow.meter`).

Synthetic data sets grow users and items with the rows (rows/50 users, rows/100 items) and draw per-user
activity from a log-normal with sigma `--activity-sigma` (default 2.0): a long tail in which some users hold
thousands of events, as real logs do, which is what made the old point-in-time join quadratic.

Results are merged into benchmarks/results/scale.json by (dataset, step) and re-rendered as scale.md and a
log-log plot scale.png (time and peak RSS against rows, one line per step). Data and work folders go to
--workdir (never into the repository: ML-1M's licence forbids redistributing anything derived from it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.measure import measure

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent
STEPS = ("validate", "features", "train", "register")  # register: the `ctrflow register` command, register + gate
SYNTHETIC = {"syn-100k": 100_000, "syn-1m": 1_000_000, "syn-3m": 3_000_000, "syn-10m": 10_000_000}
REAL = {"ml-100k": "movielens", "ml-1m": "movielens-1m"}


def dataset_overrides(name: str, activity_sigma: float) -> list[str]:
    if name in REAL:
        return [f"data.source={REAL[name]}"]
    rows = SYNTHETIC[name]
    return [
        "data.source=synthetic",
        f"data.synthetic.n_interactions={rows}",
        f"data.synthetic.n_users={max(rows // 50, 100)}",
        f"data.synthetic.n_items={max(rows // 100, 100)}",
        f"data.synthetic.activity_sigma={activity_sigma}",
    ]


def step_commands(work: Path) -> dict[str, list[str]]:
    ts, model = str(work / "training_set"), str(work / "model")
    return {
        "validate": ["validate", "--out", str(work / "dataset"), "--report", str(work / "report")],
        "features": ["features", "--dataset", str(work / "dataset"), "--repo", str(work / "repo"), "--out", ts],
        "train": ["train", "--training-set", ts, "--out", model],
        "register": ["register", "--model-dir", model, "--dataset", str(work / "dataset"), "--training-set", ts],
    }


def run_dataset(name: str, workdir: Path, activity_sigma: float, limit_s: float, limit_mb: float,
                steps: tuple[str, ...] = STEPS) -> list[dict[str, Any]]:
    """The steps (in pipeline order, each needing the ones before it) on one data set; stops at the first that
    fails. A step's earlier outputs in `workdir/<name>` are reused when the run starts after validate."""
    work = workdir / name
    if steps[0] == STEPS[0]:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    sets = [*dataset_overrides(name, activity_sigma), "train.epochs=1", f"registry.bentoml_home={work / 'bentoml'}"]
    base = [sys.executable, "-m", "ctrflow.cli", "--params", str(ROOT / "params.yaml")]
    for s in sets:
        base += ["--set", s]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "BENTOML_HOME": str(work / "bentoml")}
    records, rows = [], None
    known = work / "rows.json"  # the validated row count, for runs that start after validate
    if known.exists():
        rows = json.loads(known.read_text())["rows"]
    for step, args in step_commands(work).items():
        if step not in steps:
            continue
        log_path = work / f"{step}.log"
        load_before = os.getloadavg()[0]  # the machine is shared: the load goes next to the timing
        result = measure(base + args, limit_s=limit_s, limit_mb=limit_mb, log_path=log_path, env=env, cwd=str(ROOT))
        out = log_path.read_text(errors="replace")
        if step == "validate" and result["rc"] == 0:
            rows = json.loads(out[out.index("{"): out.rindex("}") + 1])["rows"]
            known.write_text(json.dumps({"rows": rows}))
        # the steps' own closing lines (ctrflow.meter): register prints register's and the gate's
        meter = [line.split(" INFO ", 1)[-1] for line in out.splitlines() if " rows, " in line and "peak RSS" in line and "so far" not in line]
        record = {
            "dataset": name,
            "rows": rows,
            "step": step,
            **{k: result[k] for k in ("seconds", "peak_rss_mb", "cpu_seconds", "rc", "killed")},
            "rows_per_s": round(rows / result["seconds"]) if rows and result["rc"] == 0 else None,
            "s_per_million_rows": round(result["seconds"] / rows * 1e6, 2) if rows and result["rc"] == 0 else None,
            "meter_lines": meter,
            "load_avg": [round(load_before, 1), round(os.getloadavg()[0], 1)],  # 1-minute load at start and end
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        metrics = work / "model" / "metrics.json"
        if step == "train" and result["rc"] == 0 and metrics.exists():  # what the rows bought: the model's quality
            record["test_auc"] = round(json.loads(metrics.read_text())["test"]["auc"], 4)
        records.append(record)
        print(json.dumps(record), flush=True)
        if result["rc"] != 0 or result["killed"]:
            break
    return records


def merge(records: list[dict[str, Any]], path: Path) -> list[dict[str, Any]]:
    old = json.loads(path.read_text()) if path.exists() else []
    keys = {(r["dataset"], r["step"]) for r in records}
    merged = [r for r in old if (r["dataset"], r["step"]) not in keys] + records
    order = list(SYNTHETIC) + list(REAL)
    merged.sort(key=lambda r: (order.index(r["dataset"]) if r["dataset"] in order else 99, STEPS.index(r["step"])))
    path.write_text(json.dumps(merged, indent=2) + "\n")
    return merged


def render(records: list[dict[str, Any]], md: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for step in STEPS:
        pts = sorted((r["rows"], r["seconds"], r.get("cpu_seconds") or float("nan"), r["peak_rss_mb"]) for r in records
                     if r["step"] == step and r["rc"] == 0 and r["rows"] and r["dataset"] in SYNTHETIC)
        for i, ax in enumerate(axes):
            if pts:
                ax.plot([p[0] for p in pts], [p[i + 1] for p in pts], marker="o", label=step)
    for ax, what in zip(axes, ("wall seconds (shared machine)", "CPU seconds", "peak RSS (MB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("interactions (synthetic)")
        ax.set_ylabel(what)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend()
    fig.suptitle("ctrflow scale benchmark: each step against rows (log-log)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)

    lines = [
        "# Scale benchmark",
        "",
        "Generated by `benchmarks/scale.py` (each step a separate `ctrflow` process, measured from outside: wall time,",
        "peak RSS of the process tree, CPU seconds; `train.epochs=1`). The machine is shared (2 cores, other jobs",
        "running), so wall times are noisy; CPU seconds show the work done. Failed or killed steps are listed as such.",
        "",
        f"![time and memory against rows]({png.name})",
        "",
        "`test AUC`: of the model the train step wrote (one epoch: a check that streamed rows are learned as well as",
        "rows in memory, not a quality figure).",
        "",
        "| dataset | rows | step | seconds | s / 1M rows | rows/s | peak RSS MB | CPU s | CPU s / 1M rows | status | load avg | test AUC |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---|---|---:|",
    ]
    for r in records:
        status = "ok" if r["rc"] == 0 and not r["killed"] else (f"killed ({r['killed']})" if r["killed"] else f"failed rc={r['rc']}")
        cpu = r.get("cpu_seconds")
        cpu_per_m = f"{cpu / r['rows'] * 1e6:.1f}" if cpu is not None and r["rows"] and status == "ok" else "-"
        rows = f"{r['rows']:,}" if r["rows"] else "?"
        lines.append(
            f"| {r['dataset']} | {rows} | {r['step']} | {r['seconds']:.1f} | {r['s_per_million_rows'] or '-'} | "
            f"{r['rows_per_s'] or '-'} | {r['peak_rss_mb']:,.0f} | {cpu if cpu is not None else '-'} | {cpu_per_m} | {status} | "
            f"{'-'.join(str(x) for x in r['load_avg']) if r.get('load_avg') else '-'} | {r.get('test_auc', '')} |"
        )
    notes = [f"- {r['dataset']} {r['step']}: {r['note']}" for r in records if r.get("note")]
    if notes:
        lines += ["", "Notes on single runs:", "", *notes]
    lines += target_lines(records)
    missing = [f"{d} {st}" for d in [*SYNTHETIC, *REAL] for st in STEPS
               if not any(r["dataset"] == d and r["step"] == st for r in records)]
    if missing:
        lines += ["", f"Not measured yet: {', '.join(missing)}."]
    md.write_text("\n".join(lines) + "\n")


TARGET_MB, TARGET_RATIO = 12_000, 1.5  # issue 9: every step at 10M rows <= 12 GB, s / 1M rows within 1.5x of 1M


def target_lines(records: list[dict[str, Any]]) -> list[str]:
    """Markdown: per step, syn-10m against syn-1m (peak RSS <= TARGET_MB, seconds per million rows within
    TARGET_RATIO of 1M's, wall and CPU), or why it cannot be said yet."""
    by = {(r["dataset"], r["step"]): r for r in records}
    lines = ["", f"## 10M against 1M (target: every step <= {TARGET_MB:,} MB peak RSS, s / 1M rows <= {TARGET_RATIO}x of 1M's)", "",
             "| step | 1M s / 1M rows | 10M s / 1M rows | ratio (wall) | ratio (CPU) | 10M peak RSS MB | meets |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for step in STEPS:
        small, big = by.get(("syn-1m", step)), by.get(("syn-10m", step))
        if not small or not big or small["rc"] != 0 or small.get("killed"):
            peak = f"{big['peak_rss_mb']:,.0f}" if big else "-"
            lines.append(f"| {step} | {(small or {}).get('s_per_million_rows') or '-'} | - | - | - | {peak} | not measured |")
            continue
        ok_run = big["rc"] == 0 and not big.get("killed")
        wall = big["seconds"] / big["rows"] / (small["seconds"] / small["rows"]) if ok_run else None
        cpu = (big["cpu_seconds"] / big["rows"]) / (small["cpu_seconds"] / small["rows"]) if ok_run and small.get("cpu_seconds") else None
        meets = ok_run and big["peak_rss_mb"] <= TARGET_MB and wall is not None and wall <= TARGET_RATIO
        verdict = "yes" if meets else ("no" if ok_run else f"no ({'killed: ' + big['killed'] if big.get('killed') else 'failed'})")
        lines.append(
            f"| {step} | {small['s_per_million_rows']} | {big['s_per_million_rows'] or '-'} | "
            f"{f'{wall:.2f}' if wall is not None else '-'} | {f'{cpu:.2f}' if cpu is not None else '-'} | "
            f"{big['peak_rss_mb']:,.0f} | {verdict} |"
        )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=["syn-100k", "syn-1m", "syn-3m", "ml-100k", "ml-1m"],
                    choices=[*SYNTHETIC, *REAL])
    ap.add_argument("--workdir", default="/tmp/ctrflow-scale")
    ap.add_argument("--activity-sigma", type=float, default=2.0)
    ap.add_argument("--limit-s", type=float, default=1800, help="kill a step after this many seconds")
    ap.add_argument("--limit-mb", type=float, default=12_000, help="kill a step above this peak RSS")
    ap.add_argument("--steps", nargs="+", default=list(STEPS), choices=STEPS,
                    help="a prefix or a later run of the pipeline's steps (validate features: the data steps only)")
    ap.add_argument("--render-only", action="store_true")
    args = ap.parse_args()
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "scale.json"
    records = json.loads(path.read_text()) if path.exists() else []
    if not args.render_only:
        for name in args.datasets:
            steps = tuple(s for s in STEPS if s in args.steps)
            records = merge(run_dataset(name, Path(args.workdir), args.activity_sigma, args.limit_s, args.limit_mb, steps), path)
            render(records, RESULTS / "scale.md", RESULTS / "scale.png")
    render(records, RESULTS / "scale.md", RESULTS / "scale.png")


if __name__ == "__main__":
    main()
