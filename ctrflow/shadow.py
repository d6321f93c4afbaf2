"""Shadow serving: a challenger model scores the same requests as the production model (the champion); its scores are
logged beside the champion's and never returned.

    ctrflow models shadow <tag>             attach a candidate as the challenger of its name's production model
    ctrflow models promote-challenger       promote it (one step, under the registry lock)

The service (serving/service.py) builds a `Shadow` at start when the registry has a challenger for the model it
serves and that model is the production one (`Shadow.for_service`). Per request, `Shadow.columns` scores the
champion's feature frame (the features as served, read once) with the challenger and returns the request-log columns:

    shadow_model        the challenger's tag (string; on every row of a request the challenger saw)
    shadow_score   its click probability for that candidate (float32; null where it failed)

An online comparison of the two is then a query on the request log (e.g. AUC of `prediction` vs `shadow_score`
once labels are joined), with no second service and no second feature read.

A challenger never fails a request: loading failures (it does not fit the feature repository, its artifact cannot be
read) leave the service running without a shadow; scoring failures (an exception, or a non-finite score: a diverged
challenger) leave `shadow_score` null. Both are counted (`stats()`, and on /metrics:
`ctrflow_shadow_scored_total`, `ctrflow_shadow_failures_total{stage}`) and logged (at most one traceback per
`LOG_EVERY` failures). Cost: the challenger's scoring time is added to each request (it
runs before the request is logged, which is before the answer is sent: the log is written before answering).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

log = logging.getLogger(__name__)

LOG_EVERY = 1000  # after the first failure, log one in this many
COLUMNS = ("shadow_model", "shadow_score")

_PROMETHEUS: dict[str, Any] = {}


def _counters() -> dict[str, Any]:
    """ctrflow_shadow_* Prometheus counters, created once per process (in a worker, after BentoML set up metrics)."""
    if not _PROMETHEUS:
        import prometheus_client

        _PROMETHEUS["scored"] = prometheus_client.Counter("ctrflow_shadow_scored", "requests the challenger scored")
        _PROMETHEUS["failures"] = prometheus_client.Counter(
            "ctrflow_shadow_failures", "challenger failures (load: not attached; score: one request's shadow scores null)", ["stage"]
        )
    return _PROMETHEUS


def count_load_failure(metrics: bool = True) -> None:
    """Count a challenger that could not be attached."""
    if metrics:
        try:
            _counters()["failures"].labels(stage="load").inc()
        except Exception:  # noqa: BLE001 - counting never fails serving
            log.debug("could not count a shadow load failure", exc_info=True)


class Shadow:
    """A challenger scorer bound to its tag; `columns(frame)` never raises. `metrics`: count on /metrics too."""

    def __init__(self, tag: str, scorer: Any, *, metrics: bool = False) -> None:
        self.tag = tag
        self.scorer = scorer
        self.metrics = metrics
        self._lock = threading.Lock()
        self._stats = {"scored": 0, "failures": 0}

    @classmethod
    def load(cls, tag: str, feature_repo: str | Path, feature_service: str, *, metrics: bool = False, store: Any = None) -> Shadow:
        """Load challenger `tag` after checking that it fits the feature repository and service the champion reads
        (raises `ModelDoesNotFitError` naming the mismatch, or the registry's / loader's error)."""
        from ctrflow import registry
        from ctrflow.fit_check import check_model_fits
        from ctrflow.training.artifact import Scorer, load_model_artifact

        tag = registry.resolve_tag(tag)
        check_model_fits(tag, feature_repo, feature_service, store=store)
        loaded = load_model_artifact(registry.model_path(tag))
        return cls(tag, Scorer(loaded.model, loaded.encoder), metrics=metrics)

    @classmethod
    def for_service(
        cls, served_tag: str, feature_repo: str | Path, feature_service: str, *, metrics: bool = False, store: Any = None
    ) -> Shadow | None:
        """The challenger of the served model, when the served model is its name's production model and one is
        attached; None otherwise, and None (logged and counted) when it cannot be loaded: the service starts anyway."""
        from ctrflow import registry

        name = served_tag.split(":")[0]
        challenger = registry.shadow_model(name)
        if not challenger:
            return None
        production = registry.production_model(name)
        if production != served_tag:
            log.warning(
                "challenger %s is attached to the production model %s, but this service serves %s: no shadow scoring",
                challenger, production, served_tag,
            )  # fmt: skip
            return None
        try:
            shadow = cls.load(challenger, feature_repo, feature_service, metrics=metrics, store=store)
        except Exception as exc:  # noqa: BLE001 - a challenger never stops the champion from serving
            count_load_failure(metrics)
            log.error("challenger %s not attached (serving %s without a shadow): %s", challenger, served_tag, exc)
            return None
        log.info("shadow serving: challenger %s scores every request beside %s (logged, never returned)", shadow.tag, served_tag)
        return shadow

    def stats(self) -> dict[str, int]:
        with self._lock:
            return dict(self._stats)

    def _count(self, name: str, stage: str | None = None) -> int:
        with self._lock:
            self._stats[name] += 1
            n = self._stats[name]
        if self.metrics:
            try:
                counter = _counters()[name]
                (counter.labels(stage=stage) if stage else counter).inc()
            except Exception:  # noqa: BLE001 - counting never fails a request
                log.debug("could not count shadow %s", name, exc_info=True)
        return n

    def scores(self, frame: Any) -> np.ndarray | None:
        """The challenger's probabilities for the frame's rows (float32), or None when it failed (counted). `frame`:
        the features as served, a pandas DataFrame or an Arrow table (as the request log takes them)."""
        try:
            if isinstance(frame, pa.Table):
                frame = frame.to_pandas()
            out = np.asarray(self.scorer.score(frame), dtype=np.float32)
            if out.shape != (len(frame),):
                raise ValueError(f"the challenger returned {out.shape} scores for {len(frame)} candidates")
            if not np.isfinite(out).all():  # a diverged challenger: its numbers would poison the online comparison
                raise ValueError(f"the challenger returned {int((~np.isfinite(out)).sum())} non-finite scores of {len(out)}")
        except Exception:  # noqa: BLE001 - a challenger never fails a request
            n = self._count("failures", "score")
            if n == 1 or n % LOG_EVERY == 0:
                log.exception("challenger %s failed to score a request (%d failures so far); the answer is unaffected", self.tag, n)
            return None
        self._count("scored")
        return out

    def columns(self, frame: Any) -> dict[str, Any]:
        """The request-log columns for one request: shadow_model (the tag) and shadow_score (per candidate,
        None everywhere when the challenger failed)."""
        scores = self.scores(frame)
        return {"shadow_model": self.tag, "shadow_score": scores if scores is not None else [None] * len(frame)}
