"""Shared layers, the DCNv2 baseline, the model registry and the model artifact."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ctrflow.data.encoding import FeatureEncoder
from ctrflow.models import MODELS, build_model, known_models, to_tensors
from ctrflow.models.blocks import MLP, FieldEmbedding
from ctrflow.models.dcnv2 import DCNv2
from ctrflow.training import TrainConfig, Trainer, seed_everything
from ctrflow.training.artifact import Scorer, load_model_artifact, save_model_artifact
from ctrflow.training.metrics import auc, predict

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def encoder(tiny_dataset, tiny_frame) -> FeatureEncoder:
    return FeatureEncoder(tiny_dataset.spec).fit(tiny_frame.iloc[:4000])


@pytest.fixture(scope="module")
def batch(encoder, tiny_frame) -> dict[str, torch.Tensor]:
    return to_tensors(encoder.transform(tiny_frame.iloc[3900:4100]))  # 100 rows seen in fit, 100 not


def test_field_embedding_shape_order_and_shared_table(encoder, batch) -> None:
    emb = FieldEmbedding(encoder, 4)
    out = emb(batch)
    assert out.shape == (200, len(encoder.spec.fields), 4)
    assert emb.field_names == encoder.spec.names
    assert emb.output_dim == 4 * len(encoder.spec.fields)
    # the behaviour sequence is looked up in item_id's table: one table, one embedding space
    assert emb.table("hist_item_ids") is emb.table("item_id")
    assert "hist_item_ids" not in emb.tables


def test_padding_and_unknown_ids_embed_to_zero(encoder, batch) -> None:
    emb = FieldEmbedding(encoder, 4)
    zeros = {k: torch.zeros_like(v) for k, v in batch.items()}
    out = emb(zeros)
    for i, f in enumerate(emb.field_specs):
        if f.kind.value != "embedding":
            assert torch.equal(out[:, i], torch.zeros(200, 4)), f.name
    # id 0 stays zero after training steps: padding_idx gets no gradient
    opt = torch.optim.Adam(emb.parameters(), lr=0.1)
    emb(batch).sum().backward()
    opt.step()
    assert torch.equal(emb.table("item_id").weight[0], torch.zeros(4))


def test_sequence_is_masked_mean_of_non_zero_ids(encoder, batch) -> None:
    emb = FieldEmbedding(encoder, 4, fields=["hist_item_ids"])
    ids = batch["hist_item_ids"]
    table = emb.table("item_id").weight.detach()
    row = int(torch.nonzero((ids != 0).sum(1) >= 2)[0])
    present = ids[row][ids[row] != 0]
    expected = table[present].mean(0)
    got = emb(batch)[row, 0]
    assert torch.allclose(got, expected, atol=1e-7)
    empty = int(torch.nonzero((ids != 0).sum(1) == 0)[0])
    assert torch.equal(emb(batch)[empty, 0], torch.zeros(4))


def test_embedding_fields_are_projected(encoder, batch) -> None:
    emb = FieldEmbedding(encoder, 4, fields=["text_emb", "item_id"])
    proj = emb.projections["text_emb"]
    assert torch.allclose(emb(batch)[:, 0], proj(batch["text_emb"]))


def test_sparse_only_for_large_fields(encoder, batch) -> None:
    emb = FieldEmbedding(encoder, 4, sparse=True)
    assert emb.table("item_id").sparse and emb.table("user_id").sparse
    assert not emb.table("scenario").sparse
    emb(batch).sum().backward()
    assert emb.table("item_id").weight.grad.is_sparse
    assert not emb.table("scenario").weight.grad.is_sparse


def test_field_embedding_rejects_unknown_fields(encoder, batch) -> None:
    with pytest.raises(KeyError, match="not_a_field"):
        FieldEmbedding(encoder, 4, fields=["item_id", "not_a_field"])
    emb = FieldEmbedding(encoder, 4, fields=["item_id"])
    with pytest.raises(KeyError, match="'item_id' is missing from the batch"):
        emb({"user_id": batch["user_id"]})


def test_mlp_shapes() -> None:
    mlp = MLP(10, [8, 6], dropout=0.5)
    assert mlp(torch.randn(3, 10)).shape == (3, 6) and mlp.output_dim == 6
    head = MLP(10, [8], out_dim=1)
    assert head(torch.randn(3, 10)).shape == (3, 1)
    assert MLP(10, []).output_dim == 10  # no hidden layers: identity


def test_registry_builds_dcnv2_and_names_known_models(encoder, batch) -> None:
    assert MODELS["dcnv2"] is DCNv2 and "dcnv2" in known_models()
    model = build_model("dcnv2", encoder, {"embedding_dim": 4, "cross_layers": 2, "mlp": [16], "dropout": 0.0})
    assert model(batch).shape == (200,)
    assert model.params == {
        "embedding_dim": 4,
        "cross_layers": 2,
        "mlp": [16],
        "dropout": 0.0,
        "sparse": False,
        "fields": None,
    }
    with pytest.raises(KeyError, match=r"unknown model 'nope': known models are \[.*'dcnv2'"):
        build_model("nope", encoder, {})
    with pytest.raises(TypeError, match=r"model 'dcnv2': unknown parameters \['layers'\]"):
        build_model("dcnv2", encoder, {"layers": 3})


def test_dcnv2_cross_layer_is_x0_times_wx_plus_b_plus_x(encoder) -> None:
    model = DCNv2(encoder, embedding_dim=2, cross_layers=1, mlp=[])
    x0 = torch.randn(5, model.embedding.output_dim)
    layer = model.cross.layers[0]
    assert torch.allclose(model.cross(x0), x0 * (x0 @ layer.weight.T + layer.bias) + x0)


def test_dcnv2_overfits_200_rows(encoder, tiny_frame) -> None:
    rows = to_tensors(encoder.transform(tiny_frame.iloc[:200]))
    seed_everything(0)
    model = build_model("dcnv2", encoder, {"embedding_dim": 8, "cross_layers": 2, "mlp": [64, 64], "dropout": 0.0})
    Trainer(model, TrainConfig(epochs=40, batch_size=32, lr=0.01, threads=1, progress=False)).fit(rows)
    train_auc = auc(rows["label"].numpy(), predict(model, rows))
    assert train_auc > 0.95


def test_artifact_round_trip_gives_identical_scores(tmp_path, encoder, tiny_frame) -> None:
    train = to_tensors(encoder.transform(tiny_frame.iloc[:2000]))
    seed_everything(1)
    model = build_model("dcnv2", encoder, {"embedding_dim": 4, "cross_layers": 1, "mlp": [16]})
    Trainer(model, TrainConfig(epochs=2, batch_size=256, threads=1, progress=False)).fit(train)
    metrics = {"auc": 0.71, "gauc": float("nan"), "scenario_auc": {"home": 0.7}}
    params = {"train": {"epochs": 2}, "models": {"dcnv2": {"mlp": [16]}}}
    path = save_model_artifact(tmp_path / "art", model, encoder, metrics, params, extra={"run": "t"})
    assert sorted(p.name for p in path.iterdir()) == [
        "encoder.json",
        "metrics.json",
        "model.json",
        "model.pt",
        "params.json",
    ]

    loaded = load_model_artifact(path)
    assert loaded.name == "dcnv2" and not loaded.model.training
    assert loaded.metrics == {"auc": 0.71, "gauc": None, "scenario_auc": {"home": 0.7}}  # NaN → null (strict JSON)
    assert loaded.params == params and loaded.extra == {"run": "t"}
    json.loads((path / "metrics.json").read_text())

    frame = tiny_frame.iloc[4000:4300].drop(columns=["label"]).copy()
    frame.loc[frame.index[:3], "item_id"] = 10**9  # unknown ids fall back to index 0
    frame.loc[frame.index[3:6], "scenario"] = "never-seen"
    before = Scorer(model, encoder).score(frame)
    after = loaded.scorer().score(frame)
    assert after.shape == (300,) and after.dtype == np.float32
    np.testing.assert_array_equal(before, after)
    assert np.isfinite(after).all() and ((after > 0) & (after < 1)).all()
    assert Scorer.from_directory(path).score(frame.iloc[:0]).shape == (0,)
    with pytest.raises(KeyError, match=r"columns \['price'\] are missing"):
        loaded.scorer().score(frame.drop(columns=["price"]))


def test_load_artifact_names_missing_files(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="missing"):
        load_model_artifact(tmp_path)
