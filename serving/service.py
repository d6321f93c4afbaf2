"""The ranking service: a user, a scenario and candidate items in; the candidates ordered by click probability out.

    bentoml serve serving.service:RankingService --port 3000      (configuration: the environment, below)

It reads the features from the Feast online store (the same values as `ctrflow.features.online_frame`, the columns
of the training frame) and scores them through the one model interface (`ctrflow.training.artifact.Scorer`), so any
model family the registry holds serves without a change here. Users and items the model never saw are scored with
the encoder's "unknown" index 0 and flagged in the answer's `fallback`, never refused. Every request is appended to
the request log (`ctrflow.request_log`) with the features as served and the scores.

The HTTP boundary is `ctrflow.guard.ServiceGuard` (added below): a body-size limit (413), strict JSON types (ids are
int64 integers, never booleans, numeric strings or floats: 422 naming the field), one error body shape
({"status", "field", "rule", "message", "value"}, the value cut short) and an optional bearer token (401); /healthz,
/livez, /readyz and /metrics stay open. With a challenger attached to the production model (`ctrflow models shadow`),
each request is also scored by it (`ctrflow.shadow`): logged as shadow_model / shadow_score, never returned.
The guard's environment (`ctrflow.guard.guard_env`, from params `serving`): CTRFLOW_MAX_REQUEST_BYTES (bodies above
it: 413) and CTRFLOW_AUTH_TOKEN_ENV (the NAME of the variable holding the bearer token; unset or empty: no auth).

Environment (read when a worker constructs the service, never at import: `bentoml serve/build` import this module):
    CTRFLOW_FEATURE_REPO         the applied Feast repository (feature_store.yaml + registry + online store)  [required]
    CTRFLOW_MODEL_NAME           registry name (default ctrflow-ranker)
    CTRFLOW_MODEL_TAG            a model tag to serve; default: the name's production model in the registry
    CTRFLOW_FEATURE_SERVICE      the Feast feature service (default ctr_ranking)
    CTRFLOW_REQUEST_LOG          directory of the request log (unset: no request log, with a warning)
    CTRFLOW_REQUEST_LOG_FLUSH_ROWS / _FLUSH_SECONDS   flush thresholds (params serving.request_log_flush_rows / _seconds)
    CTRFLOW_REQUEST_LOG_COMPACTION  process (a compactor process per worker) or thread (params serving.request_log_compaction)
    CTRFLOW_TORCH_THREADS        torch intra-op threads per worker (params serving.threads; 1: more gave p99 spikes)
    CTRFLOW_SERVING_WORKERS      worker processes (params serving.workers); BENTOML_HOME: the model store
    CTRFLOW_ITEM_CACHE_REFRESH_S how often a worker checks for a new materialisation (params serving.item_cache_refresh_s)

Execution: `rank` is an `async def` although its work is CPU-bound and blocking. A worker scores one request at a
time either way (threads=1, torch single-threaded; scale with workers), and running it on the worker's event loop
saves the hand-off to a worker thread and back, two GIL hand-offs per request: measured on dcnv2 with 100
candidates at c=1, p50 -1.3 ms, p99 -2.7 ms and 1 ms less CPU per request (A/B alternated twice, issue 10). The cost:
while a request is scored, that worker answers nothing else, /livez, /readyz and /metrics included. That is a few ms
of CPU (DMAE ~15 ms) plus the user's online read: with a remote online store (Redis) a slow read stalls the worker's
probes as long, so give liveness probes a timeout and failure threshold above the store client's own timeout. BentoML's
traffic timeout cannot interrupt a request already being scored.

Scoring path (`ctrflow.online.OnlineScorer`): every item's features are read from the online store once per worker
and held encoded; each request reads only the user's features (one online read). A new materialisation of the store
(`<repo>/materialized.json`) is picked up within item_cache_refresh_s plus the rebuild time.
"""

import gc
import logging
import os
import time
import uuid
from typing import Annotated, Any

import bentoml
import numpy as np
from pydantic import BaseModel, Field, Strict

from ctrflow.config import ServingParams
from ctrflow.guard import RankRules, ServiceGuard, request_fields, set_rules, token_from_env

log = logging.getLogger("ctrflow.serving")

MAX_CANDIDATES = 1000
DEFAULT_MODEL_NAME = "ctrflow-ranker"

