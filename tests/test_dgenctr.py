"""DGenCTR: the masking schedule, the corruption rules, transfer of pre-trained tensors, learning on a tiny set,
generation, and the fine-tuned model in the standard artifact/serving path."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from ctrflow.config import DGenCTRPretrain
from ctrflow.data.encoding import FeatureEncoder
from ctrflow.data.spec import FieldKind
from ctrflow.models import build_model, known_models, to_tensors
from ctrflow.models.dgenctr import DENSE, LARGE, SMALL, DGenCTR, mask_rate, parameter_group, sample_mask
from ctrflow.training import TrainConfig, Trainer, seed_everything
from ctrflow.training.artifact import Scorer, load_model_artifact, save_model_artifact
from ctrflow.training.metrics import auc, predict
from ctrflow.training.pretrain import generate, generation_report, load_pretrained_for_finetune, pretrain

torch.set_num_threads(1)
TINY = {"d_model": 16, "layers": 1, "heads": 2, "ffn_mult": 2, "dropout": 0.0, "steps": 20}


@pytest.fixture(scope="module")
def encoder(tiny_dataset, tiny_frame) -> FeatureEncoder:
    return FeatureEncoder(tiny_dataset.spec).fit(tiny_frame.iloc[:4000])


@pytest.fixture(scope="module")
def train(encoder, tiny_frame) -> dict[str, torch.Tensor]:
    return to_tensors(encoder.transform(tiny_frame.iloc[:1500]))


@pytest.fixture(scope="module")
def valid(encoder, tiny_frame) -> dict[str, torch.Tensor]:
    return to_tensors(encoder.transform(tiny_frame.iloc[4000:4500]))


def tiny_params(**kw: object) -> dict:
    return {**TINY, "pretrain": {"epochs": 2, "batch_size": 128, "lr": 3e-3, "seed": 0, "threads": 1}, **kw}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, encoder, train, valid):
    out = tmp_path_factory.mktemp("pretrain")
    return pretrain(tiny_params(), train, encoder, out, valid, progress=False)


# ---- the forward process -----------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_mask_rate_rises_from_0_to_1(schedule) -> None:
    t = torch.arange(0, 101)
    rate = mask_rate(t, 100, schedule)
    assert float(rate[0]) == 0.0 and math.isclose(float(rate[-1]), 1.0, abs_tol=1e-6)
    assert (rate[1:] > rate[:-1]).all()
    expected = t / 100 if schedule == "linear" else 1 - torch.cos(math.pi / 2 * t / 100)
    assert torch.allclose(rate, expected.float(), atol=1e-6)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("t", [5, 30, 60, 95])
def test_sample_mask_masks_the_expected_share(schedule, t) -> None:
    """Share of masked positions = λ(t) plus the at-least-one rule: E = λ + (1 − λ)^P / P (per position)."""
    n, p, steps = 40_000, 14, 100
    gen = torch.Generator().manual_seed(t)
    rate = mask_rate(torch.full((n,), t), steps, schedule)
    mask = sample_mask(torch.ones(n, p, dtype=torch.bool), rate, gen)
    lam = float(rate[0])
    expected = lam + (1 - lam) ** p / p
    sd = math.sqrt(max(lam * (1 - lam), 1e-4) / (n * p))
    assert abs(float(mask.float().mean()) - expected) < 5 * sd + 1e-4
    assert mask.any(dim=1).all(), "every sample has at least one masked position"


def test_sample_mask_only_masks_eligible_positions() -> None:
    eligible = torch.ones(1000, 5, dtype=torch.bool)
    eligible[:, 2] = False
    eligible[:10] = False  # rows with nothing eligible stay unmasked
    mask = sample_mask(eligible, torch.full((1000,), 0.5), torch.Generator().manual_seed(0))
    assert not mask[:, 2].any() and not mask[:10].any() and mask[10:].any(1).all()


def test_corrupt_label_rules(encoder, train) -> None:
    model = DGenCTR(encoder, **TINY)
    batch = {k: v[:512] for k, v in train.items()}
    known = torch.arange(512) % 2 == 0
    t = torch.full((512,), 20)  # λ = 1: every eligible position is masked and a target
    _, (mask, target) = model.corrupt({**batch, "label_known": known}, t)
    assert mask.all(), "at t = T everything is masked"
    assert torch.equal(target[:, model.label_pos], known), "an unknown label is never a target"
    no_label = DGenCTR(encoder, **TINY, label_in_diffusion=False)
    _, (mask, target) = no_label.corrupt(batch, torch.full((512,), 1))
    assert mask[:, no_label.label_pos].all() and not target[:, no_label.label_pos].any()


def test_unknown_ids_enter_as_mask(encoder, train) -> None:
    """A user or item the encoder never saw (id 0) is read as [MASK], as in pre-training, and is never a target."""
    seed_everything(0)
    model = DGenCTR(encoder, **TINY).eval()
    batch = {k: v[:64].clone() for k, v in train.items()}
    batch["user_id"][:32] = 0
    pos = model.token_names.index("user_id")
    mask = model.finetune_mask(64)
    mask[:32, pos] = True
    t = torch.full((64,), model.finetune_t)
    expected = model.label_logit(model.encode(model.values(batch), mask, t))
    assert torch.allclose(model(batch), expected, atol=1e-6)
    _, (mask, target) = model.corrupt(batch, torch.full((64,), 20))
    assert mask[:32, pos].all() and not target[:32, pos].any() and target[32:, pos].all()
    plain = DGenCTR(encoder, **TINY, unknown_as_mask=False).eval()
    plain.load_state_dict(model.state_dict())
    assert not torch.allclose(plain(batch)[:32], model(batch)[:32])


def test_tokens_and_loss_kinds(encoder, train) -> None:
    model = DGenCTR(encoder, **TINY)
    kinds = dict(zip(model.token_names, model.kinds))
    assert model.token_names[-1] == "label" and model.n_tokens == len(encoder.spec.fields) + 1
    assert kinds["user_id"] == LARGE and kinds["item_id"] == LARGE  # FieldSpec.large
    assert kinds["scenario"] == SMALL and kinds["price"] == SMALL  # bucketised numeric: a token
    assert kinds["hist_item_ids"] == DENSE and kinds["text_emb"] == DENSE
    by_threshold = DGenCTR(encoder, **TINY, respect_spec_large=False, large_vocab_threshold=15)
    assert dict(zip(by_threshold.token_names, by_threshold.kinds))["category"] == LARGE  # 21 ids > 15
    losses = model.diffusion_loss({k: v[:256] for k, v in train.items()})
    assert torch.isfinite(losses["loss"]) and float(losses["masked"]) >= 256


def test_sampled_softmax_merges_duplicate_ids(encoder, train) -> None:
    """In-batch negatives are the batch's distinct ids: a batch of one item id has nothing to confuse it with."""
    model = DGenCTR(encoder, **TINY)
    batch = {k: v[:64].clone() for k, v in train.items()}
    batch["item_id"][:] = batch["item_id"][0]
    t = torch.full((64,), 20)
    _, (mask, _) = model.corrupt(batch, t)
    values = model.values(batch)
    g = model.all_heads(model.encode(values, mask, t))
    pos = model.token_names.index("item_id")
    loss = model._position_loss(batch, values[:, pos], g[:, pos], pos, LARGE, mask[:, pos])
    assert torch.allclose(loss, torch.zeros_like(loss), atol=1e-6)


