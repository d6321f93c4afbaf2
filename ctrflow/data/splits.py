"""Train / validation / test splits of the interactions."""

from __future__ import annotations

import numpy as np
import pandas as pd

SPLITS = ("train", "valid", "test")


def temporal_split(interactions: pd.DataFrame, valid_frac: float = 0.1, test_frac: float = 0.1) -> pd.Series:
    """Last `test_frac` of events by time is test, the `valid_frac` before it validation.

    Cut points are timestamps (quantiles of the event times), so events at the same instant never straddle
    two splits.
    """
    ts = interactions["event_timestamp"]
    if isinstance(ts.dtype, pd.DatetimeTZDtype):
        # UTC datetime64 instead of an object array of Timestamps: the same order, ~30x faster to sort and compare
        ts = ts.dt.tz_convert("UTC").dt.tz_localize(None)
    raw = ts.to_numpy()
    order = np.sort(raw)
    n = len(order)
    test_cut = order[int(np.floor(n * (1 - test_frac)))]
    valid_cut = order[int(np.floor(n * (1 - test_frac - valid_frac)))]
    split = np.where(raw >= test_cut, "test", np.where(raw >= valid_cut, "valid", "train"))
    return pd.Series(split, index=interactions.index, name="split")


def random_split(interactions: pd.DataFrame, seed: int = 0, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> pd.Series:
    """The literature's 8:1:1 random split, seeded."""
    if abs(sum(fractions) - 1.0) > 1e-9:
        raise ValueError(f"split fractions must sum to 1, got {fractions}")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(interactions))
    n_train = int(round(fractions[0] * len(perm)))
    n_valid = int(round(fractions[1] * len(perm)))
    split = np.empty(len(perm), dtype=object)
    split[perm[:n_train]] = "train"
    split[perm[n_train : n_train + n_valid]] = "valid"
    split[perm[n_train + n_valid :]] = "test"
    return pd.Series(split, index=interactions.index, name="split")


def make_split(interactions: pd.DataFrame, method: str = "temporal", seed: int = 0) -> pd.Series:
    if method == "temporal":
        return temporal_split(interactions)
    if method == "random":
        return random_split(interactions, seed=seed)
    raise ValueError(f"split method must be 'temporal' or 'random', got '{method}'")
