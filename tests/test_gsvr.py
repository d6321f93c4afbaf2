"""GSVR: the KL terms, the global prior, determinism at inference, unknown scenarios, training through the standard
trainer and the pipeline's recipe (`train_model(..., "gsvr")`, the train-gsvr step)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ctrflow.data.encoding import FeatureEncoder
from ctrflow.models import build_model, to_tensors
from ctrflow.models.blocks.embedding import load_embedding_init
from ctrflow.models.blocks.scenario import UnseenScenarioError
from ctrflow.models.blocks.variational import gaussian_kl, mc_mixture_kl, mixture_moments
from ctrflow.models.gsvr import GSVR
from ctrflow.training import TrainConfig, Trainer, seed_everything
from ctrflow.training.artifact import Scorer, load_model_artifact, save_model_artifact
from ctrflow.training.recipe import SplitData, model_params, train_model


def gsvr_model_params(params: dict, backbone: str | None = None) -> dict:
    return model_params(params, "gsvr", backbone)


def train_gsvr(params, train, valid, encoder, out_dir, init_embeddings=None, test=None) -> dict:
    """The train-gsvr step's recipe on tensors (the step itself reads a training set folder)."""
    tensors = {"train": train, "valid": valid, **({"test": test} if test is not None else {})}
    return train_model(params, SplitData(encoder, tensors), out_dir, "gsvr", init_embeddings).summary()

torch.set_num_threads(1)
SMALL_BACKBONES = {
    "sharedbottom": {"bottom": [32, 16], "tower": [8]},
    "mmoe": {"experts": 2, "expert": [16], "tower": [8]},
    "ple": {"levels": 2, "shared_experts": 1, "specific_experts": 1, "expert": [16], "tower": [8]},
    "star": {"hidden": [32, 16], "aux": [8]},
}


@pytest.fixture(scope="module")
def encoder(tiny_dataset, tiny_frame) -> FeatureEncoder:
    return FeatureEncoder(tiny_dataset.spec).fit(tiny_frame.iloc[:4000])


@pytest.fixture(scope="module")
def tensors(encoder, tiny_frame) -> dict[str, dict[str, torch.Tensor]]:
    parts = {"train": tiny_frame.iloc[:4000], "valid": tiny_frame.iloc[4000:5000], "test": tiny_frame.iloc[5000:]}
    return {k: to_tensors(encoder.transform(v)) for k, v in parts.items()}


@pytest.fixture(scope="module")
def batch(tensors) -> dict[str, torch.Tensor]:
    return {k: v[:256] for k, v in tensors["valid"].items()}


def _gsvr(encoder: FeatureEncoder, backbone: str = "star", seed: int = 0, **params: object) -> GSVR:
    seed_everything(seed)
    return build_model(
        "gsvr",
        encoder,
        {
            "backbone": backbone,
            "backbone_params": SMALL_BACKBONES[backbone],
            "embedding_dim": 4,
            "latent_dim": 4,
            **params,
        },
    )


def _js(p: torch.Tensor, q: torch.Tensor) -> float:
    p, q = p.detach(), q.detach()
    m = 0.5 * (p + q)
    kl = lambda a, b: float((a * (a / b).log()).sum())  # noqa: E731
    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


# ---- KL ---------------------------------------------------------------------------------------------------------
def test_closed_form_kl_is_zero_at_the_prior_and_positive_elsewhere() -> None:
    torch.manual_seed(0)
    centres = torch.randn(1, 6)
    mean, var = mixture_moments(torch.ones(3, 1), centres, std=0.7)  # one component: N(c, σ₀²)
    assert torch.allclose(mean, centres.expand(3, 6)) and torch.allclose(var, torch.full((3, 6), 0.49))
    kl = gaussian_kl(mean, torch.log(var), mean, var)
    assert torch.equal(kl, torch.zeros(3))
    assert (gaussian_kl(mean + 0.1, torch.log(var), mean, var) > 0).all()