# strict: JSON booleans, numeric strings and floats are refused (the guard refuses them first, with its error shape)
Int64 = Annotated[int, Strict(), Field(ge=-(2**63), lt=2**63, description="an int64 id")]
ItemIds = Annotated[
    list[Int64],
    Field(min_length=1, max_length=MAX_CANDIDATES, description=f"candidate item ids (1 to {MAX_CANDIDATES}, no repeats)"),
]


class RankedItem(BaseModel):
    item_id: int = Field(description="a candidate's item id, as requested")
    score: float | None = Field(
        description="predicted click probability, in [0, 1]; null when the model gave a non-finite score (a diverged "
        "model; such candidates come last, in request order)"
    )


class Fallback(BaseModel):
    user: bool = Field(description="the model never saw this user: scored with the encoder's unknown index")
    items: list[int] = Field(description="candidates the model never saw (scored the same way), in request order")


class RankResponse(BaseModel):
    """The answer of `rank`. Typed (not a dict) so that BentoML serialises it with pydantic's compiled JSON encoder
    and names it in the OpenAPI schema: a `dict[str, Any]` answer was dumped twice, through the stdlib json, and
    had its JSON schema rebuilt per response, ~0.3 ms of the event loop's CPU for 100 candidates (issue 10)."""

    request_id: str = Field(description="the request's id in the request log (hex uuid4)")
    model: str = Field(description="the model tag that scored the request")
    user_id: int
    scenario: str
    items: list[RankedItem] = Field(description="the candidates, highest score first (ties keep request order)")
    fallback: Fallback

    @classmethod
    def ordered(
        cls, request_id: str, model: str, user_id: int, scenario: str, item_ids: list[int], scores: np.ndarray,
        order: np.ndarray, fallback_user: bool = False, fallback_items: list[int] | None = None,
    ) -> "RankResponse":  # fmt: skip
        """The answer for `item_ids` with their `scores` ([n], request order), listed in `order` (indices, [n])."""
        return cls.model_validate(
            {
                "request_id": request_id,
                "model": model,
                "user_id": user_id,
                "scenario": scenario,
                "items": [{"item_id": item_ids[k], "score": v} for k, v in zip(order.tolist(), scores[order].tolist())],
                "fallback": {"user": fallback_user, "items": fallback_items or []},
            }
        )


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    try:
        return int(raw) if raw.strip() else default
    except ValueError as exc:
        raise ValueError(f"environment variable {name} must be an integer, got '{raw}'") from exc


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "")
    try:
        return float(raw) if raw.strip() else default
    except ValueError as exc:
        raise ValueError(f"environment variable {name} must be a number, got '{raw}'") from exc


SERVING_DEFAULTS = ServingParams()  # the typed defaults (params.yaml `serving`) when the environment sets none
_METRICS: dict[str, Any] = {}
STAGE_BUCKETS = (0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 1.0)


def _metrics() -> dict[str, Any]:
    """The service's Prometheus metrics on /metrics, created once per worker (after BentoML set up multiprocess
    metrics): per-stage latency, requests and fallbacks per scenario, item-cache age (worst worker)."""
    if not _METRICS:
        import prometheus_client as pc

        _METRICS["stage"] = pc.Histogram(
            "ctrflow_rank_stage_seconds", "rank: seconds per stage (feature_read, encode, model, log)", ["stage"],
            buckets=STAGE_BUCKETS,
        )  # fmt: skip
        _METRICS["requests"] = pc.Counter("ctrflow_rank_requests", "rank: answered requests per scenario", ["scenario"])
        _METRICS["fallbacks"] = pc.Counter(
            "ctrflow_rank_fallbacks", "rank: unknown users (kind=user, per request) and items (kind=item, per candidate)",
            ["scenario", "kind"],
        )  # fmt: skip
        _METRICS["cache_age"] = pc.Gauge(
            "ctrflow_item_cache_age_seconds", "seconds since the item cache was built (largest over the workers)",
            multiprocess_mode="max",
        )  # fmt: skip
    return _METRICS


