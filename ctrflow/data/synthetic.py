"""A seeded multi-scenario, multimodal generator with a known click model.

Users carry latent interests; items belong to categories and carry text and image vectors that are noisy
projections of their latent vector; a click is drawn from

    p(click) = sigmoid(a_s * <u, v_i> + b_s + bias_u + bias_i)

with per-scenario scale a_s and offset b_s. Interactions are produced in chunks, so millions of rows can be
written to Parquet without holding them all in memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ctrflow.data.spec import Entity, FeatureSpec, FieldKind, FieldSpec
from ctrflow.data.tables import Dataset, standard_fields

START = pd.Timestamp("2026-01-01", tz="UTC")


@dataclass
class SyntheticConfig:
    n_users: int = 2_000
    n_items: int = 1_000
    n_interactions: int = 50_000
    n_categories: int = 20
    latent_dim: int = 8
    text_dim: int = 32
    image_dim: int = 32
    days: int = 60
    scenarios: list[str] = field(default_factory=lambda: ["home", "search", "cart", "live"])
    scenario_weights: list[float] = field(default_factory=lambda: [0.62, 0.25, 0.10, 0.03])
    scenario_scale: list[float] = field(default_factory=lambda: [1.0, 1.6, 0.7, 1.2])
    scenario_offset: list[float] = field(default_factory=lambda: [-1.0, -0.3, -1.6, -0.6])
    max_len: int = 50
    seed: int = 0
    chunk_rows: int = 500_000
    activity_sigma: float = 1.0  # log-normal sigma of per-user activity: larger, a longer tail of very active users

    def __post_init__(self) -> None:
        if not (len(self.scenarios) == len(self.scenario_weights) == len(self.scenario_scale) == len(self.scenario_offset)):
            raise ValueError("synthetic config: scenarios, scenario_weights, scenario_scale, scenario_offset differ in length")


def synthetic_spec(cfg: SyntheticConfig) -> FeatureSpec:
    return FeatureSpec(
        fields=[
            *standard_fields(cfg.max_len),
            FieldSpec("age_bucket", FieldKind.CATEGORICAL, Entity.USER),
            FieldSpec("gender", FieldKind.CATEGORICAL, Entity.USER),
            FieldSpec("region", FieldKind.CATEGORICAL, Entity.USER),
            FieldSpec("category", FieldKind.CATEGORICAL, Entity.ITEM),
            FieldSpec("price", FieldKind.NUMERIC, Entity.ITEM, buckets=10),
            FieldSpec("text_emb", FieldKind.EMBEDDING, Entity.ITEM, dim=cfg.text_dim),
            FieldSpec("image_emb", FieldKind.EMBEDDING, Entity.ITEM, dim=cfg.image_dim),
        ],
        scenarios=list(cfg.scenarios),
    )


class SyntheticWorld:
    """The latent state (users, items, click model) from which interactions are drawn."""

    def __init__(self, cfg: SyntheticConfig):
        self.cfg = cfg
        rng = np.random.default_rng(cfg.seed)
        d = cfg.latent_dim
        self.centroids = rng.normal(0, 1.0, (cfg.n_categories, d))
        self.item_category = rng.integers(0, cfg.n_categories, cfg.n_items)
        self.item_latent = self.centroids[self.item_category] + rng.normal(0, 0.5, (cfg.n_items, d))
        # each user prefers a few categories
        n_pref = 3
        prefs = rng.integers(0, cfg.n_categories, (cfg.n_users, n_pref))
        self.user_latent = self.centroids[prefs].mean(axis=1) + rng.normal(0, 0.3, (cfg.n_users, d))
        self.user_latent /= np.sqrt(d)
        self.user_bias = rng.normal(0, 0.3, cfg.n_users)
        self.item_bias = rng.normal(0, 0.3, cfg.n_items)
        self.item_pop = rng.zipf(1.6, cfg.n_items).astype(float)
        self.item_pop = np.minimum(self.item_pop, 1000.0)
        self.item_pop /= self.item_pop.sum()
        self.user_activity = rng.lognormal(0, cfg.activity_sigma, cfg.n_users)
        self.user_activity /= self.user_activity.sum()
        text_proj = rng.normal(0, 1, (d, cfg.text_dim)) / np.sqrt(d)
        image_proj = rng.normal(0, 1, (d, cfg.image_dim)) / np.sqrt(d)
        self.text_emb = (self.item_latent @ text_proj + rng.normal(0, 0.3, (cfg.n_items, cfg.text_dim))).astype(np.float32)
        self.image_emb = (self.item_latent @ image_proj + rng.normal(0, 0.6, (cfg.n_items, cfg.image_dim))).astype(np.float32)
        self.user_age = rng.choice(["18-24", "25-34", "35-44", "45+"], cfg.n_users)
        self.user_gender = rng.choice(["F", "M"], cfg.n_users)
        self.user_region = rng.choice([f"r{i}" for i in range(12)], cfg.n_users)
        self.item_price = np.round(np.exp(rng.normal(3, 1, cfg.n_items)), 2)

    def click_probability(self, users: np.ndarray, items: np.ndarray, scenario: np.ndarray) -> np.ndarray:
        cfg = self.cfg
        scale = np.asarray(cfg.scenario_scale)[scenario]
        offset = np.asarray(cfg.scenario_offset)[scenario]
        affinity = np.einsum("nd,nd->n", self.user_latent[users], self.item_latent[items])
        logit = scale * affinity + offset + self.user_bias[users] + self.item_bias[items]
        return 1.0 / (1.0 + np.exp(-logit))

    def users_table(self) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "user_id": np.arange(1, self.cfg.n_users + 1, dtype=np.int64),
                "age_bucket": self.user_age,
                "gender": self.user_gender,
                "region": self.user_region,
            }
        )

    def items_table(self) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "item_id": np.arange(1, self.cfg.n_items + 1, dtype=np.int64),
                "category": [f"c{c}" for c in self.item_category],
                "price": self.item_price,
                "text_emb": list(self.text_emb),
                "image_emb": list(self.image_emb),
            }
        )

    def interaction_chunks(self) -> Iterator[pd.DataFrame]:
        """Interactions in time order, `chunk_rows` at a time; each chunk has its own derived seed."""
        cfg = self.cfg
        total_us = cfg.days * 86_400 * 1_000_000
        done = 0
        chunk_index = 0
        while done < cfg.n_interactions:
            n = min(cfg.chunk_rows, cfg.n_interactions - done)
            rng = np.random.default_rng([cfg.seed, 1 + chunk_index])
            lo = total_us * done // cfg.n_interactions
            hi = total_us * (done + n) // cfg.n_interactions
            offsets = np.sort(rng.integers(lo, max(hi, lo + 1), n))
            users = rng.choice(cfg.n_users, n, p=self.user_activity)
            items = rng.choice(cfg.n_items, n, p=self.item_pop)
            scenario = rng.choice(len(cfg.scenarios), n, p=np.asarray(cfg.scenario_weights) / sum(cfg.scenario_weights))
            label = (rng.random(n) < self.click_probability(users, items, scenario)).astype(np.int64)
            ts = pd.to_datetime(START.value // 1000 + offsets, unit="us", utc=True).astype("datetime64[us, UTC]")
            df = pd.DataFrame(
                {
                    "user_id": users.astype(np.int64) + 1,
                    "item_id": items.astype(np.int64) + 1,
                    "scenario": np.asarray(cfg.scenarios, dtype=object)[scenario],
                    "label": label,
                    "event_timestamp": ts,
                }
            )
            # the canonical key is (user, item, timestamp): drop the rare repeat inside a chunk
            yield df.drop_duplicates(["user_id", "item_id", "event_timestamp"])
            done += n
            chunk_index += 1


def generate_synthetic(cfg: SyntheticConfig | None = None) -> Dataset:
    """The whole synthetic dataset in memory (fine up to a few million rows)."""
    cfg = cfg or SyntheticConfig()
    world = SyntheticWorld(cfg)
    interactions = pd.concat(list(world.interaction_chunks()), ignore_index=True)
    return Dataset("synthetic", interactions, world.users_table(), world.items_table(), synthetic_spec(cfg))


def write_synthetic(cfg: SyntheticConfig, directory: str | Path) -> Path:
    """Stream the synthetic dataset to Parquet chunk by chunk (bounded memory at any size)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    world = SyntheticWorld(cfg)
    writer = None
    try:
        for chunk in world.interaction_chunks():
            table = pa.Table.from_pandas(chunk, preserve_index=False)
            if writer is None:
                writer = pq.ParquetWriter(directory / "interactions.parquet", table.schema)
            writer.write_table(table)
    finally:
        if writer is not None:
            writer.close()
    world.users_table().to_parquet(directory / "users.parquet", index=False)
    world.items_table().to_parquet(directory / "items.parquet", index=False)
    spec = synthetic_spec(cfg)
    spec.extra["dataset"] = "synthetic"
    spec.save(directory / "spec.json")
    return directory
