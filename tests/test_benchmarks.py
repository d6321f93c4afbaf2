"""Benchmark plumbing: the Criteo-shaped set is what the speed table says it is, results merge by key, and
`--resume` skips runs already recorded (the heavy runs themselves live in benchmarks/, not here)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from benchmarks import serving, train_speed
from benchmarks.harness import Experiment, merge_records, run_experiments


def test_criteo_shaped_set_has_39_fields_and_about_a_million_embedding_rows() -> None:
    encoder, arrays = train_speed.criteo_shaped(2000)
    fields = list(encoder.spec.fields)
    assert len(fields) == 39
    assert sum(f.kind.value == "numeric" for f in fields) == 13
    total = sum(encoder.vocab_size(f.name) for f in fields)
    assert 0.95e6 < total < 1.05e6
    large = {f.name for f in fields if f.large}
    assert large == {f.name for f in fields if encoder.vocab_size(f.name) > train_speed.LARGE_FIELD} and large
    for f in fields:  # every id inside its table, 0 (unknown) never drawn
        ids = arrays[f.name]
        assert ids.min() >= 1 and ids.max() < encoder.vocab_size(f.name), f.name
    assert 0.05 < arrays["label"].mean() < 0.6


def test_multiscenario_models_are_skipped_where_there_is_no_scenario_field() -> None:
    encoder, _ = train_speed.criteo_shaped(100)
    assert encoder.spec.scenario_field not in encoder.vocabs
    assert {"star", "gsvr-star", "sharedbottom", "gsvr-ple"} <= set(train_speed.MODELS)


def test_speed_merge_replaces_only_the_same_key(tmp_path) -> None:
    path = tmp_path / "train_speed.json"
    a = {"dataset": "d", "model": "deepfm", "impl": "ctrflow", "sparse": False, "phase": "train", "samples_per_s": 1}
    b = {**a, "model": "lr"}
    merge_records([a, b], path, train_speed.KEY)
    merged = merge_records([{**a, "samples_per_s": 2}], path, train_speed.KEY)
    assert sorted((r["model"], r["samples_per_s"]) for r in merged) == [("deepfm", 2), ("lr", 1)]


def _models_md(records: list[dict]) -> str:
    return "\n".join(sorted(r["model"] for r in records))


def _merge_many(path: str, worker: int, n: int) -> None:
    for i in range(n):
        merge_records([{"dataset": "d", "model": f"m{worker}-{i}", "impl": "x", "sparse": False, "phase": "train"}],
                      Path(path), train_speed.KEY, render=_models_md)  # fmt: skip


def test_merges_from_processes_side_by_side_lose_no_record(tmp_path) -> None:
    """Grids run side by side merge into one results file: every record of every process is kept, and the file
    is whole JSON at the end (it was read-modify-written unlocked, and written in place)."""
    import multiprocessing

    path = tmp_path / "quality.json"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_merge_many, args=(str(path), w, 30)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    models = sorted(r["model"] for r in json.loads(path.read_text()))
    assert models == sorted(f"m{w}-{i}" for w in range(4) for i in range(30))
    # the table is rendered under the same lock: the last one written shows every record, not a stale subset
    assert (tmp_path / "quality.md").read_text() == "\n".join(models)
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary file left behind


@pytest.mark.parametrize("damage", ['[{"model": "a"', '{"model": "a"}'])
def test_a_damaged_results_file_is_set_aside_and_the_new_records_kept(tmp_path, damage: str) -> None:
    path = tmp_path / "quality.json"
    path.write_text(damage)
    merged = merge_records([{"model": "new"}], path, ("model",), render=_models_md)
    assert merged == [{"model": "new"}] and json.loads(path.read_text()) == merged
    assert (tmp_path / "quality.md").read_text() == "new"
    aside = list(tmp_path.glob("quality.json.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_text() == damage  # the old bytes are kept for a person to look at


def test_serving_merge_keeps_other_models(tmp_path) -> None:
    path = tmp_path / "serving.json"
    dcn = {"model": "dcnv2", "candidates": 100, "concurrency": 1, "p50_ms": 10, "p99_ms": 20, "requests": 9,
           "errors": 0, "rps": 90.0, "bare_model_p50_ms": 2.0, "logged_requests": 9}  # fmt: skip
    dmae = {**dcn, "model": "dmae", "p50_ms": 30}
    path.write_text(json.dumps([dcn, dmae]))
    merged = merge_records([{**dmae, "p50_ms": 25}], path, serving.KEY)
    assert sorted((r["model"], r["p50_ms"]) for r in merged) == [("dcnv2", 10), ("dmae", 25)]
    assert "| dmae |" in serving.render(merged)


def test_serving_redis_repo_swaps_only_the_online_store(tmp_path) -> None:
    """--online-stores redis: the copy of a run's repo keeps its definitions, file registry and DuckDB offline store;
    its online store is the production profile's Redis block verbatim; no data, registry or marker is copied."""
    import yaml

    from ctrflow import features

    run_repo = features.copy_repo(tmp_path / "run" / "feature_repo")
    (run_repo / "data").mkdir()
    (run_repo / "data" / "online_store.db").write_bytes(b"x")
    (run_repo / features.MATERIALIZED_FILE).write_text("{}")
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "stale.txt").write_text("from an earlier run")  # replaced, not merged into

    repo = serving.redis_repo(run_repo, tmp_path / "bench")
    config = yaml.safe_load((repo / "feature_store.yaml").read_text())
    run_config = yaml.safe_load((run_repo / "feature_store.yaml").read_text())
    assert config["online_store"] == {"type": "redis", "connection_string": "${CTRFLOW_REDIS}"}
    assert config["registry"] == run_config["registry"] == "data/registry.db"
    assert config["offline_store"] == run_config["offline_store"]
    assert sorted(p.name for p in repo.glob("*.py")) == sorted(p.name for p in run_repo.glob("*.py"))
    assert not (repo / "data").exists() and not (repo / features.MATERIALIZED_FILE).exists()
    assert not (repo / "stale.txt").exists()


