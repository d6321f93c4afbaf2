"""Data-parallel training: `ctrflow train --nproc 2` (torchrun, DDP on gloo, two CPU processes) against one process.

- the sharding and the loss weights, by hand;
- without dropout, two processes take the steps of one process (the same global batches, the gradient of the
  global batch's mean loss): the same losses and validation scores every epoch, to float rounding; with dropout
  (each rank draws its own masks) they reach the one-process validation AUC within 0.002; sparse embedding tables
  (SparseAdam, sparse gradients all-reduced) take the same steps too;
- a checkpoint written by a two-process run resumes in one process and ends with the weights of an uninterrupted
  one-process run (to float rounding).
The runs are real `ctrflow` processes on the tiny synthetic training set (4,800 train rows, a small DCNv2).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from ctrflow.cli import _without_nproc
from ctrflow.config import REPO_ROOT, load_params, merge
from ctrflow.training import distributed
from ctrflow.training.distributed import World, loss_weight, shard
from ctrflow.training.trainer import TrainConfig, Trainer

TINY = {
    "train.epochs": 3,
    "train.batch_size": 255,  # odd: the two ranks get 128 and 127 rows of a batch, weighted 256/255 and 254/255
    "train.threads": 1,
    "train.patience": 10,
    "train.progress": False,
    "train.embedding_dim": 4,
    "models.dcnv2": {"cross_layers": 1, "mlp": [16], "dropout": 0.0},
}

SPARSE = {"train.model": "lr", "models.lr": {"sparse": True}, "train.epochs": 1}


# ---- by hand ------------------------------------------------------------------------------------------------
def test_a_global_batch_is_split_into_disjoint_rows_whose_weights_average_to_one() -> None:
    rows = torch.arange(7)
    assert shard(rows, World(0, 2)).tolist() == [0, 2, 4, 6]
    assert shard(rows, World(1, 2)).tolist() == [1, 3, 5]
    assert shard(rows, World(0, 1)).tolist() == list(range(7))
    # DDP averages the two gradients: (4/7 * 2 * g0 + 3/7 * 2 * g1) / 2 = (4 g0 + 3 g1) / 7, the 7-row mean
    assert loss_weight(4, 7, World(0, 2)) == pytest.approx(8 / 7)
    assert loss_weight(3, 7, World(1, 2)) == pytest.approx(6 / 7)
    assert loss_weight(7, 7, World()) == 1.0


def test_a_rank_left_without_rows_steps_on_one_row_at_weight_zero() -> None:
    trainer = Trainer(nn.Linear(2, 1), TrainConfig(progress=False))
    trainer.world = World(1, 2)
    idx, weight = trainer._local_rows(torch.tensor([5]))  # a last batch of one row: rank 1 has none of it
    assert idx.tolist() == [5] and weight == 0.0
    trainer.world = World(0, 2)
    idx, weight = trainer._local_rows(torch.tensor([5]))
    assert idx.tolist() == [5] and weight == 2.0


def test_the_relaunched_command_is_the_same_command_under_torchrun() -> None:
    args = ["--params", "p.yaml", "train", "--nproc", "2", "--training-set", "ts", "--nproc=2", "--out", "m"]
    assert _without_nproc(args) == ["--params", "p.yaml", "train", "--training-set", "ts", "--out", "m"]
    cmd = distributed.torchrun_command(2, ["train", "--out", "m"])
    assert cmd[1:] == ["-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node", "2",
                       "-m", "ctrflow.cli", "train", "--out", "m"]  # fmt: skip
    with pytest.raises(ValueError, match="train.backend"):
        distributed.init_from_env("mpi")


# ---- real runs: one process and two ---------------------------------------------------------------------------
def _train(tmp: Path, training_set: Path, out: str, nproc: int = 1, **overrides: object) -> dict:
    """`ctrflow train` with TINY + overrides; returns the printed result and the artifact's metrics."""
    params_file = tmp / f"params-{out}.yaml"
    params_file.write_text(yaml.safe_dump(merge(load_params(REPO_ROOT / "params.yaml"), {**TINY, **overrides})))
    cmd = [sys.executable, "-m", "ctrflow.cli", "--params", str(params_file), "train",
           "--training-set", str(training_set), "--out", str(tmp / out), "--nproc", str(nproc)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout)  # one JSON object: rank 1 printed nothing
    model_json = json.loads((tmp / out / "model.json").read_text())["extra"]
    return {**printed, "dir": tmp / out, "model_json": model_json}