# ---- pre-training, transfer ------------------------------------------------------------------------------
def test_pretraining_loss_falls(checkpoint) -> None:
    history = json.loads((checkpoint.parent / "pretrain.json").read_text())["history"]
    assert len(history) == 2
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert "valid_loss" in history[0] and "valid_zero_shot_auc" in history[0]
    assert (checkpoint.parent / "last.pt").exists() and (checkpoint.parent / "encoder.json").exists()
    # select: best_valid keeps the epoch with the lowest validation denoising loss
    best = int(np.argmin([r["valid_loss"] for r in history])) + 1
    assert torch.load(checkpoint, weights_only=True)["best_epoch"] == best


def test_pretraining_resumes_to_the_same_weights(tmp_path, encoder, train, valid, checkpoint) -> None:
    one = tiny_params(pretrain={**tiny_params()["pretrain"], "epochs": 1})
    pretrain(one, train, encoder, tmp_path, valid, progress=False)
    resumed = pretrain(tiny_params(), train, encoder, tmp_path, valid, progress=False, resume=True)
    a = torch.load(resumed, weights_only=True)["state_dict"]
    b = torch.load(checkpoint, weights_only=True)["state_dict"]
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in b)


def test_label_scarce_pretraining_runs_through_the_trainer_with_adamw_and_clipping(tmp_path, encoder, train) -> None:
    """label_known=False rows never make the label a target; the optimiser is AdamW with the configured decay."""
    scarce = {**train, "label_known": torch.zeros(len(train["label"]), dtype=torch.bool)}
    path = pretrain(tiny_params(), scarce, encoder, tmp_path / "none", progress=False)
    history = torch.load(path, weights_only=True)["history"]
    assert all("train_field_label" not in r for r in history)  # no known label: never a denoising target
    known = {**train, "label_known": torch.ones(len(train["label"]), dtype=torch.bool)}
    history = torch.load(pretrain(tiny_params(), known, encoder, tmp_path / "all", progress=False), weights_only=True)
    assert all(r["train_field_label"] > 0 for r in history["history"])
    last = torch.load(tmp_path / "all" / "last.pt", weights_only=True)
    group = last["optimizers"][0]["param_groups"][0]
    # AdamW with the typed default decay (tiny_params sets none)
    assert group["decoupled_weight_decay"] is True and group["weight_decay"] == DGenCTRPretrain().weight_decay
    assert last["fingerprint"]["grad_clip"] == 1.0 and last["fingerprint"]["objective"] == "denoising"
    assert last["fingerprint"]["train_labels_known"] == len(train["label"])


