"""The floor of the serving benchmark (`endpoint: bare`): a BentoML endpoint with the ranking service's request and
answer shapes that scores the same model on tensors built once at start, so a request costs HTTP, validation,
JSON, the forward pass and the sort, and nothing of features, encoding or the request log.

    bentoml serve benchmarks.bare_service:BareService      (environment: as serving/service.py, plus
                                                            CTRFLOW_BARE_CANDIDATES, the pre-built batch's rows)

Used only by `benchmarks/serving.py`; never deployed.
"""

import os

import bentoml
import numpy as np

from serving.service import SERVING_DEFAULTS, Int64, ItemIds, RankResponse, _env_int


@bentoml.service(name="ctrflow-bare", workers=_env_int("CTRFLOW_SERVING_WORKERS", SERVING_DEFAULTS.workers), threads=1, traffic={"timeout": 30})
class BareService:
    """The model and one pre-built batch of CTRFLOW_BARE_CANDIDATES candidates (a known user, the first item ids of
    the model's vocabulary, the first scenario), read from the online store once at start."""

    def __init__(self) -> None:
        import torch
        from feast import FeatureStore

        from ctrflow import features, registry
        from ctrflow.models.base import to_tensors
        from ctrflow.training.artifact import load_model_artifact

        torch.set_num_threads(_env_int("CTRFLOW_TORCH_THREADS", SERVING_DEFAULTS.threads))
        name = os.environ.get("CTRFLOW_MODEL_NAME") or "ctrflow-ranker"
        tag = registry.resolve_tag(os.environ.get("CTRFLOW_MODEL_TAG") or registry.production_model(name))
        loaded = load_model_artifact(registry.model_path(tag))
        self.model, self.tag = loaded.model.eval(), tag
        spec = loaded.encoder.spec
        vocab = lambda column: next(loaded.encoder.vocabs[f.name] for f in spec.fields if f.column == column)  # noqa: E731
        n = _env_int("CTRFLOW_BARE_CANDIDATES", 100)
        store = FeatureStore(repo_path=os.environ["CTRFLOW_FEATURE_REPO"])
        frame = features.online_frame(
            store, int(vocab(spec.user_key)[0]), [int(i) for i in vocab(spec.item_key)[:n]], spec.scenarios[0],
            service=os.environ.get("CTRFLOW_FEATURE_SERVICE") or "ctr_ranking",
        )  # fmt: skip
        self.batch = to_tensors(loaded.encoder.transform(frame, with_label=False))
        self.rows = len(frame)

    @bentoml.api
    async def rank(self, user_id: Int64, scenario: str, item_ids: ItemIds) -> RankResponse:
        """The pre-built batch's first len(item_ids) rows scored; answered in the ranking service's shape, and run
        as it is (async, on the event loop) so that the two differ only by features, encoding and the log."""
        import torch

        n = min(len(item_ids), self.rows)
        with torch.inference_mode():
            scores = torch.sigmoid(self.model({k: v[:n] for k, v in self.batch.items()})).numpy()
        order = np.argsort(-scores, kind="stable")  # as the ranking service sorts, and the same answer type
        return RankResponse.ordered("", self.tag, user_id, scenario, item_ids, scores, order)

    @bentoml.api(batchable=True, max_batch_size=32, max_latency_ms=10)
    def rank_batched(self, item_counts: list[int]) -> list[list[float]]:
        """Adaptive batching (the experiment of `endpoint: bare-batched`): BentoML merges concurrent requests'
        lists; one forward pass scores every merged request's first n rows of the pre-built batch (n: its entry)."""
        import torch

        sizes = [min(int(n), self.rows) for n in item_counts]
        index = torch.cat([torch.arange(n) for n in sizes])
        with torch.inference_mode():
            scores = torch.sigmoid(self.model({k: v.index_select(0, index) for k, v in self.batch.items()})).numpy()
        out, start = [], 0
        for n in sizes:
            out.append(sorted(scores[start : start + n].tolist(), reverse=True))
            start += n
        return out