def _weights(run: dict) -> dict[str, torch.Tensor]:
    obj = torch.load(run["dir"] / "model.pt", map_location="cpu", weights_only=True)
    return obj.get("state_dict", obj)


def _max_weight_difference(a: dict, b: dict) -> float:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    return max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa)


@pytest.fixture(scope="module")
def runs(tiny_training_set, tmp_path_factory) -> dict[str, dict]:
    tmp = tmp_path_factory.mktemp("ddp")
    return {
        "one": _train(tmp, tiny_training_set, "one"),
        # two processes stopped after 2 epochs, then the same command in one process for all 3
        "two": _train(tmp, tiny_training_set, "cut", nproc=2, **{"train.epochs": 2}),
        "resumed": _train(tmp, tiny_training_set, "cut"),
        "one_dropout": _train(tmp, tiny_training_set, "one_dropout", **{"models.dcnv2.dropout": 0.1}),
        "two_dropout": _train(tmp, tiny_training_set, "two_dropout", nproc=2, **{"models.dcnv2.dropout": 0.1}),
        # sparse embedding tables: SparseAdam on sparse gradients that DDP all-reduces
        **{f"sparse_{n}": _train(tmp, tiny_training_set, f"sparse_{n}", nproc=n, **SPARSE) for n in (1, 2)},
    }


def _history(run: dict) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in run["model_json"]["history"]]


@pytest.mark.slow  # two processes of training, or ML-100K through Feast: minutes on 2 cores
def test_two_processes_without_dropout_take_the_steps_of_one_process(runs) -> None:
    # same global batches, same mean-loss gradient: only the order of float sums differs
    one, two = _history(runs["one"])[:2], _history(runs["two"])
    assert [r["epoch"] for r in two] == [1, 2]
    for a, b in zip(one, two, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], abs=1e-5)  # all-reduced over both ranks' rows
        assert b["valid_auc"] == pytest.approx(a["valid_auc"], abs=1e-5)
        assert b["valid_logloss"] == pytest.approx(a["valid_logloss"], abs=1e-5)


@pytest.mark.slow  # two processes of training, or ML-100K through Feast: minutes on 2 cores
def test_two_processes_reach_the_validation_auc_of_one_process(runs) -> None:
    one, two = runs["one_dropout"]["valid_auc"], runs["two_dropout"]["valid_auc"]
    assert one > 0.55 and two > 0.55  # both learnt something (0.5: chance)
    assert abs(two - one) <= 0.002, (one, two)


@pytest.mark.slow  # two processes of training, or ML-100K through Feast: minutes on 2 cores
def test_a_checkpoint_of_a_two_process_run_resumes_in_one_process(runs) -> None:
    resumed, uninterrupted = runs["resumed"], runs["one"]
    assert resumed["model_json"]["resumed_from"] == 2
    assert [r["epoch"] for r in _history(resumed)] == [1, 2, 3]
    # 2 epochs on two processes + 1 on one = 3 on one, to float rounding
    assert _max_weight_difference(resumed, uninterrupted) < 1e-5
    assert resumed["valid_auc"] == pytest.approx(uninterrupted["valid_auc"], abs=1e-5)


@pytest.mark.slow  # two processes of training, or ML-100K through Feast: minutes on 2 cores
def test_sparse_embedding_tables_take_the_same_steps_on_two_processes(runs) -> None:
    assert _max_weight_difference(runs["sparse_1"], runs["sparse_2"]) < 1e-5
    assert runs["sparse_2"]["valid_auc"] == pytest.approx(runs["sparse_1"]["valid_auc"], abs=1e-5)