@bentoml.service(
    name="ctrflow-ranking",
    workers=_env_int("CTRFLOW_SERVING_WORKERS", SERVING_DEFAULTS.workers),
    threads=1,  # one request at a time per worker: torch runs single-threaded, scale with workers (rank: async, above)
    traffic={"timeout": 30},
)
class RankingService:
    """One worker: the model, its encoder, the Feast store and a request logger, loaded once at construction."""

    def __init__(self) -> None:
        import torch

        torch.set_num_threads(_env_int("CTRFLOW_TORCH_THREADS", SERVING_DEFAULTS.threads))
        from feast import FeatureStore

        from ctrflow import registry
        from ctrflow.request_log import RequestLogger, schema_for_spec
        from ctrflow.training.artifact import Scorer, load_model_artifact

        started = time.perf_counter()
        token_from_env()  # a token variable named but unset: refuse to start rather than serve without auth
        repo = os.environ.get("CTRFLOW_FEATURE_REPO", "")
        if not repo:
            raise RuntimeError("CTRFLOW_FEATURE_REPO is not set: point it at the applied Feast repository")
        if not os.path.exists(os.path.join(repo, "feature_store.yaml")):
            raise RuntimeError(f"CTRFLOW_FEATURE_REPO={repo}: no feature_store.yaml there (not a Feast repository)")
        name = os.environ.get("CTRFLOW_MODEL_NAME") or DEFAULT_MODEL_NAME
        tag = os.environ.get("CTRFLOW_MODEL_TAG") or registry.production_model(name)
        if not tag:
            raise RuntimeError(
                f"no model to serve: '{name}' has no production model in {registry.bentoml_home()} "
                "(promote one, or set CTRFLOW_MODEL_TAG)"
            )
        self.tag = registry.resolve_tag(tag)
        from ctrflow.fit_check import check_model_fits

        # refuse to start, naming the mismatch, when the model does not fit this feature repository
        check_model_fits(self.tag, repo, os.environ.get("CTRFLOW_FEATURE_SERVICE") or "ctr_ranking")
        loaded = load_model_artifact(registry.model_path(self.tag))
        self.scorer = Scorer(loaded.model, loaded.encoder)
        self.family = loaded.name
        spec = loaded.encoder.spec
        self.spec = spec
        self.scenarios = list(spec.scenarios)
        self.known_users = self._vocab(loaded.encoder, spec.user_key)
        self.known_items = self._vocab(loaded.encoder, spec.item_key)
        self.feature_service = os.environ.get("CTRFLOW_FEATURE_SERVICE") or "ctr_ranking"
        self.store = FeatureStore(repo_path=repo)
        # the guard checks /rank bodies against this model's scenarios, before BentoML parses them
        set_rules("/rank", RankRules(tuple(self.scenarios), MAX_CANDIDATES, request_fields(RankingService.apis["rank"])))
        from ctrflow.shadow import ShadowSlot

        # the challenger attached to this (production) model, followed while serving (ctrflow models shadow)
        self.shadow = ShadowSlot(self.tag, repo, self.feature_service, metrics=True, store=self.store)

        log_dir = os.environ.get("CTRFLOW_REQUEST_LOG", "")
        self.request_log = None
        if log_dir:
            self.request_log = RequestLogger(
                log_dir,
                column_types=schema_for_spec(spec, loaded.encoder.vocabs),
                flush_rows=_env_int("CTRFLOW_REQUEST_LOG_FLUSH_ROWS", SERVING_DEFAULTS.request_log_flush_rows),
                flush_seconds=_env_float("CTRFLOW_REQUEST_LOG_FLUSH_SECONDS", SERVING_DEFAULTS.request_log_flush_seconds),
                metrics=True,  # ctrflow_request_log_*_total on /metrics
                # off this worker's GIL by default: compaction in a thread showed as a p99 tail (ctrflow.request_log)
                compaction=os.environ.get("CTRFLOW_REQUEST_LOG_COMPACTION") or SERVING_DEFAULTS.request_log_compaction,
            )
        else:
            log.warning("CTRFLOW_REQUEST_LOG is not set: requests are not logged (drift monitoring needs them)")

        from ctrflow.online import OnlineScorer

        self.metrics = _metrics()
        # the labelled series, looked up once (a labels() call per observation cost ~5 us each, 6-8 per request)
        self._stage = {stage: self.metrics["stage"].labels(stage) for stage in ("feature_read", "encode", "model", "log")}
        self._requests = {s: self.metrics["requests"].labels(s) for s in self.scenarios}
        # item features read once, held encoded; re-read when the store is materialised again (ctrflow.online)
        self.online = OnlineScorer(
            self.store,
            self.feature_service,
            loaded.model,
            loaded.encoder,
            refresh_s=_env_float("CTRFLOW_ITEM_CACHE_REFRESH_S", SERVING_DEFAULTS.item_cache_refresh_s),
            to_arrow=self.request_log.column if self.request_log is not None else None,
            to_constant=self.request_log.constant if self.request_log is not None else None,
            on_refresh=self._cache_age,
        )
        # warm-up: one read and one score prove the feature service holds every column the model needs
        self.online.rank_scores(0, self.scenarios[0], [0])
        self._cache_age(self.online.snapshot)
        # the ~440k objects of start-up (modules, the model, the item cache) out of the collector's reach: a full
        # collection scanning them stalled a request for ~230 ms; requests' own garbage is still collected
        gc.collect()
        gc.freeze()
        log.info(
            "serving %s (%s) with features from %s, service '%s'; request log %s; ready in %.1fs",
            self.tag, self.family, repo, self.feature_service, log_dir or "off", time.perf_counter() - started,
        )

    def _cache_age(self, snapshot: Any) -> None:
        self.metrics["cache_age"].set(time.time() - snapshot.built_at)

    @staticmethod
    def _vocab(encoder: Any, column: str) -> set | None:
        """The ids the model was trained on for a key column (None when the model has no such field)."""
        for f in encoder.spec.fields:
            if f.column == column and f.name in encoder.vocabs:
                return set(encoder.vocabs[f.name])
        return None

    @bentoml.api
    async def rank(self, user_id: Int64, scenario: str, item_ids: ItemIds) -> RankResponse:
        """Order the candidate items for one user in one scenario by predicted click probability (highest first)."""
        started = time.perf_counter()  # the body was checked by the guard (scenario known, ids distinct int64)
        ranked = self.online.rank_scores(user_id, scenario, item_ids)
        scores = ranked.scores
        unknown_user = self.known_users is not None and user_id not in self.known_users
        unknown_items = [] if self.known_items is None else [i for i in item_ids if i not in self.known_items]
        order = np.argsort(-scores, kind="stable")  # stable: ties keep request order
        request_id = uuid.uuid4().hex
        latency_ms = (time.perf_counter() - started) * 1000
        t_log = time.perf_counter()
        challenger = self.shadow.shadow  # one read: a swap by the slot's watcher never splits a request
        if self.request_log is not None:
            # the challenger scores the features as served (never raises; logged only, so only when there is a log)
            shadow = {}
            if challenger is not None:
                served = self.online.log_features(ranked, user_id, item_ids, scenario)
                t_shadow = time.perf_counter()
                shadow = challenger.columns(served)
                t_log += time.perf_counter() - t_shadow  # its scoring is not the log stage's cost
            rank_of = np.empty(len(item_ids), dtype=np.int32)
            rank_of[order] = np.arange(1, len(item_ids) + 1, dtype=np.int32)
            unknown = set(unknown_items)
            ts_us = time.time_ns() // 1000
            self.request_log.log_ranked(
                request_id=request_id,
                user_id=user_id,
                scenario=scenario,
                model=self.tag,
                item_ids=item_ids,
                predictions=scores,
                features=self.online.log_values(ranked, ts_us),
                items=self.online.log_items(ranked),
                columns=self.online.log_order,
                extra={
                    "rank": rank_of,
                    "fallback_user": unknown_user,
                    "fallback_item": np.fromiter((i in unknown for i in item_ids), dtype=bool, count=len(item_ids))
                    if unknown
                    else np.zeros(len(item_ids), dtype=bool),
                    "latency_ms": latency_ms,
                    **shadow,
                },
                ts_us=ts_us,
            )
        m = self.metrics
        for stage, seconds in ranked.timings.items():
            self._stage[stage].observe(seconds)
        self._stage["log"].observe(time.perf_counter() - t_log)
        self._requests[scenario].inc()
        if unknown_user:
            m["fallbacks"].labels(scenario, "user").inc()
        if unknown_items:
            m["fallbacks"].labels(scenario, "item").inc(len(unknown_items))
        self._cache_age(ranked.snapshot)
        return RankResponse.ordered(
            request_id, self.tag, user_id, scenario, item_ids, scores, order, unknown_user, unknown_items
        )

    @bentoml.on_shutdown
    def close(self) -> None:
        """Stop the item-cache refresh and the challenger's watcher, flush the request log before the worker exits."""
        self.online.close()
        self.shadow.close()
        if self.request_log is not None:
            self.request_log.close()


RankingService.add_asgi_middleware(ServiceGuard)  # settings read from the worker's environment when it starts
