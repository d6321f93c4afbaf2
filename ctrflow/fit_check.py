"""Does a registered model fit a feature repository? Checked before a model is deployed or served.

A model records at registration what it was trained with (`ctrflow.registry.model_inputs`): its data set, feature
service, the feature columns it reads and a fingerprint of its item-side inputs (`registry.item_fingerprint`).
Serving it against a repository built from another data set fails late and obscurely (a missing-column KeyError
after the service's start-up timeout) or, when column names happen to match, silently: a DMAE model scored with item
vectors other than those it was trained on. `check_model_fits` compares the record with the repository and raises
`ModelDoesNotFitError` naming every mismatch: the data sets, the features the service lacks, the item features whose
values differ. `ctrflow serve`, the deploy step and the service's constructor call it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class ModelDoesNotFitError(RuntimeError):
    """The model cannot be served from this feature repository; the message names every mismatch."""


@dataclass
class FitReport:
    """What was compared: the model, the repository and service, and what matched."""

    tag: str
    feature_repo: str
    feature_service: str
    model_dataset: str
    repo_dataset: str
    features: list[str]
    checked_item_features: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def check_model_fits(
    tag: str,
    feature_repo: str | Path,
    feature_service: str | None = None,
    *,
    store: Any = None,
    check_items: bool = True,
) -> FitReport:
    """Raise ModelDoesNotFitError unless the registered model `tag` can be served from `feature_repo`.

    Checks, all reported together: (1) the repository's feature views were built from the model's data set (their
    `dataset` tag); (2) the feature service (`feature_service`, else the one recorded at registration, else
    `ctr_ranking`) serves every feature column the model reads (missing ones are named); (3) with `check_items`, the
    item-side features of the first `registry.FINGERPRINT_ITEMS` vocabulary items, read online, hash as they did in
    the training set (differing features are named). A model registered before inputs were recorded is checked on
    its feature spec (2 only, with a warning). `store` reuses an open FeatureStore. Returns what was checked.
    """
    from feast import FeatureStore

    from ctrflow import features, registry

    repo = Path(feature_repo)
    if not (repo / "feature_store.yaml").exists():
        raise ModelDoesNotFitError(f"feature repository {repo}: no feature_store.yaml there (not a Feast repository)")
    tag = registry.resolve_tag(tag)
    reg = registry.registration(tag)
    recorded = reg.get("inputs")
    warnings: list[str] = []
    if not recorded:
        recorded = registry.model_inputs(reg.get("feature_spec") or {})
        warnings.append(f"{tag} was registered without its inputs; checked on its feature spec only")
    service = feature_service or recorded.get("feature_service") or "ctr_ranking"
    store = store or FeatureStore(repo_path=str(repo))
    try:
        served = features.service_features(store, service)
    except KeyError as exc:
        raise ModelDoesNotFitError(f"model {tag} cannot be served from {repo}: {exc.args[0]}") from None

    problems: list[str] = []
    model_dataset = str(recorded.get("dataset") or "")
    repo_datasets = sorted({v["dataset"] for v in served.values() if v["dataset"]})
    repo_dataset = ", ".join(repo_datasets)
    if model_dataset and repo_datasets and repo_datasets != [model_dataset]:
        problems.append(f"trained on data set '{model_dataset}', but the repository's feature views hold '{repo_dataset}'")
    needed = list(recorded.get("features") or [])
    missing = [c for c in needed if c not in served]
    if missing:
        problems.append(
            f"feature service '{service}' lacks {len(missing)} of the model's {len(needed)} features: {missing}"
        )
    checked: list[str] = []
    fingerprint = recorded.get("item_fingerprint") or {}
    if check_items and fingerprint.get("features") and not missing:
        ids = fingerprint.get("items") or []
        online = features.online_item_features(store, ids, service)
        spec = reg.get("feature_spec") or {}
        now = registry.item_fingerprint(online, spec, ids)["features"]
        differ = [c for c, digest in fingerprint["features"].items() if c in now and now[c] != digest]
        checked = [c for c in fingerprint["features"] if c in now]
        if differ:
            problems.append(
                f"item features {differ} differ from those the model was trained with (over {len(ids)} items): the "
                "repository was built from other item data (e.g. other modality vectors)"
            )
    elif check_items and not fingerprint.get("features") and recorded.get("item_fingerprint") is None:
        warnings.append(f"{tag} has no item-side fingerprint; item feature values not compared")
    if problems:
        raise ModelDoesNotFitError(
            f"model {tag} does not fit the feature repository {repo} (service '{service}'): " + "; ".join(problems)
        )
    for w in warnings:
        log.warning("fit check: %s", w)
    return FitReport(tag, str(repo), service, model_dataset, repo_dataset, needed, checked, warnings)
