"""Shadow serving outside the server: attaching a challenger in a real BentoML store and stage ledger, promoting it in
one step, the CLI commands, and the challenger scorer's failure handling (the HTTP side: test_guarded_serving.py)."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import numpy as np
import pyarrow as pa
import pytest
import torch
from click.testing import CliRunner

from ctrflow import registry
from ctrflow.cli import cli

NAME = "ctrflow-shadowtest"
DATASET = "shadowdata"


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, tiny_dataset, tiny_frame):
    from ctrflow.data.encoding import FeatureEncoder
    from ctrflow.models import build_model
    from ctrflow.training.artifact import save_model_artifact

    torch.set_num_threads(1)
    torch.manual_seed(0)
    encoder = FeatureEncoder(tiny_dataset.spec).fit(tiny_frame)
    model = build_model("dcnv2", encoder, {"embedding_dim": 4, "cross_layers": 1, "mlp": [8]})
    path = tmp_path_factory.mktemp("artifact") / "model"
    return save_model_artifact(path, model, encoder, {"valid": {"auc": 0.5}}, {"model": "dcnv2"})


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "bentoml"))
    monkeypatch.setenv("CTRFLOW_USER", "tester")
    return tmp_path / "bentoml"


def _register(artifact, tiny_dataset, valid_auc: float = 0.7, dataset: str = DATASET) -> str:
    spec = dataclasses.replace(tiny_dataset.spec, extra={"dataset": dataset})
    return registry.register_model(
        artifact, NAME, metrics={"valid": {"auc": valid_auc}}, params={"model": "dcnv2"}, feature_spec=spec,
        data_fingerprint="sha256:x", code_version="c0ffee",
    )  # fmt: skip


def test_attach_needs_a_production_model_and_a_candidate_of_its_data_set(home, artifact, tiny_dataset):
    champion = _register(artifact, tiny_dataset)
    challenger = _register(artifact, tiny_dataset)
    with pytest.raises(registry.RegistryError, match="no production model"):
        registry.attach_shadow(challenger)
    registry.promote(champion, reason="first", force=True)
    with pytest.raises(registry.RegistryError, match="production: only a candidate"):
        registry.attach_shadow(champion)
    other = _register(artifact, tiny_dataset, dataset="elsewhere")
    with pytest.raises(registry.RegistryError, match="data set 'elsewhere'"):
        registry.attach_shadow(other)
    archived = _register(artifact, tiny_dataset)
    registry.archive(archived, reason="old")
    with pytest.raises(registry.RegistryError, match="archived"):
        registry.attach_shadow(archived)
    assert registry.shadow_model(NAME) is None

    record = registry.attach_shadow(challenger, reason="try it online")
    assert (record["tag"], record["champion"], record["replaced"]) == (challenger, champion, None)
    assert registry.shadow_model(NAME) == challenger
    assert registry.stage(challenger) == registry.CANDIDATE  # shadowing does not change the stage
    roles = {r["tag"]: r["role"] for r in registry.list_models(NAME)}
    assert roles[champion] == "champion" and roles[challenger] == "challenger" and roles[other] == ""
    assert registry.check_consistency() == []

    second = _register(artifact, tiny_dataset)
    assert registry.attach_shadow(second)["replaced"] == challenger  # one challenger per name
    registry.archive(second, reason="not needed")  # an archived model is no challenger
    assert registry.shadow_model(NAME) is None
    assert registry.detach_shadow(NAME) is None
    assert [h["action"] for h in registry.history(NAME) if h["action"] in ("shadow", "unshadow")] == ["shadow", "shadow"]


def test_promote_challenger_is_one_step_and_honours_the_gate(home, artifact, tiny_dataset):
    champion = _register(artifact, tiny_dataset, valid_auc=0.70)
    challenger = _register(artifact, tiny_dataset, valid_auc=0.72)
    registry.promote(champion, reason="first", force=True)
    with pytest.raises(registry.RegistryError, match="no challenger attached"):
        registry.promote_challenger(NAME, reason="x")
    registry.attach_shadow(challenger)
    with pytest.raises(registry.PromotionError, match="no gate decision"):
        registry.promote_challenger(NAME, reason="x")
    assert registry.shadow_model(NAME) == challenger and registry.production_model(NAME) == champion  # nothing changed

    assert registry.gate(challenger, tolerance=0.0, reference_model=None).passed  # 0.72 >= 0.70
    record = registry.promote_challenger(NAME, reason="better online AUC")
    assert record["tag"] == challenger and record["replaced"] == champion
    assert record["reason"] == "challenger promoted: better online AUC"
    assert registry.production_model(NAME) == challenger
    assert registry.stage(champion) == registry.ARCHIVED
    assert registry.shadow_model(NAME) is None  # the slot is freed in the same ledger write
    assert registry.check_consistency() == []
    assert registry.rollback(NAME, reason="undo") == champion  # the usual way back


def test_cli_shadow_list_and_promote_challenger(home, artifact, tiny_dataset, tmp_path):
    champion = _register(artifact, tiny_dataset, valid_auc=0.70)
    challenger = _register(artifact, tiny_dataset, valid_auc=0.60)
    registry.promote(champion, reason="first", force=True)
    runner = CliRunner()
    out = runner.invoke(cli, ["models", "shadow", challenger])
    assert out.exit_code == 0, out.output
    assert f"{challenger} now shadows {champion}" in out.output

    listed = runner.invoke(cli, ["models", "list"])
    assert listed.exit_code == 0, listed.output
    header, *rows = listed.output.splitlines()
    assert header.split()[:5] == ["tag", "dataset", "family", "stage", "role"]
    by_tag = {r.split()[0]: r.split() for r in rows}
    assert by_tag[champion][1:5] == [DATASET, "dcnv2", "production", "champion"]
    assert by_tag[challenger][1:5] == [DATASET, "dcnv2", "candidate", "challenger"]

    out = runner.invoke(cli, ["models", "unshadow"])  # the only name with a challenger
    assert out.exit_code == 0 and f"{challenger} no longer shadows" in out.output and registry.shadow_model(NAME) is None
    assert runner.invoke(cli, ["models", "shadow", challenger]).exit_code == 0

    deployment = tmp_path / "deployment.json"
    deployment.write_text(json.dumps({"model_tag": champion, "feature_repo": "/repo"}))
    registry.gate(challenger, tolerance=0.0, reference_model=None)  # 0.60 < 0.70: fails
    refused = runner.invoke(cli, ["models", "promote-challenger", "--deployment", str(deployment)])
    assert refused.exit_code == 1 and "promotion gate failed" in refused.output and "--force" in refused.output
    assert json.loads(deployment.read_text())["model_tag"] == champion

    forced = runner.invoke(cli, ["models", "promote-challenger", "--force", "--reason", "online CTR +3%", "--deployment", str(deployment)])
    assert forced.exit_code == 0, forced.output
    assert registry.production_model(NAME) == challenger
    assert json.loads(deployment.read_text()) == {"model_tag": challenger, "feature_repo": "/repo"}
    last = registry.history(NAME)[-1]
    assert last["forced"] is True and last["reason"] == "challenger promoted: online CTR +3%"
    assert runner.invoke(cli, ["models", "promote-challenger"]).exit_code == 2  # no challenger left: say which name


# ---- the challenger scorer --------------------------------------------------------------------------------------------
def test_a_diverged_challenger_gives_null_scores_never_an_error(artifact, tiny_frame):
    from ctrflow.shadow import Shadow
    from ctrflow.training.artifact import Scorer, load_model_artifact

    loaded = load_model_artifact(artifact)
    frame = tiny_frame.head(4).drop(columns="label").reset_index(drop=True)
    good = Shadow("m:good", Scorer(loaded.model, loaded.encoder))
    np.testing.assert_allclose(good.scores(frame), Scorer(loaded.model, loaded.encoder).score(frame))
    assert good.columns(frame)["shadow_model"] == "m:good" and good.stats() == {"scored": 2, "failures": 0}
    as_logged = pa.Table.from_pandas(frame, preserve_index=False)  # the request log's form of the served features
    np.testing.assert_allclose(good.scores(as_logged), good.scores(frame), rtol=1e-6)

    broken = load_model_artifact(artifact)
    with torch.no_grad():
        for p in broken.model.parameters():
            p.fill_(math.nan)  # a diverged challenger: every score NaN
    bad = Shadow("m:bad", Scorer(broken.model, broken.encoder))
    assert bad.columns(frame) == {"shadow_model": "m:bad", "shadow_score": [None] * 4}
    assert bad.columns(frame.drop(columns=["user_id"]))["shadow_score"] == [None] * 4  # a missing column
    assert bad.stats() == {"scored": 0, "failures": 2}
    assert good.stats() == {"scored": 4, "failures": 0}


def test_the_slot_follows_the_registry_and_survives_a_challenger_that_cannot_load(home, artifact, tiny_dataset, tmp_path):
    from ctrflow.shadow import ShadowSlot

    champion = _register(artifact, tiny_dataset)
    challenger = _register(artifact, tiny_dataset)
    registry.promote(champion, reason="first", force=True)
    slot = ShadowSlot(champion, tmp_path / "repo", "ctr_ranking", refresh_s=0)
    assert slot.shadow is None and slot.columns(None) == {}  # none attached
    assert slot.refresh() is False  # nothing changed
    pinned = ShadowSlot(challenger, tmp_path / "repo", "ctr_ranking", refresh_s=0)
    registry.attach_shadow(challenger)
    assert pinned.refresh() is False and pinned.shadow is None  # it does not serve the production model
    shutil.rmtree(registry.model_path(challenger))  # the challenger's files are gone: it cannot be loaded
    assert slot.refresh() is True and slot.shadow is None  # logged and counted, never raised
    assert slot.refresh() is False  # not retried until the registry changes again


def test_promote_challenger_with_a_broken_deployment_file_changes_nothing(home, artifact, tiny_dataset, tmp_path, capsys):
    # the file was read after the promotion: a file that is not JSON left the registry promoted, the file stale
    # and a bare JSON error ("Expecting value: line 1 column 1 (char 0)") without the file's name
    from ctrflow.cli import main

    champion = _register(artifact, tiny_dataset, valid_auc=0.70)
    challenger = _register(artifact, tiny_dataset, valid_auc=0.71)
    registry.promote(champion, reason="first", force=True)
    registry.attach_shadow(challenger)
    for text, says in (("not json", "is not valid JSON (line 1, column 1)"), ("[1]", "must be a JSON object, not list")):
        deployment = tmp_path / "deployment.json"
        deployment.write_text(text)
        argv = ["ctrflow", "models", "promote-challenger", "--force", "--deployment", str(deployment)]
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr("sys.argv", argv)
            with pytest.raises(SystemExit) as exit_:
                main()
        assert exit_.value.code == 2 and f"{deployment}: the deployment file {says}" in capsys.readouterr().err
        assert registry.production_model(NAME) == champion and registry.shadow_model(NAME) == challenger
        assert deployment.read_text() == text

