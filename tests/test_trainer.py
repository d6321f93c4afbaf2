"""The trainer: determinism, resume after an interruption, early stopping, checkpoints, optimisers."""

from __future__ import annotations

import math

import pytest
import torch

from ctrflow.data.encoding import FeatureEncoder
from ctrflow.data.splits import make_split
from ctrflow.models import build_model, to_tensors
from ctrflow.models.dcnv2 import DCNv2
from ctrflow.training import TrainConfig, Trainer, allocator, evaluate, seed_everything
from ctrflow.training.metrics import auc, predict
from ctrflow.training.trainer import CHECKPOINT_NAME

torch.set_num_threads(1)
SMALL = {"embedding_dim": 4, "cross_layers": 1, "mlp": [16], "dropout": 0.2}


@pytest.fixture(scope="module")
def data(tiny_dataset, tiny_frame):
    split = make_split(tiny_dataset.interactions, "temporal").to_numpy()
    enc = FeatureEncoder(tiny_dataset.spec).fit(tiny_frame[split == "train"])
    tensors = {s: to_tensors(enc.transform(tiny_frame[split == s])) for s in ("train", "valid", "test")}
    return enc, tensors


def _model(enc, seed: int = 0, **overrides):
    seed_everything(seed)
    return build_model("dcnv2", enc, {**SMALL, **overrides})


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"epochs": 3, "batch_size": 512, "threads": 1, "progress": False, "patience": 10, **kw})


def _history(result):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in result.history]


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_same_seed_gives_identical_runs(data) -> None:
    enc, t = data
    runs = []
    for _ in range(2):
        model = _model(enc)
        result = Trainer(model, _cfg()).fit(t["train"], t["valid"])
        runs.append((model, result, evaluate(model, t["test"], enc)))
    (m1, r1, e1), (m2, r2, e2) = runs
    assert _history(r1) == _history(r2)
    assert e1 == e2
    assert _same_weights(m1, m2)
    assert [r["epoch"] for r in r1.history] == [1, 2, 3]
    assert {"train_loss", "train_bce", "valid_auc", "valid_logloss", "seconds"} <= set(r1.history[0])


def test_resume_after_interruption_reaches_the_same_weights(data, tmp_path) -> None:
    enc, t = data
    full_model = _model(enc)
    full = Trainer(full_model, _cfg(epochs=4, checkpoint_dir=tmp_path / "full")).fit(t["train"], t["valid"])

    def interrupt(record: dict) -> None:
        if record["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Trainer(_model(enc), _cfg(epochs=4, checkpoint_dir=tmp_path / "cut"), on_epoch_end=interrupt).fit(
            t["train"], t["valid"]
        )
    # a new process: a fresh model with other initial weights; everything comes from the checkpoint
    resumed_model = _model(enc, seed=123)
    resumed = Trainer(resumed_model, _cfg(epochs=4, checkpoint_dir=tmp_path / "cut")).fit(
        t["train"], t["valid"], resume=True
    )
    assert resumed.resumed_from == 2
    assert _history(resumed) == _history(full)
    assert resumed.best_epoch == full.best_epoch
    assert _same_weights(resumed_model, full_model)


def test_resume_without_a_checkpoint_starts_fresh_and_a_finished_run_is_not_retrained(data, tmp_path) -> None:
    enc, t = data
    cfg = _cfg(epochs=2, checkpoint_dir=tmp_path)
    first = Trainer(_model(enc), cfg).fit(t["train"], t["valid"], resume=True)
    assert first.resumed_from == 0 and first.epochs == 2
    again_model = _model(enc, seed=5)
    again = Trainer(again_model, cfg).fit(t["train"], t["valid"], resume=True)
    assert again.resumed_from == 2 and _history(again) == _history(first)


def test_resume_with_other_settings_is_refused(data, tmp_path) -> None:
    enc, t = data
    Trainer(_model(enc), _cfg(epochs=1, checkpoint_dir=tmp_path)).fit(t["train"], t["valid"])
    with pytest.raises(ValueError, match="different settings.*'lr'"):
        Trainer(_model(enc), _cfg(epochs=2, lr=0.1, checkpoint_dir=tmp_path)).fit(t["train"], t["valid"], resume=True)


