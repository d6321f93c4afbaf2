"""DMAE and its multimodal baselines: MIEU buckets by hand, the decoder's target distribution, shapes, the
frozen item-modality table, and the artifact round trip (the Scorer serves the same scores after reload)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ctrflow.config import load_params
from ctrflow.data.encoding import FeatureEncoder
from ctrflow.data.splits import make_split
from ctrflow.data.tables import HIST_FIELD
from ctrflow.models import build_model, to_tensors
from ctrflow.models.blocks.modality import bucket_histogram
from ctrflow.training.trainer import TrainConfig, Trainer, seed_everything

torch.set_num_threads(1)
MODALITIES = ("text_emb", "image_emb")


@pytest.fixture(scope="module")
def setup(tiny_frame, tiny_dataset):
    frame = tiny_frame.copy()
    frame["split"] = make_split(frame, "temporal").to_numpy()
    parts = {s: frame[frame["split"] == s].reset_index(drop=True) for s in ("train", "valid", "test")}
    encoder = FeatureEncoder(tiny_dataset.spec).fit(parts["train"])
    tensors = {s: to_tensors(encoder.transform(p)) for s, p in parts.items()}
    return encoder, parts, tensors


def _batch(tensors, n=16, start=0):
    return {k: v[start : start + n] for k, v in tensors["train"].items()}


def test_mieu_buckets_match_a_hand_computation(setup):
    encoder, _, tensors = setup
    model = build_model("dmae", encoder, {"buckets": 5, "calibrate": False, "modalities": ["text_emb"]})
    dim = encoder.spec["text_emb"].dim
    e1, e2 = torch.zeros(dim), torch.zeros(dim)
    e1[0], e2[1] = 1.0, 1.0
    table = model.items.vectors(0)
    # behaviours: items 1, 2, 3, 4 with vectors e1, e2, -e1, and (item 4) no vector at all
    table[1], table[2], table[3] = e1, e2, -e1
    model.items.known[1:4, 0] = True
    batch = {k: v[:1].clone() for k, v in tensors["train"].items()}
    batch["text_emb"] = (3.0 * e1).unsqueeze(0)  # any length: cosine
    batch[HIST_FIELD] = torch.tensor([[1, 2, 3, 4] + [0] * (encoder.spec[HIST_FIELD].max_len - 4)])
    with torch.no_grad():
        model.scale_w.fill_(0.5)
        model.scale_b.fill_(0.25)
        enc = model.encode_interests(batch)
    # r = (cos + 1) / 2 = 1, 0.5, 0; r̂ = 0.5 r + 0.25 = 0.75, 0.5, 0.25; bucket ⌊r̂ · 4⌋ = 3, 2, 1
    np.testing.assert_allclose(enc["r"][0, :3, 0].numpy(), [1.0, 0.5, 0.0], atol=1e-6)
    assert enc["avail"][0, :4, 0].tolist() == [True, True, True, False]
    E = model.bucket_emb.detach()[0]
    expected = [0.75 * E[3], 0.5 * E[2], 0.25 * E[1], E[5]]  # item 4: the "missing" row (index N_B)
    for j, want in enumerate(expected):
        torch.testing.assert_close(enc["u"][0, j, 0], want)
    # the fixed histogram (the decoder's target) counts the calibrated r: buckets ⌊r · 4⌋ = 4, 2, 0
    hist, valid = bucket_histogram(enc["r"], enc["avail"], 5)
    np.testing.assert_allclose(hist[0, 0].numpy(), [1 / 3, 0, 1 / 3, 0, 1 / 3], atol=1e-6)
    assert valid.tolist() == [[True]]


def test_bucket_index_is_clamped():
    r = torch.tensor([[[-0.3], [1.7], [0.999]]])
    hist, _ = bucket_histogram(r, torch.ones_like(r, dtype=torch.bool), 4)
    np.testing.assert_allclose(hist[0, 0].numpy(), [1 / 3, 0, 1 / 3, 1 / 3], atol=1e-6)


def test_decoder_target_is_a_distribution_and_empty_history_is_handled(setup):
    encoder, _, tensors = setup
    model = build_model("dmae", encoder, {"buckets": 8})
    model.prepare(tensors["train"])
    batch = _batch(tensors, n=64)
    batch[HIST_FIELD][:3] = 0  # three users without any behaviour
    enc = model.encode_interests(batch)
    target, valid = model.distribution_target(enc)
    assert target.shape == (64, len(MODALITIES), 8)
    assert (target >= 0).all()
    sums = target.sum(-1)
    torch.testing.assert_close(sums[valid], torch.ones_like(sums[valid]))
    assert not valid[:3].any() and (target[:3] == 0).all()
    assert valid[3:].any()
    losses = model.loss(batch)
    assert set(losses) == {"loss", "bce", "dist"} and all(torch.isfinite(v) for v in losses.values())
    assert losses["dist"] > 0
    torch.testing.assert_close(losses["loss"], losses["bce"] + 0.1 * losses["dist"])
    losses["loss"].backward()
    assert model.decoder.net[0].weight.grad.abs().sum() > 0
    z = model.fuse(batch, enc)
    assert (z[:3] == 0).all() and torch.isfinite(z).all()


@pytest.mark.parametrize(
    "name, params",
    [
        ("dmae", {}),
        ("dmae", {"decoder": False}),
        ("dmae", {"gate": False, "self_attention": False, "pooling": "mean"}),
        ("dmae", {"time_encoding": "none", "id_attention": False, "target_modalities": False, "modalities": ["image_emb"]}),
        ("early_fusion", {}),
        ("simtier", {}),
    ],
)
def test_forward_shapes_for_100_candidates(setup, name, params):
    encoder, _, tensors = setup
    seed_everything(0)
    model = build_model(name, encoder, params)
    model.prepare(tensors["train"])
    model.eval()
    # one user's request: 100 candidates sharing one behaviour sequence
    batch = {k: v[:100].clone() for k, v in tensors["test"].items() if k != "label"}
    batch[HIST_FIELD] = batch[HIST_FIELD][:1].expand(100, -1).clone()
    with torch.no_grad():
        logits = model(batch)
    assert logits.shape == (100,) and torch.isfinite(logits).all()
    assert logits.std() > 0


def test_training_similarity_cache_equals_the_scoring_path(setup):
    encoder, _, tensors = setup
    model = build_model("dmae", encoder, {})
    model.prepare(tensors["train"])
    assert model.items.sim_0 is not None
    batch = _batch(tensors, n=256, start=100)
    r_cached, a_cached = model.items.similarities(batch, batch[HIST_FIELD], use_cache=True)
    r_direct, a_direct = model.items.similarities(batch, batch[HIST_FIELD], use_cache=False)
    torch.testing.assert_close(r_cached, r_direct, atol=1e-5, rtol=0)
    assert torch.equal(a_cached, a_direct) and a_direct.any()


def test_training_forward_fills_the_table_without_prepare(setup):
    encoder, _, tensors = setup
    model = build_model("dmae", encoder, {})
    assert not model.items.known.any() and not bool(model.items.calibrated)
    batch = _batch(tensors, n=128)
    model.eval()
    model(batch)
    assert not model.items.known.any()  # scoring never writes the table
    model.train()
    model.loss(batch)
    ids = batch["item_id"][batch["item_id"] > 0].unique()
    assert model.items.known[ids].all() and bool(model.items.calibrated)
    torch.testing.assert_close(model.items.vectors(0)[ids].norm(dim=1), torch.ones(len(ids)))


def test_params_yaml_sections_build():
    params = load_params()
    models = params["models"]
    for key in ("buckets", "dist_weight", "gate", "self_attention", "pooling", "decoder", "calibrate", "time_encoding"):
        assert key in models["dmae"], f"models.dmae.{key} is missing from params.yaml"
    assert "embeddings" in params and "modalities" in params["embeddings"]


def test_bad_options_and_missing_modalities_are_clear(setup):
    encoder, _, _ = setup
    with pytest.raises(ValueError, match="modalities \\['audio_emb'\\] are not item embedding fields"):
        build_model("dmae", encoder, {"modalities": ["audio_emb"]})
    with pytest.raises(ValueError, match="pooling must be one of"):
        build_model("dmae", encoder, {"pooling": "max"})
    d = encoder.to_dict()
    d["spec"]["fields"] = [f for f in d["spec"]["fields"] if f["kind"] != "embedding"]
    with pytest.raises(ValueError, match="no item embedding field"):
        build_model("simtier", FeatureEncoder.from_dict(d), {})


def test_artifact_round_trip_gives_identical_scores(setup, tmp_path):
    from ctrflow.training.artifact import Scorer, load_model_artifact, save_model_artifact

    encoder, parts, tensors = setup
    seed_everything(0)
    model = build_model("dmae", encoder, {"buckets": 10})
    model.prepare(tensors["train"])
    result = Trainer(model, TrainConfig(epochs=1, progress=False, threads=1)).fit(tensors["train"], tensors["valid"])
    assert math.isfinite(result.history[0]["train_dist"])
    save_model_artifact(tmp_path / "m", model, encoder, {"valid_auc": result.best_valid_auc}, {"model": "dmae"})
    before = Scorer(model, encoder).score(parts["test"])
    loaded = load_model_artifact(tmp_path / "m")
    assert loaded.name == "dmae" and loaded.model.items.known.any()
    after = Scorer.from_directory(tmp_path / "m").score(parts["test"])
    np.testing.assert_array_equal(before, after)
    assert after.shape == (len(parts["test"]),) and np.all((after > 0) & (after < 1))
