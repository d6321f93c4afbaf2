"""Feature frames built in memory with pandas: the reference for (and fast stand-in of) the Feast join.

The pipeline builds training frames through Feast (`ctrflow.features`); benchmarks that train dozens of models
use this in-memory twin, and the Feast tests check that both give the same values.
"""

from __future__ import annotations

import pandas as pd

from ctrflow.data.tables import BEHAVIOUR_COUNT_FIELDS, HIST_FIELD, Dataset, behaviour_table


def point_in_time_frame(dataset: Dataset, behaviour: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per interaction with the user, item and behaviour features valid at its timestamp. A spec without the
    behaviour sequence (e.g. the Scenario-Wise Rec fields) gets no behaviour columns: the join is skipped."""
    spec = dataset.spec
    if HIST_FIELD not in spec.names:
        inter = dataset.interactions.reset_index(drop=True)
        return inter.merge(dataset.users, on="user_id", how="left").merge(dataset.items, on="item_id", how="left")
    max_len = spec[HIST_FIELD].max_len
    inter = dataset.interactions.reset_index(drop=True).copy()
    inter["_row"] = range(len(inter))
    beh = behaviour if behaviour is not None else behaviour_table(inter, max_len)
    frame = pd.merge_asof(
        inter.sort_values("event_timestamp", kind="stable"),
        beh.sort_values("event_timestamp", kind="stable"),
        on="event_timestamp",
        by="user_id",
        direction="backward",
        allow_exact_matches=True,  # a behaviour row stamped t only holds events strictly before t
    )
    frame = frame.sort_values("_row").drop(columns="_row").reset_index(drop=True)
    frame[HIST_FIELD] = [v if isinstance(v, list) else [] for v in frame[HIST_FIELD]]
    for c in BEHAVIOUR_COUNT_FIELDS:
        frame[c] = frame[c].fillna(0).astype("int64")
    frame = frame.merge(dataset.users, on="user_id", how="left").merge(dataset.items, on="item_id", how="left")
    return frame
