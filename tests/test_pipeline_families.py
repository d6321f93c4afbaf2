"""Each model family's training DAG compiles, loads back, and wires its extra steps in the right order."""

from __future__ import annotations

import pytest
import yaml

from pipelines.runner import compile_pipeline
from pipelines.training import FAMILIES


def _dag(path) -> dict:
    return yaml.safe_load(path.read_text())["root"]["dag"]["tasks"]


def _upstream(tasks: dict, name: str) -> set[str]:
    deps = set(tasks[name].get("dependentTasks", []))
    inputs = tasks[name].get("inputs", {})
    for spec in [*inputs.get("artifacts", {}).values(), *inputs.get("parameters", {}).values()]:
        for key in ("taskOutputArtifact", "taskOutputParameter"):
            if key in spec:
                deps.add(spec[key]["producerTask"])
    return deps


@pytest.mark.parametrize("family", FAMILIES)
def test_family_compiles_and_loads(tmp_path, family):
    from kfp import components

    path = compile_pipeline("training", tmp_path / f"{family}.yaml", family)
    loaded = components.load_component_from_file(str(path))
    assert {"model", "tag", "gate_passed", "training_set"} == set(loaded.component_spec.outputs)
    tasks = _dag(path)
    assert {"validate-data", "build-features", "register-model", "promotion-gate", "condition-1"} <= set(tasks)


def test_dgenctr_passes_the_pretrained_checkpoint_as_an_artifact(tmp_path):
    tasks = _dag(compile_pipeline("training", tmp_path / "d.yaml", "dgenctr"))
    assert _upstream(tasks, "finetune-model") == {"build-features", "pretrain-model"}
    assert _upstream(tasks, "pretrain-model") == {"build-features"}
    art = tasks["finetune-model"]["inputs"]["artifacts"]["pretrained"]["taskOutputArtifact"]
    assert art == {"outputArtifactKey": "pretrained", "producerTask": "pretrain-model"}
    assert "train-model" not in tasks
    assert _upstream(tasks, "register-model") >= {"finetune-model"}


def test_dmae_embeds_items_before_features(tmp_path):
    tasks = _dag(compile_pipeline("training", tmp_path / "m.yaml", "dmae"))
    assert _upstream(tasks, "embed-items") == {"validate-data"}
    assert _upstream(tasks, "build-features") == {"embed-items"}


def test_gsvr_pretrained_initialises_from_pretraining(tmp_path):
    tasks = _dag(compile_pipeline("training", tmp_path / "g.yaml", "gsvr-pretrained"))
    assert _upstream(tasks, "train-multiscenario") == {"build-features", "pretrain-model"}


def test_unknown_family_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown model family 'xgboost'"):
        compile_pipeline("training", tmp_path / "x.yaml", "xgboost")
