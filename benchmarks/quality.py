"""Quality benchmark: every model and ablation, on ML-100K (and synthetic), both splits, several seeds.

    python -m benchmarks.quality --suite baselines --splits temporal random --seeds 0 1 2
    python -m benchmarks.quality --suite scenario_wise_rec --dataset ml-1m-swr --splits random --epochs 30 --threads 2
    python -m benchmarks.quality --suite sparse_scenarios --dataset ml-cross --splits random --seeds 0 --epochs 30

Datasets: ml-100k, ml-1m (ML-1M with our full spec: behaviour sequence, genres, release year; DIN, DMAE and GSVR's user
posterior need it), ml-1m-swr (ML-1M with the Scenario-Wise Rec fields), ml-cross (ML-1M and ML-100K users as two
scenarios over one title vocabulary, the same fields; ctrflow.data.movielens_cross), synthetic.

Writes benchmarks/results/quality.json (one record per model, variant, dataset, protocol, split, seed; see
shared/design/BENCHMARKS.md) and quality.md (mean ± std tables). Records of other suites are kept.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

import torch

from benchmarks.harness import RESULTS, BenchContext, run_experiments
from benchmarks.suites import SUITES

PROTOCOLS = ("standard", "label-scarce", "label-scarce-1pct", "sparse-scenario", "published", "two-platform")
DATASETS = ("ml-100k", "ml-1m", "ml-1m-swr", "ml-cross", "synthetic")


def load_dataset(name: str):
    from ctrflow.data import load_source

    if name == "ml-100k":
        return load_source("movielens")
    if name == "ml-1m":  # our full spec (ctrflow.data.movielens_1m.movielens_1m_spec)
        return load_source("movielens-1m")
    if name == "ml-1m-swr":  # the Scenario-Wise Rec fields (suite scenario_wise_rec)
        from ctrflow.data.movielens_1m import load_movielens_1m_swr

        return load_movielens_1m_swr()
    if name == "ml-cross":  # the two-platform protocol (suite sparse_scenarios)
        return load_source("movielens-cross")
    if name == "synthetic":
        return load_source("synthetic", n_users=5000, n_items=2000, n_interactions=200_000)
    raise ValueError(f"unknown dataset '{name}': one of {DATASETS}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", nargs="+", default=["baselines"], choices=[*SUITES, "all"])
    p.add_argument("--dataset", default="ml-100k", choices=DATASETS)
    p.add_argument("--splits", nargs="+", default=["temporal", "random"], choices=["temporal", "random"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=20, help="Upper bound; early stopping on validation AUC decides.")
    p.add_argument("--patience", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", nargs="*", default=None, help="Run only experiments whose 'model/variant' contains one of these.")
    p.add_argument("--protocols", nargs="*", default=None, choices=PROTOCOLS, help="Run only experiments of these protocols.")
    p.add_argument("--resume", action="store_true", help="Skip runs already in <out>/quality.json.")
    p.add_argument("--out", type=Path, default=RESULTS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    suites = SUITES if "all" in args.suite else args.suite
    experiments = []  # built once: each runs against the split's context it is given
    for suite in suites:
        module = importlib.import_module(f"benchmarks.suites.{suite}")
        experiments += module.experiments(args)
    if args.only:
        experiments = [e for e in experiments if any(o in f"{e.model}/{e.variant}" for o in args.only)]
    if args.protocols:
        experiments = [e for e in experiments if e.protocol in args.protocols]
    if not experiments:
        raise SystemExit(f"quality: --only {args.only} and --protocols {args.protocols} select no experiment of {suites}")
    dataset = load_dataset(args.dataset)
    for split in args.splits:
        ctx = BenchContext(dataset, split, epochs=args.epochs, patience=args.patience, threads=args.threads)
        run_experiments(experiments, ctx, args.seeds, args.out, resume=args.resume)
    print(f"results: {args.out / 'quality.json'} and {args.out / 'quality.md'}")


if __name__ == "__main__":
    main()