def test_serving_online_store_is_a_key_and_a_column(tmp_path) -> None:
    path = tmp_path / "serving.json"
    row = {"model": "dcnv2", "endpoint": "rank", "workers": 2, "candidates": 100, "concurrency": 8, "p50_ms": 10,
           "p99_ms": 20, "requests": 9, "answered": 9, "errors": 0, "rps": 90.0, "bare_model_p50_ms": 2.0,
           "logged_requests": 9, "online_store": "sqlite", "run": "r1"}  # fmt: skip
    path.write_text(json.dumps([row]))
    merged = merge_records([{**row, "online_store": "redis", "p50_ms": 12}], path, serving.KEY)
    assert sorted((r["online_store"], r["p50_ms"]) for r in merged) == [("redis", 12), ("sqlite", 10)]
    md = serving.render(merged)
    assert "| online store |" in md and "| rank | redis | 2 |" in md and "| rank | sqlite | 2 |" in md
    assert "**dcnv2**, redis" in md and "**dcnv2**, sqlite" in md  # targets per store


def test_serving_targets_are_judged_on_the_median_of_alternated_repeats() -> None:
    """`--repeats 3`: rank and bare alternated three times in one run; the c=8 ratio pairs each rank repeat with the
    bare one measured beside it, and the verdicts take the medians (hand-computed: ratios 0.75, 0.85, 0.90 -> 0.85;
    c=1 p99 9, 12, 8 -> 9)."""
    base = {"model": "dcnv2", "workers": 2, "candidates": 100, "p50_ms": 1, "requests": 9, "answered": 9, "errors": 0,
            "bare_model_p50_ms": 2.0, "logged_requests": 9, "online_store": "sqlite", "run": "r1"}  # fmt: skip
    records = []
    for k, (rank_rps, bare_rps, p99) in enumerate([(300.0, 400.0, 9.0), (340.0, 400.0, 12.0), (360.0, 400.0, 8.0)]):
        records += [
            {**base, "endpoint": "rank", "concurrency": 8, "rps": rank_rps, "p99_ms": 30, "repeat": k},
            {**base, "endpoint": "bare", "concurrency": 8, "rps": bare_rps, "p99_ms": 30, "repeat": k},
            {**base, "endpoint": "rank", "concurrency": 1, "rps": 100.0, "p99_ms": p99, "repeat": k},
        ]
    line = next(t for t in serving.targets(records) if "**dcnv2**" in t)
    assert "c=8, 2 workers: rank / bare rps = 0.85x (median of 3 repeats: 0.75, 0.85, 0.90) (target >= 0.8: met)" in line
    assert "c=1, 2 worker(s): p99 9.00 ms (median of 3 repeats: 9.00, 12.00, 8.00) (target <= 10: met)" in line
    assert "| r1 #2 |" in serving.render(records) and "| r1 #3 |" in serving.render(records)


