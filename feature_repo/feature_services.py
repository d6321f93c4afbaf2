"""Feature services: one per model family, so each family's inputs are named, versioned and logged on their own.

ctr_ranking     baselines and DGenCTR: every view (the training frame of `ctrflow.data.frames.point_in_time_frame`)
multi_scenario  GSVR: every view; the scenario itself comes with the request, not from a view
multimodal      DMAE: every view, item embeddings included (the modalities of the behaviour sequence)
They hold the same features today; a family's inputs change here, without touching the others.
"""

from __future__ import annotations

from feast import FeatureService
from features import item_profile, user_behaviour, user_profile

ALL_VIEWS = [v for v in (user_behaviour, user_profile, item_profile) if v is not None]

ctr_ranking = FeatureService(
    name="ctr_ranking", features=ALL_VIEWS, description="Baselines and DGenCTR: user, item and behaviour features."
)
multi_scenario = FeatureService(
    name="multi_scenario", features=ALL_VIEWS, description="GSVR: the ranking features; scenario comes from the request."
)
multimodal = FeatureService(
    name="multimodal", features=ALL_VIEWS, description="DMAE: the ranking features with the item embeddings (modalities)."
)