def test_checkpoint_is_written_each_epoch(data, tmp_path) -> None:
    enc, t = data
    seen = []

    def check(record: dict) -> None:
        ckpt = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
        seen.append(ckpt["epoch"])
        assert {"model", "optimizers", "best_state", "history", "rng", "best_epoch", "bad_epochs"} <= set(ckpt)

    Trainer(_model(enc), _cfg(epochs=2, checkpoint_dir=tmp_path), on_epoch_end=check).fit(t["train"], t["valid"])
    assert seen == [1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_NAME]  # no temp files left behind


def test_early_stopping_triggers_and_keeps_the_best_epoch(data) -> None:
    enc, t = data
    # lr = 0: validation AUC never improves after epoch 1, so patience 2 stops the run after epoch 3
    result = Trainer(_model(enc), _cfg(epochs=10, lr=0.0, patience=2)).fit(t["train"], t["valid"])
    assert result.stopped_early and result.epochs == 3 and result.best_epoch == 1
    assert result.monitor == "valid_auc"


def test_best_state_is_restored_into_the_model(data) -> None:
    enc, t = data
    model = _model(enc)
    result = Trainer(model, _cfg(epochs=4, lr=0.02)).fit(t["train"], t["valid"])
    best = result.history[result.best_epoch - 1]["valid_auc"]
    assert result.best_valid_auc == best == max(r["valid_auc"] for r in result.history)
    assert auc(t["valid"]["label"].numpy(), predict(model, t["valid"])) == pytest.approx(best, abs=1e-12)


def test_sparse_tables_use_sparse_adam(data) -> None:
    enc, t = data
    model = _model(enc, sparse=True)
    trainer = Trainer(model, _cfg(epochs=1))
    kinds = sorted(type(o).__name__ for o in trainer.optimizers)
    assert kinds == ["Adam", "SparseAdam"]
    sparse_params = {id(p) for p in trainer.optimizers[1].param_groups[0]["params"]}
    assert sparse_params == {id(model.embedding.table("user_id").weight), id(model.embedding.table("item_id").weight)}
    before = model.embedding.table("item_id").weight.detach().clone()
    result = trainer.fit(t["train"], t["valid"])
    assert math.isfinite(result.history[0]["train_loss"])
    assert not torch.equal(before, model.embedding.table("item_id").weight)


def test_extra_loss_terms_are_optimised_and_logged(data) -> None:
    enc, t = data

    class WithPenalty(DCNv2):
        def loss(self, batch):
            out = super().loss(batch)
            penalty = 1e-3 * self.head.weight.pow(2).sum()
            return {**out, "loss": out["loss"] + penalty, "penalty": penalty}

    seed_everything(0)
    result = Trainer(WithPenalty(enc, **SMALL), _cfg(epochs=1)).fit(t["train"], t["valid"])
    record = result.history[0]
    assert record["train_penalty"] > 0
    assert record["train_loss"] == pytest.approx(record["train_bce"] + record["train_penalty"], rel=1e-5)


def test_one_class_validation_watches_logloss(data) -> None:
    enc, t = data
    valid = {k: v[t["valid"]["label"] == 1] for k, v in t["valid"].items()}
    result = Trainer(_model(enc), _cfg(epochs=1)).fit(t["train"], valid)
    assert result.monitor == "valid_logloss"
    assert result.history[0]["valid_auc"] is None and result.history[0]["valid_logloss"] > 0


def test_bad_input_names_the_field(data) -> None:
    enc, t = data
    train = dict(t["train"])
    train["item_id"] = train["item_id"][:10]
    with pytest.raises(ValueError, match=r"train: fields \['item_id'\]"):
        Trainer(_model(enc), _cfg()).fit(train)
    with pytest.raises(KeyError, match="no 'label'"):
        Trainer(_model(enc), _cfg()).fit({k: v for k, v in t["train"].items() if k != "label"})
    with pytest.raises(ValueError, match="optimizer must be one of"):
        TrainConfig(optimizer="sgd")


def test_config_from_params_yaml() -> None:
    import yaml

    with open("params.yaml") as fh:
        params = yaml.safe_load(fh)
    cfg = TrainConfig.from_params(params["train"], progress=False)
    assert cfg.epochs == params["train"]["epochs"] and cfg.patience == params["train"]["patience"]
    assert cfg.progress is False