def test_resume_skips_recorded_runs(tmp_path) -> None:
    calls: list[tuple[str, int]] = []

    def make(variant: str) -> Experiment:
        def run(ctx, seed: int) -> dict:
            calls.append((variant, seed))
            auc = 0.5 + seed / 100
            return {"auc": auc, "gauc": auc, "logloss": 0.6, "scenario_auc": {"s": auc}, "cold_item_auc": auc,
                    "epochs": 1, "train_seconds": 1.0}  # fmt: skip

        return Experiment(model="m", variant=variant, run=run)

    ctx = SimpleNamespace(dataset=SimpleNamespace(name="ml-100k"), split="random")
    run_experiments([make("a")], ctx, [0, 1], tmp_path, progress=False)
    assert calls == [("a", 0), ("a", 1)]
    run_experiments([make("a"), make("b")], ctx, [0, 1, 2], tmp_path, progress=False, resume=True)
    assert calls[2:] == [("a", 2), ("b", 0), ("b", 1), ("b", 2)]
    records = json.loads((tmp_path / "quality.json").read_text())
    assert len(records) == 6 and np.isclose(min(r["auc"] for r in records), 0.5)
    assert (tmp_path / "quality.md").exists()


def test_filters_that_select_nothing_are_an_error_before_any_data_is_loaded(tmp_path) -> None:
    from benchmarks import quality

    with pytest.raises(SystemExit, match="select no experiment"):
        quality.main(["--suite", "dgenctr", "--only", "no-such-variant", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):  # argparse: not a protocol
        quality.main(["--suite", "dgenctr", "--protocols", "scarce", "--out", str(tmp_path)])
    assert not list(tmp_path.iterdir())


def test_scale_results_merge_by_dataset_and_step_and_render_a_plot(tmp_path) -> None:
    from benchmarks import scale
    from benchmarks.measure import measure

    def rec(dataset: str, rows: int, step: str, seconds: float) -> dict:
        return {"dataset": dataset, "rows": rows, "step": step, "seconds": seconds, "peak_rss_mb": 100.0 + rows / 1e4,
                "cpu_seconds": seconds, "rc": 0, "killed": None, "rows_per_s": round(rows / seconds),
                "s_per_million_rows": round(seconds / rows * 1e6, 2), "meter_lines": []}

    path = tmp_path / "scale.json"
    scale.merge([rec("syn-100k", 100_000, "features", 2.0), rec("syn-1m", 1_000_000, "features", 20.0)], path)
    merged = scale.merge([rec("syn-100k", 100_000, "features", 3.0), {**rec("syn-100k", 100_000, "train", 5.0), "test_auc": 0.7123}], path)
    assert [(r["dataset"], r["step"], r["seconds"]) for r in merged] == [
        ("syn-100k", "features", 3.0), ("syn-100k", "train", 5.0), ("syn-1m", "features", 20.0)
    ]
    scale.render(merged, tmp_path / "scale.md", tmp_path / "scale.png")
    md = (tmp_path / "scale.md").read_text()
    assert "![time and memory against rows](scale.png)" in md
    assert "| syn-1m | 1,000,000 | features | 20.0 | 20.0 | 50000 | 200 | 20.0 | 20.0 | ok | - |  |" in md
    assert "| syn-100k | 100,000 | train | 5.0 | 50.0 | 20000 | 110 | 5.0 | 50.0 | ok | - | 0.7123 |" in md
    assert (tmp_path / "scale.png").read_bytes()[:4] == b"\x89PNG"
    # issue 9's target, 10M against 1M: 15 s / 1M rows against 20 (0.75x) and 1,100 MB meets it; 40 s / 1M (2x) does not
    target = scale.target_lines([*merged, rec("syn-10m", 10_000_000, "features", 150.0)])
    assert "| features | 20.0 | 15.0 | 0.75 | 0.75 | 1,100 | yes |" in target
    assert "| train | - | - | - | - | - | not measured |" in target
    assert "| features | 20.0 | 40.0 | 2.00 | 2.00 | 1,100 | no |" in scale.target_lines([*merged, rec("syn-10m", 10_000_000, "features", 400.0)])
    # the measuring wrapper kills a command over its memory limit and says so
    hog = ["python3", "-c", "import time; b = bytearray(300 * 2**20); time.sleep(30)"]
    result = measure(hog, limit_s=20, limit_mb=100, interval=0.05)
    assert result["killed"] == "memory" and result["rc"] != 0


def test_offline_engines_parquet_equal_sees_every_cell_and_merge_replaces_by_engine_and_rows(tmp_path) -> None:
    import pandas as pd

    from benchmarks import offline_engines

    a = pd.DataFrame({"u": range(5), "hist": [[1, 2], [], [3], [4], [5, 6]], "cat": ["x", None, "y", "z", "w"]})
    a.to_parquet(tmp_path / "a.parquet", index=False)
    a.to_parquet(tmp_path / "same.parquet", index=False)
    assert offline_engines.parquet_equal(tmp_path / "a.parquet", tmp_path / "same.parquet", batch_rows=2)
    for change in ({"hist": (4, [5, 7])}, {"cat": (1, "")}):  # a list value in the last batch; null vs empty string
        b = a.copy()
        (column, (row, value)), = change.items()
        b.at[row, column] = value
        b.to_parquet(tmp_path / "b.parquet", index=False)
        assert not offline_engines.parquet_equal(tmp_path / "a.parquet", tmp_path / "b.parquet", batch_rows=2)
    a.iloc[:4].to_parquet(tmp_path / "short.parquet", index=False)
    assert not offline_engines.parquet_equal(tmp_path / "a.parquet", tmp_path / "short.parquet")
    a.astype({"u": "float64"}).to_parquet(tmp_path / "typed.parquet", index=False)
    assert not offline_engines.parquet_equal(tmp_path / "a.parquet", tmp_path / "typed.parquet")
    path = tmp_path / "offline_engines.json"
    path.write_text(json.dumps([{"engine": "spark", "rows": 10, "join_s": 9}, {"engine": "duckdb", "rows": 10, "join_s": 1}]))
    merged = offline_engines.merge([{"engine": "spark", "rows": 10, "join_s": 5, "status": "ok"}], path)
    assert [(r["engine"], r["join_s"]) for r in merged] == [("duckdb", 1), ("spark", 5)]
    assert "| 10 | spark |  | ok |" in offline_engines.render(merged)


def _speed_record(impl: str, speed: float, **extra) -> dict:
    return {"dataset": "ml-1m", "model": "deepfm", "impl": impl, "phase": "train", "samples_per_s": speed,
            "peak_rss_mb": 1.0, "threads": 2, "batch_size": 4096, "rows": 40960, "epoch_rows": 800167,
            "run": "r1", "load": "9.1-9.8", **extra}  # fmt: skip


def test_speed_table_compares_with_each_reference_and_gives_seconds_per_epoch() -> None:
    records = [
        _speed_record("deepctr-torch", 1000.0),
        _speed_record("fuxictr", 2000.0),
        _speed_record("ctrflow", 4000.0, sparse=False, cpu_samples_per_s=8000.0),
    ]
    assert train_speed.ratios(records, "ml-1m")["train"] == 4.0
    assert train_speed.ratios(records, "ml-1m", train_speed.FUXICTR)["train"] == 2.0
    md = train_speed.render_markdown(records)
    assert "vs deepctr-torch DeepFM, training throughput: **4.00×**" in md
    assert "vs fuxictr DeepFM, training throughput: **2.00×**" in md
    assert "| deepfm | ctrflow | dense | 2 | 40,960 | 4,000 | 200 | 8,000 |" in md  # 800,167 rows / 4,000 per s
    assert "7-11 s per epoch on a V100" in md


def test_fuxictr_preprocessing_stand_in_raises_when_used(monkeypatch) -> None:
    """Without ray, FuxiCTR's preprocessing package is replaced by one whose only member its layers import raises."""
    import importlib.util
    import sys

    if importlib.util.find_spec("ray") is not None:
        pytest.skip("ray is installed: FuxiCTR's own preprocessing is used")
    monkeypatch.delitem(sys.modules, "fuxictr.preprocess", raising=False)
    monkeypatch.delitem(sys.modules, "fuxictr.preprocess.tokenizer", raising=False)
    try:
        train_speed._fuxictr_imports()
        load_pretrain_emb = sys.modules["fuxictr.preprocess.tokenizer"].load_pretrain_emb
        with pytest.raises(RuntimeError, match="needs ray"):
            load_pretrain_emb("x")
    finally:
        sys.modules.pop("fuxictr.preprocess", None)
        sys.modules.pop("fuxictr.preprocess.tokenizer", None)


def test_gsvr_suite_cuts_the_posterior_fields_to_the_datas_spec(caplog) -> None:
    """ml-1m-swr's published fields have no behaviour sequence: GSVR's posterior (params: hist_item_ids) read a field
    the spec lacks and the suite failed with a KeyError; it now reads the fields the spec has, and says so."""
    from benchmarks.suites.gsvr import fit_to_spec

    spec = SimpleNamespace(fields=[SimpleNamespace(name=n) for n in ("user_id", "item_id", "scenario", "age")])
    params = {"user_posterior_fields": ["hist_item_ids", "age"], "prior": "global"}
    with caplog.at_level("WARNING"):
        fitted = fit_to_spec(params, spec)
    assert fitted == {"user_posterior_fields": ["age"], "prior": "global"} and params["user_posterior_fields"] == ["hist_item_ids", "age"]
    assert "hist_item_ids" in caplog.text
    full = SimpleNamespace(fields=[*spec.fields, SimpleNamespace(name="hist_item_ids")])
    assert fit_to_spec(params, full) is params


def test_every_gsvr_suite_variant_is_a_valid_params_override() -> None:
    """Each variant the suite runs is a named option of params.yaml's models.gsvr (a typo would train the default)."""
    from benchmarks.suites.gsvr import BACKBONES, VARIANTS
    from ctrflow.config import load_params
    from ctrflow.training.recipe import model_params

    params = load_params()
    variants = {variant: overrides for _, variant, overrides in VARIANTS if overrides is not None}
    assert {"std-normal-prior", "full", "beta-0.1", "moment-kl"} <= set(variants)
    for overrides in variants.values():
        for backbone in BACKBONES:
            mparams = model_params(params, "gsvr", backbone, **overrides)
            assert all(mparams[k] == v for k, v in overrides.items()) and set(overrides) <= set(params["models"]["gsvr"])


def test_every_dmae_suite_variant_is_a_valid_params_override() -> None:
    """The DMAE suite's variants, the two changes tried on ML-1M included, each set keys of models.dmae (or of the
    baseline's own section) to a value different from the default, so no variant silently trains the default."""
    from benchmarks.suites.dmae import VARIANTS
    from ctrflow.config import load_params

    params = load_params()["models"]
    names = {variant for _, variant, _, _ in VARIANTS}
    assert {"no-calibration", "dist-weight-1", "no-decoder", "no-mifu", "full"} <= names
    for _, variant, registry_name, overrides in VARIANTS:
        section = params.get(registry_name) or {}
        assert set(overrides) <= set(section), (variant, set(overrides) - set(section))
        assert all(section[k] != v for k, v in overrides.items()), variant


def test_an_experiment_that_does_not_apply_to_the_data_is_skipped_not_fatal(tmp_path, caplog) -> None:
    """The baselines suite on ml-1m-swr (fields without a behaviour sequence) ran LR, DeepFM and DCNv2, then died on
    DIN with a ValueError. DIN now says why it cannot run there; the harness skips it and runs the rest."""
    from benchmarks.suites.baselines import model_experiment
    from ctrflow.data.spec import Entity, FeatureSpec, FieldKind, FieldSpec

    fields = [FieldSpec("user_id", FieldKind.CATEGORICAL, Entity.USER), FieldSpec("item_id", FieldKind.CATEGORICAL, Entity.ITEM)]
    no_sequence = FeatureSpec(fields=fields, scenarios=["a"])
    ctx = SimpleNamespace(dataset=SimpleNamespace(name="ml-1m-swr"), split="random", encoder=SimpleNamespace(spec=no_sequence))
    din = model_experiment("din")
    assert "behaviour sequence 'hist_item_ids'" in din.not_applicable(ctx)
    assert model_experiment("deepfm").not_applicable(ctx) is None
    calls = []

    def run(ctx, seed: int) -> dict:
        calls.append(seed)
        return {"auc": 0.7, "gauc": 0.7, "logloss": 0.6, "scenario_auc": {}, "cold_item_auc": 0.7, "epochs": 1, "train_seconds": 1.0}

    runnable = Experiment(model="deepfm", variant="full", run=run)
    with caplog.at_level("WARNING"):
        records = run_experiments([runnable, din], ctx, [0, 1], tmp_path, progress=False)
    assert calls == [0, 1] and [r["model"] for r in records] == ["deepfm", "deepfm"]
    assert "din/full on ml-1m-swr: not run" in caplog.text


def test_label_scarce_protocols_keep_10_and_1_percent_of_the_labels_seeded(monkeypatch) -> None:
    """Issue 12: DGenCTR is fine-tuned (and the baselines trained) on 10% and on 1% of the training labels. Each
    protocol names its fraction in its records; the subsets are seeded (same seed, same rows; another seed, other
    rows) and hold round(n x fraction) distinct rows."""
    import torch

    from benchmarks.suites import dgenctr

    exps = dgenctr.experiments(SimpleNamespace())
    by_protocol: dict[str, set[str]] = {}
    for e in exps:
        by_protocol.setdefault(e.protocol, set()).add(f"{e.model}/{e.variant}")
        if e.protocol.startswith("label-scarce"):
            assert e.extra["label_fraction"] == dgenctr.SCARCE_FRACTIONS[e.protocol]
    assert {"dgenctr/full", "dgenctr/no-pretrain", "deepfm/full"} <= by_protocol["label-scarce-1pct"]
    assert {"dgenctr/full", "dgenctr/no-pretrain", "deepfm/full"} <= by_protocol["label-scarce"]

    # $DGENCTR_ABLATION_PROTOCOLS set but empty: no ablation at all (it was refused as an unknown protocol '')
    monkeypatch.setenv("DGENCTR_ABLATION_PROTOCOLS", "")
    plain = {(e.protocol, f"{e.model}/{e.variant}") for e in dgenctr.experiments(SimpleNamespace())}
    assert not {v for _, v in plain} & {"dgenctr/emb-only-transfer", "dgenctr/long-pretrain", "dgenctr/finetune-lr-3e-4"}
    assert ("label-scarce-1pct", "dgenctr/full") in plain and ("standard", "dgenctr/full") in plain

    n = 12_345
    ctx = SimpleNamespace(dataset=SimpleNamespace(name="t"), split="random", split_seed=0, tensors={"train": {"label": torch.zeros(n)}})
    one = dgenctr.label_subset(ctx, 0, 0.01)
    assert len(one) == 123 and len(set(one.tolist())) == 123 and one.tolist() == sorted(one.tolist())
    assert torch.equal(one, dgenctr.label_subset(ctx, 0, 0.01)) and not torch.equal(one, dgenctr.label_subset(ctx, 1, 0.01))
    assert len(dgenctr.label_subset(ctx, 0, 0.1)) == 1234
    assert len(dgenctr.scarce_train(ctx, 0, 0.01)["label"]) == 123
