"""The baselines LR, DeepFM and DIN: shapes, the FM identity, DIN's padding mask, registry and artifact round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ctrflow.data.encoding import FeatureEncoder
from ctrflow.models import build_model, known_models, to_tensors
from ctrflow.models.deepfm import fm_interaction
from ctrflow.models.din import DIN
from ctrflow.training import TrainConfig, Trainer, seed_everything
from ctrflow.training.artifact import Scorer, load_model_artifact, save_model_artifact
from ctrflow.training.metrics import auc, predict

torch.set_num_threads(1)
BASELINES = ("lr", "deepfm", "din")


@pytest.fixture(scope="module")
def encoder(tiny_dataset, tiny_frame) -> FeatureEncoder:
    return FeatureEncoder(tiny_dataset.spec).fit(tiny_frame.iloc[:4000])


@pytest.fixture(scope="module")
def batch(encoder, tiny_frame) -> dict[str, torch.Tensor]:
    return to_tensors(encoder.transform(tiny_frame.iloc[3900:4100]))


@pytest.mark.parametrize("name", BASELINES)
def test_registered_forward_shape_and_loss(name, encoder, batch) -> None:
    assert name in known_models()
    seed_everything(0)
    model = build_model(name, encoder, {"embedding_dim": 8})
    logits = model(batch)
    assert logits.shape == (200,) and torch.isfinite(logits).all()
    losses = model.loss(batch)
    losses["loss"].backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads, f"{name}: no parameter got a gradient"


def test_unknown_parameter_is_refused(encoder) -> None:
    with pytest.raises(TypeError, match="unknown parameters"):
        build_model("deepfm", encoder, {"cross_layers": 3})


def test_fm_interaction_is_sum_of_pairwise_dot_products() -> None:
    v = torch.randn(5, 4, 3)
    explicit = sum((v[:, i] * v[:, j]).sum(-1) for i in range(4) for j in range(i + 1, 4))
    assert torch.allclose(fm_interaction(v), explicit, atol=1e-5)


@pytest.mark.parametrize("softmax", [False, True])
def test_din_attention_gives_padding_zero_weight(softmax, encoder, batch) -> None:
    seed_everything(0)
    model = DIN(encoder, embedding_dim=8, attention_softmax=softmax)
    w = model.attention_weights(batch)
    ids = batch["hist_item_ids"]
    assert w.shape == ids.shape
    assert torch.equal(w[ids == 0], torch.zeros(int((ids == 0).sum())))
    has = (ids != 0).any(1)
    assert has.any() and (~has).any(), "the fixture should hold users with and without history"
    if softmax:
        assert torch.allclose(w[has].sum(1), torch.ones(int(has.sum())), atol=1e-5)
    # appending padding to a history changes nothing: the mask, not the sequence length, decides
    row = int(torch.nonzero(has)[0])
    one = {k: v[row : row + 1] for k, v in batch.items()}
    shifted = dict(one)
    seq = one["hist_item_ids"][0]
    shifted["hist_item_ids"] = torch.cat([seq[seq != 0], torch.zeros(int((seq == 0).sum()), dtype=seq.dtype)])[None]
    model.eval()
    assert torch.allclose(model(one), model(shifted), atol=1e-6)


def test_din_needs_a_sequence_field(encoder) -> None:
    with pytest.raises(ValueError, match="not a sequence field"):
        DIN(encoder, sequence_field="item_id")


@pytest.mark.parametrize("name", BASELINES)
def test_baseline_learns_and_round_trips_through_the_artifact(name, encoder, tiny_frame, tmp_path) -> None:
    train = to_tensors(encoder.transform(tiny_frame.iloc[:2000]))
    seed_everything(0)
    model = build_model(name, encoder, {"embedding_dim": 8})
    Trainer(model, TrainConfig(epochs=4, batch_size=256, lr=0.01, threads=1, progress=False)).fit(train)
    assert auc(train["label"].numpy(), predict(model, train)) > 0.6  # it fits its own training rows
    save_model_artifact(tmp_path / name, model, encoder, {"auc": 0.0}, {"model": name})
    loaded = load_model_artifact(tmp_path / name)
    assert loaded.name == name
    frame = tiny_frame.iloc[4000:4300]
    direct = predict(model, to_tensors(encoder.transform(frame)))
    np.testing.assert_allclose(Scorer(loaded.model, loaded.encoder).score(frame), direct, rtol=1e-5, atol=1e-6)