@pytest.mark.slow
def test_dcnv2_on_movielens_temporal_lands_in_the_sanity_band() -> None:
    """ML-100K temporal split, params.yaml's DCNv2 with few epochs: METHODS.md's band is ~0.70-0.72."""
    import yaml

    from ctrflow.data.frames import point_in_time_frame
    from ctrflow.data.movielens import load_movielens

    with open("params.yaml") as fh:
        params = yaml.safe_load(fh)
    dataset = load_movielens(max_len=params["data"]["max_len"])
    frame = point_in_time_frame(dataset)
    split = make_split(dataset.interactions, "temporal").to_numpy()
    enc = FeatureEncoder(dataset.spec).fit(frame[split == "train"])
    tensors = {s: to_tensors(enc.transform(frame[split == s])) for s in ("train", "valid", "test")}
    seed_everything(params["train"]["seed"])
    model = build_model("dcnv2", enc, {"embedding_dim": params["train"]["embedding_dim"], **params["models"]["dcnv2"]})
    cfg = TrainConfig.from_params(params["train"], epochs=3, progress=False)
    Trainer(model, cfg).fit(tensors["train"], tensors["valid"])
    out = evaluate(model, tensors["test"], enc, user_ids=frame.loc[split == "test", "user_id"].to_numpy())
    assert out["auc"] > 0.68
    assert set(out["scenario_auc"]) == {"<25", "25-34", ">=35"}


# ---- the monitored metric, its direction, gradient clipping -------------------------------------------------
def test_monitor_logloss_minimises_and_keeps_the_lowest_epoch(data) -> None:
    enc, t = data
    model = _model(enc)
    result = Trainer(model, _cfg(epochs=4, lr=0.02, monitor="valid_logloss", patience=1)).fit(t["train"], t["valid"])
    assert result.monitor == "valid_logloss"
    losses = [r["valid_logloss"] for r in result.history]
    assert result.best_score == min(losses) == losses[result.best_epoch - 1]
    if result.stopped_early:  # patience 1: stopped right after the first epoch that did not improve
        assert losses[-1] >= min(losses[:-1])
    from ctrflow.training.metrics import logloss

    assert logloss(t["valid"]["label"].numpy(), predict(model, t["valid"])) == pytest.approx(min(losses), abs=1e-9)


def test_monitor_none_keeps_the_last_epoch_and_never_stops(data) -> None:
    enc, t = data
    result = Trainer(_model(enc), _cfg(epochs=3, lr=0.0, monitor="none", patience=1)).fit(t["train"], t["valid"])
    assert result.best_epoch == 3 and not result.stopped_early and result.monitor == "none"


def test_monitor_settings_are_checked(data) -> None:
    enc, t = data
    with pytest.raises(ValueError, match="improves towards min.*monitor_mode: min"):
        TrainConfig(monitor="valid_logloss", monitor_mode="max")
    with pytest.raises(ValueError, match="monitor_mode must be one of"):
        TrainConfig(monitor="valid_ndcg")
    with pytest.raises(ValueError, match=r"monitor 'valid_loss' is not a validation metric of the ctr objective"):
        Trainer(_model(enc), _cfg(monitor="valid_loss")).fit(t["train"], t["valid"])
    assert TrainConfig(monitor="valid_auc").monitor_mode == "max"


def test_grad_clip_bounds_the_dense_gradient_norm(data) -> None:
    enc, t = data
    model = _model(enc)
    trainer = Trainer(model, _cfg(epochs=1, grad_clip=1e-3))
    batch = {k: v[:256] for k, v in t["train"].items()}
    trainer.train_step(batch, epoch=1, step=0)
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]))
    assert norm <= 1e-3 * (1 + 1e-4)
    with pytest.raises(ValueError, match="grad_clip must be >= 0"):
        TrainConfig(grad_clip=-1.0)


