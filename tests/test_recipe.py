"""The pipeline's training steps through the one recipe: resume after a real kill (train, pretrain) or after an
interruption (finetune, train-gsvr) ends with the weights of an uninterrupted run; a checkpoint made with other
settings is refused; a one-class validation split logs "AUC undefined", never a logging traceback."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from ctrflow.config import REPO_ROOT, load_params, merge
from ctrflow.data.splits import make_split
from ctrflow.steps import finetune_step, gsvr_step, pretrain_step, train_step

torch.set_num_threads(1)
TINY = {
    "train.epochs": 3,
    "train.batch_size": 256,
    "train.threads": 1,
    "train.patience": 10,  # no early stop: every run trains all epochs
    "train.progress": False,
    "train.embedding_dim": 4,
    "models.dcnv2": {"cross_layers": 1, "mlp": [16], "dropout": 0.1},
    "models.dgenctr": {"d_model": 8, "heads": 1, "layers": 1, "ffn_mult": 1, "steps": 10},
    "models.dgenctr.pretrain": {"epochs": 3, "batch_size": 256, "patience": 10, "threads": 1},
    "models.gsvr": {"backbone": "mmoe", "latent_dim": 4, "kl_warmup_epochs": 2},
    "models.mmoe": {"experts": 2, "expert": [8], "tower": [4], "dropout": 0.1},
}


@pytest.fixture(scope="module")
def training_set(tiny_dataset, tiny_frame, tmp_path_factory) -> Path:
    """A training set folder as the features step writes it (frame.parquet with a split column + spec.json)."""
    out = tmp_path_factory.mktemp("training_set")
    frame = tiny_frame.copy()
    frame["split"] = make_split(tiny_dataset.interactions, "temporal").to_numpy()
    frame.to_parquet(out / "frame.parquet", index=False)
    tiny_dataset.spec.save(out / "spec.json")
    return out


def _params(**overrides: object) -> dict:
    return merge(load_params(REPO_ROOT / "params.yaml"), {**TINY, **overrides})


def _state(path: Path) -> dict[str, torch.Tensor]:
    obj = torch.load(path, map_location="cpu", weights_only=True)
    return obj.get("state_dict", obj)


def _assert_same_weights(a: Path, b: Path) -> None:
    sa, sb = _state(a), _state(b)
    assert sa.keys() == sb.keys()
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, f"tensors differ after resume: {different[:5]}"


# ---- a real `ctrflow` process, killed after epoch 1 ------------------------------------------------------
def _ctrflow(params_file: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "ctrflow.cli", "--params", str(params_file), *args]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT), "GX_ANALYTICS_ENABLED": "false"}


def _kill_after_first_checkpoint(cmd: list[str], checkpoint: Path, timeout: float = 600) -> int:
    """Start `cmd`, SIGKILL it as soon as `checkpoint` exists (written atomically after each epoch); return the
    epoch that checkpoint holds."""
    proc = subprocess.Popen(cmd, env=_env(), cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    try:
        while not checkpoint.exists():
            if proc.poll() is not None:
                raise AssertionError(f"{cmd} ended (rc {proc.returncode}) before its first checkpoint: "
                                     f"{proc.stderr.read().decode()[-2000:]}")  # fmt: skip
            if time.monotonic() > deadline:
                raise AssertionError(f"no checkpoint {checkpoint} after {timeout} s")
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    return int(torch.load(checkpoint, map_location="cpu", weights_only=True)["epoch"])


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=_env(), cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _full_then_killed_then_resumed(tmp_path: Path, command: tuple[str, ...], checkpoint: str, artifact: str) -> tuple:
    """`ctrflow <command> --out full` uninterrupted; `--out cut` SIGKILLed after its first checkpoint
    (cut/<checkpoint>), then run again to the end. Returns (epoch the kill left, stdout of the resumed run)."""
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(_params()))
    _run(_ctrflow(params_file, *command, "--out", str(tmp_path / "full")))
    cut = tmp_path / "cut"
    killed_at = _kill_after_first_checkpoint(_ctrflow(params_file, *command, "--out", str(cut)), cut / checkpoint)
    assert not (cut / artifact).exists()  # the killed run got no further than its checkpoints
    out = _run(_ctrflow(params_file, *command, "--out", str(cut))).stdout
    _assert_same_weights(tmp_path / "full" / artifact, cut / artifact)
    return killed_at, out


@pytest.mark.slow
def test_killed_train_resumes_to_the_weights_of_an_uninterrupted_run(training_set, tmp_path) -> None:
    command = ("train", "--training-set", str(training_set))
    killed_at, out = _full_then_killed_then_resumed(tmp_path, command, "checkpoints/last.pt", "model.pt")
    assert 1 <= killed_at < TINY["train.epochs"], "the kill came after the last epoch: nothing left to resume"
    meta = json.loads((tmp_path / "cut" / "model.json").read_text())
    assert meta["extra"]["resumed_from"] == killed_at
    assert len(meta["extra"]["history"]) == TINY["train.epochs"]
    full_metrics = json.loads((tmp_path / "full" / "metrics.json").read_text())
    assert json.loads(out)["valid_auc"] == full_metrics["valid"]["auc"]


@pytest.mark.slow
def test_killed_pretrain_resumes_to_the_weights_of_an_uninterrupted_run(training_set, tmp_path) -> None:
    command = ("pretrain", "--training-set", str(training_set))
    killed_at, _ = _full_then_killed_then_resumed(tmp_path, command, "last.pt", "pretrained.pt")
    assert 1 <= killed_at < TINY["models.dgenctr.pretrain"]["epochs"]
    full = json.loads((tmp_path / "full" / "pretrain.json").read_text())["history"]
    resumed = json.loads((tmp_path / "cut" / "pretrain.json").read_text())["history"]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in resumed] == [
        {k: v for k, v in r.items() if k != "seconds"} for r in full
    ]


# ---- every training step resumes (in process: a run stopped after epoch 1, then run again) --------------
def _stopped_then_resumed(step, full_dir: Path, cut_dir: Path, epochs_key: str, *args: object) -> None:
    """`step` uninterrupted into full_dir; into cut_dir first with 1 epoch (what an interruption after epoch 1
    leaves: its checkpoint), then again with all epochs, which must resume from that checkpoint."""
    step(_params(), *args, full_dir)
    step(_params(**{epochs_key: 1}), *args, cut_dir)
    step(_params(), *args, cut_dir)


def test_train_step_resumes_and_refuses_other_settings(training_set, tmp_path) -> None:
    _stopped_then_resumed(train_step, tmp_path / "full", tmp_path / "cut", "train.epochs", training_set)
    _assert_same_weights(tmp_path / "full" / "model.pt", tmp_path / "cut" / "model.pt")
    assert json.loads((tmp_path / "cut" / "model.json").read_text())["extra"]["resumed_from"] == 1
    with pytest.raises(ValueError, match=r"different settings.*'lr'.*delete"):
        train_step(_params(**{"train.lr": 0.01}), training_set, tmp_path / "cut")


@pytest.mark.slow
def test_pretrain_finetune_and_gsvr_steps_resume(training_set, tmp_path) -> None:
    pre = tmp_path / "pre"
    pretrain_step(_params(), training_set, pre)
    _stopped_then_resumed(finetune_step, tmp_path / "ft_full", tmp_path / "ft_cut", "train.epochs", training_set, pre)
    _assert_same_weights(tmp_path / "ft_full" / "model.pt", tmp_path / "ft_cut" / "model.pt")

    _stopped_then_resumed(gsvr_step, tmp_path / "gs_full", tmp_path / "gs_cut", "train.epochs", training_set)
    _assert_same_weights(tmp_path / "gs_full" / "model.pt", tmp_path / "gs_cut" / "model.pt")
    meta = json.loads((tmp_path / "gs_cut" / "model.json").read_text())
    assert meta["extra"]["resumed_from"] == 1 and meta["name"] == "gsvr"

    # pre-training itself: 1 epoch, then all of them from that checkpoint
    pretrain_step(_params(**{"models.dgenctr.pretrain.epochs": 1}), training_set, tmp_path / "pre_cut")
    pretrain_step(_params(), training_set, tmp_path / "pre_cut")
    _assert_same_weights(pre / "pretrained.pt", tmp_path / "pre_cut" / "pretrained.pt")
    with pytest.raises(ValueError, match=r"different settings.*'batch_size'"):
        pretrain_step(_params(**{"models.dgenctr.pretrain.batch_size": 128}), training_set, pre)


def test_train_and_train_gsvr_steps_score_gsvr_the_same_way(training_set, tmp_path) -> None:
    a = train_step(_params(**{"train.epochs": 1}), training_set, tmp_path / "a", "gsvr")
    b = gsvr_step(_params(**{"train.epochs": 1}), training_set, tmp_path / "b")
    assert a["model"] == b["model"] == "gsvr-mmoe"
    assert a["metrics"] == b["metrics"]  # gAUC included: one evaluate, grouped by the raw user ids
    _assert_same_weights(tmp_path / "a" / "model.pt", tmp_path / "b" / "model.pt")


# ---- a validation split with one class ---------------------------------------------------------------------
def test_one_class_validation_split_says_auc_is_undefined_without_a_logging_error(
    tiny_dataset, tiny_frame, tmp_path, caplog, capsys
) -> None:
    frame = tiny_frame.copy()
    frame["split"] = make_split(tiny_dataset.interactions, "temporal").to_numpy()
    frame.loc[frame["split"] != "train", "label"] = 0  # valid and test: negatives only
    ts = tmp_path / "ts"
    ts.mkdir()
    frame.to_parquet(ts / "frame.parquet", index=False)
    tiny_dataset.spec.save(ts / "spec.json")

    with caplog.at_level(logging.INFO):
        out = train_step(_params(**{"train.epochs": 2}), ts, tmp_path / "model")
    assert "Logging error" not in capsys.readouterr().err  # what a log call formatting None with %f prints
    text = caplog.text
    assert "AUC is undefined" in text and "negatives" in text
    assert "valid_auc=n/a" in text
    assert out["valid_auc"] is None and out["test_auc"] is None
    assert out["metrics"]["valid"]["logloss"] is not None
    history = json.loads((tmp_path / "model" / "model.json").read_text())["extra"]
    assert history["monitor"] == "valid_logloss"
    # every message formats: None/NaN metrics are rendered as n/a, never passed to a %f
    for record in caplog.records:
        record.getMessage()