def test_transfer_all_loads_every_tensor(encoder, checkpoint) -> None:
    pre = torch.load(checkpoint, weights_only=True)["state_dict"]
    seed_everything(1)
    model = load_pretrained_for_finetune(encoder, tiny_params(), checkpoint, "all")
    state = model.state_dict()
    assert sorted(state) == sorted(pre) == model.transferred
    for name, value in pre.items():
        assert torch.equal(state[name], value), name


@pytest.mark.parametrize("transfer", ["embeddings", "scorer"])
def test_partial_transfer_loads_only_its_group(transfer, encoder, checkpoint) -> None:
    pre = torch.load(checkpoint, weights_only=True)["state_dict"]
    seed_everything(1)
    fresh = DGenCTR(encoder, **TINY).state_dict()
    seed_everything(1)
    model = load_pretrained_for_finetune(encoder, tiny_params(), checkpoint, transfer)
    state = model.state_dict()
    expected = sorted(k for k in pre if parameter_group(k) == transfer)
    assert model.transferred == expected and expected
    groups = {parameter_group(k) for k in pre}
    assert groups == {"embeddings", "scorer"}
    for name in state:
        if name in expected:
            assert torch.equal(state[name], pre[name]), name
        else:
            assert torch.equal(state[name], fresh[name]), f"{name} should keep its fresh initialisation"
    assert any(k.startswith("embedding.tables") for k in pre if parameter_group(k) == "embeddings")
    assert any(k.startswith("denoiser") for k in pre if parameter_group(k) == "scorer")


def test_transfer_refuses_other_architecture_or_vocabulary(encoder, tiny_dataset, tiny_frame, checkpoint) -> None:
    with pytest.raises(ValueError, match="architecture"):
        load_pretrained_for_finetune(encoder, tiny_params(d_model=32), checkpoint)
    other = FeatureEncoder(tiny_dataset.spec).fit(tiny_frame.iloc[:300])
    with pytest.raises(ValueError, match="vocabulary sizes differ"):
        load_pretrained_for_finetune(other, tiny_params(), checkpoint)
    with pytest.raises(ValueError, match="transfer must be"):
        load_pretrained_for_finetune(encoder, tiny_params(), checkpoint, "heads")


def test_finetune_fits_a_tiny_set_and_serves_through_the_artifact(
    encoder, train, tiny_frame, checkpoint, tmp_path
) -> None:
    seed_everything(0)
    model = load_pretrained_for_finetune(encoder, tiny_params(), checkpoint, "all")
    small = {k: v[:600] for k, v in train.items()}
    cfg = TrainConfig(epochs=12, batch_size=64, lr=5e-3, threads=1, progress=False)
    Trainer(model, cfg).fit(small)
    assert auc(small["label"].numpy(), predict(model, small)) > 0.8
    assert "dgenctr" in known_models()
    save_model_artifact(tmp_path / "m", model, encoder, {}, {"model": "dgenctr"})
    loaded = load_model_artifact(tmp_path / "m")
    frame = tiny_frame.iloc[4000:4200].drop(columns=["label"])
    direct = predict(model, to_tensors(encoder.transform(frame, with_label=False)))
    np.testing.assert_allclose(Scorer(loaded.model, loaded.encoder).score(frame), direct, rtol=1e-5, atol=1e-6)


def test_build_model_from_params_section(encoder) -> None:
    from ctrflow.config import load_params

    section = {"embedding_dim": 16, **load_params()["models"]["dgenctr"]}
    model = build_model("dgenctr", encoder, section)
    assert isinstance(model, DGenCTR) and model.d_model == section["d_model"]


# ---- generation ------------------------------------------------------------------------------------------
def test_generation_returns_valid_token_ids(encoder, train, valid, checkpoint) -> None:
    model = load_pretrained_for_finetune(encoder, tiny_params(), checkpoint, "all")
    bank = {k: v[:300] for k, v in train.items()}
    rows = generate(model, 150, bank=bank, steps=10, seed=3, batch_size=64)
    for f, kind in zip(model.fields, model.kinds):
        x = rows[f.name]
        assert len(x) == 150, f.name
        if kind == DENSE:
            # drawn among the bank's real values
            bank_rows = {tuple(r.tolist()) for r in bank[f.name]}
            assert all(tuple(r.tolist()) in bank_rows for r in x), f.name
        else:
            assert x.dtype == torch.long and int(x.min()) >= 0 and int(x.max()) < encoder.vocab_size(f.name), f.name
            if kind == LARGE or f.kind is FieldKind.CATEGORICAL:
                assert int(x.min()) >= 1, f"{f.name}: the unknown id is never generated"
    assert set(rows["label"].unique().tolist()) <= {0, 1}
    report = generation_report(model, encoder, train, valid, n=200, steps=5)
    assert {r["field"] for r in report["fields"]} >= {"scenario", "price", "label"}
    assert all(0.0 <= r["tv_generated"] <= 1.0 for r in report["fields"])
    assert "label_rate_by_scenario" in report
