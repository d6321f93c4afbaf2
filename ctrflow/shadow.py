"""Shadow serving: a challenger model scores the same requests as the production model (the champion); its scores are
logged beside the champion's and never returned.

    ctrflow models shadow <tag>             attach a candidate as the challenger of its name's production model
    ctrflow models promote-challenger       promote it (one step, under the registry lock)

The service (serving/service.py) holds a `ShadowSlot`: the challenger the registry attaches to the model it serves
(while that model is the production one), re-read every `REFRESH_S` seconds, so attaching or detaching needs no
restart. Per request, `Shadow.columns` scores the champion's feature frame (the features as served, read once) with
the challenger and returns the request-log columns:

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
REFRESH_S = 5.0  # how often a worker re-reads which challenger is attached (two reads of a small JSON file)
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
                from ctrflow.request_log import dense

                frame = dense(frame).to_pandas()  # the values shared by every row are held once (run-end encoded)
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


class ShadowSlot:
    """The challenger a service scores beside the model it serves, following the registry: attaching, replacing or
    detaching one (`ctrflow models shadow / unshadow`) takes effect within `refresh_s` seconds, without a restart.

    A challenger is scored only while the served model is its name's production model (a service pinned to an older
    tag scores none, with one warning). Loading happens in a background thread with its own feature store (the
    requests keep the old challenger, or none, until the new one is ready); a challenger that cannot be loaded
    (does not fit the feature repository, files missing) is logged and counted (`ctrflow_shadow_failures_total
    {stage="load"}`) and the service goes on without one. `refresh_s=0`: read once, at construction.
    """

    def __init__(
        self, served_tag: str, feature_repo: str | Path, feature_service: str, *, metrics: bool = False, store: Any = None,
        refresh_s: float = REFRESH_S,
    ) -> None:  # fmt: skip
        self.served_tag = served_tag
        self.name = served_tag.split(":")[0]
        self.feature_repo = feature_repo
        self.feature_service = feature_service
        self.metrics = metrics
        self.shadow: Shadow | None = None
        self._seen: tuple[str | None, str | None] | None = None
        self._stop = threading.Event()
        self.refresh(store)  # at start, in the constructing thread: it may use the service's own store
        self._thread = None
        if refresh_s > 0:
            self._thread = threading.Thread(target=self._watch, args=(refresh_s,), name="ctrflow-shadow", daemon=True)
            self._thread.start()

    @property
    def tag(self) -> str | None:
        shadow = self.shadow
        return shadow.tag if shadow is not None else None

    def refresh(self, store: Any = None) -> bool:
        """Re-read the registry; load, replace or drop the challenger when that changed. True when it changed."""
        from ctrflow import registry

        try:
            state = (registry.shadow_model(self.name), registry.production_model(self.name))
        except Exception:  # noqa: BLE001 - an unreadable ledger keeps what is loaded; the next look may succeed
            log.warning("shadow serving: the stage ledger could not be read; keeping challenger %s", self.tag, exc_info=True)
            return False
        if state == self._seen:
            return False
        self._seen = state
        challenger, production = state
        if challenger and production != self.served_tag:
            log.warning(
                "challenger %s is attached to the production model %s, but this service serves %s: no shadow scoring",
                challenger, production, self.served_tag,
            )  # fmt: skip
            challenger = None
        if challenger == self.tag:
            return False
        if challenger is None:
            log.warning("shadow serving: challenger %s detached", self.tag)
            self.shadow = None
            return True
        try:
            loaded = Shadow.load(challenger, self.feature_repo, self.feature_service, metrics=self.metrics, store=store)
        except Exception as exc:  # noqa: BLE001 - a challenger never stops the champion from serving
            count_load_failure(self.metrics)
            log.error("challenger %s not attached (serving %s without a shadow): %s", challenger, self.served_tag, exc)
            self.shadow = None
            return True
        self.shadow = loaded
        log.warning("shadow serving: challenger %s scores every request beside %s (logged, never returned)", loaded.tag, self.served_tag)
        return True

    def _watch(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                self.refresh()
            except Exception:  # noqa: BLE001 - the watcher must outlive any one failure
                log.exception("shadow serving: refresh failed")

    def columns(self, frame: Any) -> dict[str, Any]:
        """The current challenger's request-log columns for one request ({} when none is attached); never raises."""
        shadow = self.shadow  # one read: a swap by the watcher never splits a request
        return shadow.columns(frame) if shadow is not None else {}

    def close(self) -> None:
        self._stop.set()