# ---- the allocator setting (ctrflow.training.allocator) ------------------------------------------------------------
_FAULTS_SCRIPT = r"""
import json, resource, sys, torch
from ctrflow.training import allocator

def minflt():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20

def faults(mib, reps=5):
    # minor page faults of filling a fresh block of `mib` MiB right after one of the same size was freed (a training
    # step's pattern); the least over reps, so one unlucky heap layout does not decide
    n = mib * 2**18
    best = None
    for _ in range(reps):
        x = torch.ones(n)
        del x
        before = minflt()
        y = torch.ones(n)
        f = minflt() - before
        del y
        best = f if best is None else min(best, f)
    return best

if sys.argv[1] == "after":  # a process whose heap holds no large free block: only the exit values decide
    with allocator.keep_freed_memory():
        pass
    out = {"after_24": faults(24), "after_64": faults(64)}
else:
    out = {"available": allocator.available(), "default_64": faults(64)}
    with allocator.keep_freed_memory() as kept:
        with allocator.keep_freed_memory() as inner:  # nested: one setting
            out["inner"] = inner
        out["kept"] = kept
        out["keep_64"] = faults(64)
        out["keep_128"] = faults(128)
    with allocator.keep_freed_memory(enabled=False) as kept:
        out["disabled"] = kept
    with allocator.keep_freed_memory():
        base, small = rss_mib(), []
        for mib in (64, 96, 128, 160):  # blocks of other sizes with small ones between: holes stay in the heap
            t = torch.ones(mib * 2**18)
            small.append(torch.ones(16))
            del t
        out["grown_mib"] = rss_mib() - base
        allocator.release()
        out["after_release_mib"] = rss_mib() - base
print(json.dumps(out))
"""


def _huge_pages_possible() -> bool:
    import os
    from pathlib import Path

    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return "[always]" in (thp.read_text() if thp.exists() else "") or bool(os.environ.get("THP_MEM_ALLOC_ENABLE"))


@pytest.mark.skipif(not allocator.available(), reason="glibc's malloc options only (and not overridden)")
@pytest.mark.skipif(_huge_pages_possible(), reason="huge pages change the page-fault counts this measures")
def test_keep_freed_memory_reuses_pages_then_leaves_glibc_as_a_warm_process_has_it() -> None:
    """Measured in a fresh process (the heap of a test worker is in whatever state earlier tests left it)."""
    import json
    import subprocess
    import sys

    def measure(mode: str) -> dict:
        run = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT, mode], capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr[-2000:]
        return json.loads(run.stdout.strip().splitlines()[-1])

    out, after = measure("main"), measure("after")
    pages = 64 * 2**20 // 4096  # 16,384 pages of 4 KiB in 64 MiB
    assert out["available"] and out["kept"] and out["inner"] and out["disabled"] is False
    assert out["default_64"] > pages // 2  # glibc: a block above 32 MiB is mapped afresh every time
    assert out["keep_64"] < pages // 20 and out["keep_128"] < 2 * pages // 20  # kept: the freed pages are reused
    # holes of blocks of other sizes: kept until release() hands them back
    assert out["grown_mib"] > 100 and out["after_release_mib"] < out["grown_mib"] / 4
    # after the block, blocks up to 32 MiB are reused as in a process that has freed a large one (glibc's dynamic
    # threshold, which mallopt turns off for good, ends there); bigger ones are mapped afresh again
    assert after["after_24"] < pages * 3 // 8 // 20
    assert after["after_64"] > pages // 2


def test_allocator_leaves_a_user_choice_alone() -> None:
    env = {"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}
    reasons = [allocator.why_not(e) for e in (
        env, {"MALLOC_MMAP_THRESHOLD_": "1000000"}, {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"}
    )]  # fmt: skip
    assert all(reasons), reasons
    if allocator.available():
        assert allocator.why_not({"GLIBC_TUNABLES": "glibc.pthread.rseq=0"}) is None


def test_keep_freed_memory_trains_the_same_weights(data) -> None:
    """Only where memory comes from changes: the same seed gives bit-identical weights and history both ways."""
    enc, t = data
    runs = []
    for keep in (True, False):
        model = _model(enc)
        result = Trainer(model, _cfg(keep_freed_memory=keep)).fit(t["train"], t["valid"])
        runs.append((model, result))
    (m1, r1), (m2, r2) = runs
    assert _history(r1) == _history(r2)
    assert _same_weights(m1, m2)
    assert TrainConfig().keep_freed_memory is True  # params.yaml's default (train.keep_freed_memory)
