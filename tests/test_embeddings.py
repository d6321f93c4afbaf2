"""Item modalities as features: user Parquet modalities, TransE on a knowledge graph, the offline text encoder."""

from __future__ import annotations

import socket

import numpy as np
import pandas as pd
import pytest
import torch

from ctrflow.data.spec import Entity, FieldKind
from ctrflow.data.tables import Dataset
from ctrflow.embeddings import (
    ModalityError,
    add_item_embeddings,
    embed_items_step,
    kg_embeddings,
    load_modality_parquet,
    text_embeddings,
    train_transe,
)

torch.set_num_threads(1)


def _vectors_parquet(path, ids, dim=4, seed=0):
    rng = np.random.default_rng(seed)
    pd.DataFrame({"item_id": ids, "vec": list(rng.normal(size=(len(ids), dim)).astype(np.float32))}).to_parquet(path)
    return path


def test_modality_parquet_list_and_wide_columns(tmp_path):
    listed = load_modality_parquet(_vectors_parquet(tmp_path / "a.parquet", [3, 1, 2]), "image")
    assert list(listed.columns) == ["item_id", "image_emb"]
    assert listed["image_emb"].iloc[0].dtype == np.float32 and len(listed["image_emb"].iloc[0]) == 4
    wide = pd.DataFrame({"item_id": [1, 2], "d0": [0.1, 0.2], "d1": [1.0, 2.0], "d2": [3.0, 4.0]})
    wide.to_parquet(tmp_path / "w.parquet")
    out = load_modality_parquet(tmp_path / "w.parquet", "audio_emb")
    np.testing.assert_allclose(out["audio_emb"].iloc[1], [0.2, 2.0, 4.0], rtol=1e-6)


@pytest.mark.parametrize(
    "frame, message",
    [
        (pd.DataFrame({"item_id": [1, 1], "v": [[0.0, 1.0], [1.0, 0.0]]}), "unique; 1 rows"),
        (pd.DataFrame({"item_id": [1, 2], "v": [[0.0, 1.0], [1.0, 0.0, 2.0]]}), "one length"),
        (pd.DataFrame({"item_id": [1, 2], "v": [[np.nan, 1.0], [1.0, 0.0]]}), "1 rows hold NaN"),
        (pd.DataFrame({"id": [1, 2], "v": [[0.0, 1.0], [1.0, 0.0]]}), "no 'item_id' column"),
    ],
)
def test_modality_parquet_errors_name_the_rule(tmp_path, frame, message):
    frame.to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(ModalityError, match=message):
        load_modality_parquet(tmp_path / "bad.parquet", "image")


def test_parquet_modality_becomes_an_item_embedding_field(tiny_dataset, tmp_path):
    ids = tiny_dataset.items["item_id"].to_numpy()[:-5]  # the last 5 items have no vector
    path = _vectors_parquet(tmp_path / "audio.parquet", ids, dim=6)
    out = add_item_embeddings(tiny_dataset, {"audio": {"path": str(path)}, "text": {}})
    f = out.spec["audio_emb"]
    assert (f.kind, f.entity, f.dim) == (FieldKind.EMBEDDING, Entity.ITEM, 6)
    assert out.spec.names.count("text_emb") == 1  # the dataset's own text_emb is kept, not recomputed
    vectors = np.stack(out.items["audio_emb"].to_numpy())
    assert vectors.shape == (len(tiny_dataset.items), 6)
    assert np.all(vectors[-5:] == 0) and np.all(np.abs(vectors[:-5]).sum(1) > 0)
    assert out.spec.extra["modalities"]["audio"]["coverage"] == pytest.approx(1 - 5 / len(tiny_dataset.items))
    assert "audio_emb" not in tiny_dataset.spec.names and "audio_emb" not in tiny_dataset.items  # input untouched

    from ctrflow.features import view_schema  # the Feast item view stores it as a float array

    assert ("audio_emb", "Array(Float32)") in view_schema(out.spec)["item_profile"]


def test_missing_inputs_error_or_skip(tiny_dataset):
    with pytest.raises(ModalityError, match="no default knowledge graph"):
        add_item_embeddings(tiny_dataset, ["kg"])
    skipped = add_item_embeddings(tiny_dataset, ["kg"], on_missing="skip")
    assert "kg_emb" not in skipped.spec.names
    with pytest.raises(ModalityError, match="not built in"):
        add_item_embeddings(tiny_dataset, ["smell"])