def test_mc_kl_is_zero_for_a_single_component_equal_to_the_posterior() -> None:
    torch.manual_seed(0)
    centres, std = torch.randn(1, 6), 0.7
    mu, logvar = centres.expand(5, 6), torch.full((5, 6), 2 * math.log(std))
    z = mu + torch.randn(64, 5, 6) * std
    kl = mc_mixture_kl(z, mu, logvar, torch.zeros(5, 1), centres, std)
    assert torch.allclose(kl, torch.zeros(5), atol=1e-4)


def test_mc_kl_agrees_with_closed_form_for_one_component() -> None:
    torch.manual_seed(0)
    centres, std = torch.randn(1, 4), 0.8
    mu, logvar = torch.randn(2, 4), torch.randn(2, 4) * 0.3
    z = mu + torch.randn(20000, 2, 4) * (0.5 * logvar).exp()
    mc = mc_mixture_kl(z, mu, logvar, torch.zeros(2, 1), centres, std)
    exact = gaussian_kl(mu, logvar, centres.expand(2, 4), torch.full((2, 4), std**2))
    assert torch.allclose(mc, exact, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("kl", ["mc", "moment"])
def test_model_kl_is_zero_when_the_posterior_is_the_prior(encoder, kl) -> None:
    model = _gsvr(encoder, prototypes=1, kl=kl, mc_samples=16)
    c = model.user.prototypes.detach()
    mu = c.expand(8, -1)
    logvar = torch.full_like(mu, 2 * math.log(model.prior_std))
    out = model.kl_divergence("user", mu, logvar, torch.zeros(8, 1))
    assert torch.allclose(out, torch.zeros(8), atol=1e-4)
    std_model = _gsvr(encoder, prior="standard")
    assert torch.equal(std_model.kl_divergence("item", torch.zeros(3, 4), torch.zeros(3, 4), None), torch.zeros(3))


# ---- the global prior -----------------------------------------------------------------------------------------
def test_prior_probabilities_sum_to_one(encoder, batch) -> None:
    pi = _gsvr(encoder, prototypes=5).prior_probs(batch)
    for side in ("user", "item"):
        assert pi[side].shape == (256, 5) and (pi[side] >= 0).all()
        assert torch.allclose(pi[side].sum(-1), torch.ones(256), atol=1e-6)


def test_users_with_similar_behaviour_get_closer_priors(encoder, batch) -> None:
    """Three users: B's behaviour differs from A's by one item, C's shares none; π_B is closer to π_A than π_C."""
    n_items = len(encoder.vocabs["item_id"])
    for seed in range(5):
        model = _gsvr(encoder, seed=seed, prototypes=8)
        with torch.no_grad():
            model.embedding.table("item_id").weight.normal_()  # trained-like item embeddings, not the ~0 init
        hist = torch.zeros(3, batch["hist_item_ids"].shape[1], dtype=torch.long)
        hist[0, :8] = torch.arange(1, 9)
        hist[1, :8] = torch.tensor([1, 2, 3, 4, 5, 6, 7, 9])
        hist[2, :8] = torch.arange(n_items - 8, n_items)
        rows = {k: v[:3].clone() for k, v in batch.items()}
        rows["hist_item_ids"] = hist
        pi = model.prior_probs(rows)["user"]
        assert _js(pi[0], pi[1]) < _js(pi[0], pi[2]), f"seed {seed}"


def test_no_behaviour_means_a_uniform_prior(encoder, batch) -> None:
    model = _gsvr(encoder, prototypes=4)
    rows = {k: v[:2].clone() for k, v in batch.items()}
    rows["hist_item_ids"] = torch.zeros_like(rows["hist_item_ids"])
    assert torch.allclose(model.prior_probs(rows)["user"], torch.full((2, 4), 0.25))


# ---- model behaviour ------------------------------------------------------------------------------------------
def test_inference_is_deterministic_and_training_samples(encoder, batch) -> None:
    model = _gsvr(encoder).eval()
    assert torch.equal(model(batch), model(batch))
    model.train()
    torch.manual_seed(1)
    a = model(batch)
    torch.manual_seed(2)
    assert not torch.equal(a, model(batch))


@pytest.mark.parametrize("prior,kl", [("global", "mc"), ("global", "moment"), ("standard", "mc")])
def test_loss_reports_named_parts_and_warms_up_beta(encoder, batch, prior, kl) -> None:
    model = _gsvr(encoder, prior=prior, kl=kl, beta=0.3, kl_warmup_epochs=3).train()
    model.set_epoch(1)
    out = model.loss(batch)
    assert set(out) == {"loss", "bce", "kl_user", "kl_item", "beta"}
    assert math.isclose(float(out["beta"]), 0.1, rel_tol=1e-6)
    assert torch.allclose(out["loss"], out["bce"] + out["beta"] * (out["kl_user"] + out["kl_item"]))
    if prior == "standard" or kl == "moment":  # closed forms are never negative (an MC estimate may be)
        assert float(out["kl_user"].detach()) >= 0 and float(out["kl_item"].detach()) >= 0
    model.set_epoch(5)
    assert model.current_beta == pytest.approx(0.3)


@pytest.mark.parametrize("backbone", list(SMALL_BACKBONES))
def test_each_backbone_trains_with_gsvr(encoder, tensors, backbone) -> None:
    model = _gsvr(encoder, backbone=backbone)
    train = {k: v[:1024] for k, v in tensors["train"].items()}
    result = Trainer(model, TrainConfig(epochs=2, batch_size=256, progress=False, threads=1)).fit(
        train, tensors["valid"]
    )
    first = result.history[0]
    assert {"train_bce", "train_kl_user", "train_kl_item", "train_beta"} <= set(first)
    assert np.isfinite(first["train_loss"]) and first["valid_auc"] is not None
    assert model.backbone.extra_dim == 2 * model.latent_dim


def test_unknown_scenario_falls_back_to_shared_parameters(encoder, batch, tiny_frame, tmp_path) -> None:
    model = _gsvr(encoder, backbone="mmoe").eval()
    unknown = {**batch, "scenario": torch.zeros_like(batch["scenario"])}
    model(unknown).sum().backward()
    for slot in range(1, model.backbone.num_slots):
        for param, index in model.backbone.slot_parameters(slot):
            grad = param.grad if index is None or param.grad is None else param.grad[index]
            assert grad is None or torch.count_nonzero(grad) == 0
    save_model_artifact(tmp_path, model, encoder, {}, {"model": "gsvr"})
    rows = tiny_frame.iloc[5000:5050].copy()
    rows["scenario"] = "never-seen"
    scores = Scorer.from_directory(tmp_path).score(rows)
    assert np.isfinite(scores).all()
    assert np.allclose(scores, Scorer(model, encoder).score(rows))


def test_bad_options_are_clear_errors(encoder) -> None:
    with pytest.raises(ValueError, match="backbone must be one of"):
        build_model("gsvr", encoder, {"backbone": "dcnv2"})
    with pytest.raises(ValueError, match="prior must be one of"):
        build_model("gsvr", encoder, {"prior": "flat"})


# ---- the pipeline function ------------------------------------------------------------------------------------
def _params(**gsvr: object) -> dict:
    return {
        "train": {"epochs": 1, "batch_size": 512, "seed": 0, "threads": 1, "progress": False, "embedding_dim": 4},
        "models": {"mmoe": SMALL_BACKBONES["mmoe"], "gsvr": {"backbone": "mmoe", "latent_dim": 4, **gsvr}},
    }


def test_gsvr_model_params_nests_the_backbone_section() -> None:
    p = gsvr_model_params(_params(backbone_params={"tower": [4]}))
    assert p["backbone"] == "mmoe" and p["backbone_params"] == {**SMALL_BACKBONES["mmoe"], "tower": [4]}
    assert gsvr_model_params(_params(), backbone="star")["backbone"] == "star"


def test_generic_train_step_builds_gsvr_like_its_own_step() -> None:
    # `ctrflow train --model gsvr` and `ctrflow train-gsvr` both run train_model(..., "gsvr"): one params function
    assert model_params(_params(), "gsvr") == {
        "embedding_dim": 4,
        **_params()["models"]["gsvr"],
        "backbone": "mmoe",
        "backbone_params": SMALL_BACKBONES["mmoe"],
    }


def test_train_gsvr_saves_a_servable_artifact_and_reads_pretrained_tables(encoder, tensors, tmp_path) -> None:
    """Initialised from a real (1-epoch, tiny) DGenCTR diffusion pre-training checkpoint of the same width."""
    from ctrflow.training.pretrain import pretrain

    dgen = {"d_model": 4, "heads": 1, "layers": 1, "ffn_mult": 1, "pretrain": {"epochs": 1, "batch_size": 512}}
    params = _params()
    ckpt = pretrain(
        {**params, "models": {**params["models"], "dgenctr": dgen}},
        tensors["train"],
        encoder,
        tmp_path / "pre",
        resume=False,
        progress=False,
    )
    out = train_gsvr(params, tensors["train"], tensors["valid"], encoder, tmp_path / "gsvr", ckpt, tensors["test"])
    assert out["model"] == "gsvr-mmoe" and out["valid_auc"] is not None and out["test_auc"] is not None
    assert set(out["metrics"]["test"]["scenario_auc"]) == set(encoder.vocabs["scenario"])
    loaded = load_model_artifact(tmp_path / "gsvr")
    copied = loaded.extra["init_embeddings"]["copied"]
    assert "backbone.embedding.tables.user_id" in copied and "backbone.embedding.tables.item_id" in copied
    assert loaded.model.params["backbone"] == "mmoe"
    # the copy itself: a fresh model holds the pre-trained rows exactly (id 0 stays zero)
    fresh = build_model("gsvr", encoder, gsvr_model_params(params))
    load_embedding_init(fresh, ckpt)
    want = torch.load(ckpt, weights_only=True)["state_dict"]["embedding.tables.item_id.weight"]
    got = fresh.embedding.table("item_id").weight
    assert torch.equal(got[1:], want[1:]) and torch.equal(got[0], torch.zeros(4))


def test_train_gsvr_takes_the_width_of_pretrained_tables_wider_than_its_own(encoder, tensors, tmp_path) -> None:
    """The gsvr-pretrained DAG with defaults failed: DGenCTR pre-trains 32-wide tokens (models.dgenctr.d_model) and
    GSVR was built 16 wide (train.embedding_dim), so every table was skipped. The pre-trained width now sets GSVR's
    (here 8 against the configured 4), recorded in the artifact, and the tables are copied."""
    from ctrflow.training.pretrain import pretrain

    dgen = {"d_model": 8, "heads": 1, "layers": 1, "ffn_mult": 1, "pretrain": {"epochs": 1, "batch_size": 512}}
    params = _params()
    assert model_params(params, "gsvr")["embedding_dim"] == 4
    ckpt = pretrain({**params, "models": {**params["models"], "dgenctr": dgen}}, tensors["train"], encoder, tmp_path / "pre",
                    resume=False, progress=False)  # fmt: skip
    train_gsvr(params, tensors["train"], tensors["valid"], encoder, tmp_path / "gsvr", ckpt)
    loaded = load_model_artifact(tmp_path / "gsvr")
    assert loaded.extra["init_embeddings"]["embedding_dim"] == {"configured": 4, "used": 8}
    assert "backbone.embedding.tables.item_id" in loaded.extra["init_embeddings"]["copied"]
    assert loaded.model.embedding.table("item_id").weight.shape[1] == 8


def test_train_gsvr_rejects_an_undeclared_scenario(tiny_dataset, tiny_frame, tmp_path) -> None:
    frame = tiny_frame.iloc[:1500].copy()
    frame.loc[frame.index[:21], "scenario"] = "mars"
    enc = FeatureEncoder(tiny_dataset.spec).fit(frame)
    t = to_tensors(enc.transform(frame))
    with pytest.raises(UnseenScenarioError, match=r"'mars' \(21 rows\)"):
        train_gsvr(_params(), t, t, enc, tmp_path)