def test_transe_is_deterministic_and_learns():
    rng = np.random.default_rng(0)
    # two clusters of films sharing actors: films in one cluster link to the same few "actor" entities
    films = np.arange(20)
    triples = [(f, 0, 20 + (f // 10) * 3 + rng.integers(0, 3)) for f in films for _ in range(3)]
    triples = np.array(triples)
    a = train_transe(triples, 26, 1, dim=8, epochs=40, batch_size=16, seed=3)
    b = train_transe(triples, 26, 1, dim=8, epochs=40, batch_size=16, seed=3)
    c = train_transe(triples, 26, 1, dim=8, epochs=40, batch_size=16, seed=4)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, rtol=1e-5)
    sim = a[:20] @ a[:20].T
    same = np.equal.outer(films // 10, films // 10) & ~np.eye(20, dtype=bool)
    assert sim[same].mean() > sim[~np.equal.outer(films // 10, films // 10)].mean()


def test_kg_embeddings_from_recbole_files_and_zero_for_unlinked(tmp_path):
    kg = pd.DataFrame({"head_id:token": ["m.a", "m.b", "m.c"], "relation_id:token": ["r.actor"] * 3, "tail_id:token": ["m.x", "m.x", "m.y"]})
    link = pd.DataFrame({"item_id:token": ["1", "2", "3"], "entity_id:token": ["m.a", "m.b", "m.c"]})
    kg.to_csv(tmp_path / "t.kg", sep="\t", index=False)
    link.to_csv(tmp_path / "t.link", sep="\t", index=False)
    items = pd.DataFrame({"item_id": [1, 2, 3, 4]})
    vec, coverage = kg_embeddings(items, tmp_path / "t.kg", tmp_path / "t.link", dim=4, epochs=3, seed=0)
    assert vec.shape == (4, 4) and vec.dtype == np.float32
    assert coverage == 0.75 and np.all(vec[3] == 0) and np.all(np.abs(vec[:3]).sum(1) > 0)


def test_movielens_kg_modality_coverage_and_cache(tmp_path):
    from ctrflow.data.movielens import load_movielens

    ds = load_movielens()
    opts = {"kg": {"epochs": 1, "dim": 8}}
    out = add_item_embeddings(ds, opts, cache_dir=tmp_path, seed=0)
    info = out.spec.extra["modalities"]["kg"]
    assert 0.9 < info["coverage"] < 1.0  # 1,598 of 1,682 films have a Freebase link; the rest are zero vectors
    assert len(list(tmp_path.glob("kg-*.npz"))) == 1
    again = add_item_embeddings(ds, opts, cache_dir=tmp_path, seed=0)  # from the cache: identical
    assert np.array_equal(np.stack(out.items["kg_emb"]), np.stack(again.items["kg_emb"]))


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails loudly (the encoder must come from the installed wheel)."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access attempted in a test that must run offline")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


def test_text_modality_is_offline_and_deterministic(no_network, tmp_path):
    items = pd.DataFrame(
        {
            "item_id": [1, 2, 3, 4],
            "title": ["Toy Story", "Return of the Jedi", "Star Wars", None],
            "genres": [["Animation", "Comedy"], ["Sci-Fi", "Action"], ["Sci-Fi", "Action"], []],
        }
    )
    a = text_embeddings(items)
    b = text_embeddings(items)
    assert a.shape == (4, 384) and a.dtype == np.float32
    assert np.array_equal(a, b)
    np.testing.assert_allclose(np.linalg.norm(a[:3], axis=1), 1.0, rtol=1e-5)
    assert a[1] @ a[2] > a[0] @ a[2]  # the two Star Wars films are closer than Toy Story
    assert no_network == []

    import os

    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_embed_items_step_round_trip(tiny_dataset, tmp_path):
    tiny_dataset.save(tmp_path / "in")
    path = _vectors_parquet(tmp_path / "audio.parquet", tiny_dataset.items["item_id"].to_numpy(), dim=3)
    params = {"embeddings": {"modalities": {"audio": {"path": str(path)}, "kg": {}}, "on_missing": "skip"}}
    result = embed_items_step(params, tmp_path / "in", tmp_path / "out")
    assert result["modalities"]["audio"]["field"] == "audio_emb" and "kg" not in result["modalities"]
    back = Dataset.load(tmp_path / "out")
    assert back.spec["audio_emb"].dim == 3
    assert np.stack(back.items["audio_emb"].to_numpy()).shape == (len(tiny_dataset.items), 3)
