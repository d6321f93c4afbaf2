"""dvc.yaml checked against the code: every stage's `deps` and `params` cover what its command really reads.

The stages' commands run on tiny data (tests/dvc_stages.py) with a params dict that records each key read and a
fresh import of the project per stage; a stage that reads a key its `params` do not declare, or imports project code
its `deps` do not list, would let `dvc repro` reuse a stale output (e.g. a changed `data.split` with the old training
set). Only the branches the tiny configuration takes are seen, so `params` may declare more than is read here.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ctrflow.config import REPO_ROOT, merge, read_params

pytestmark = pytest.mark.pipeline

INPUT_OPTIONS = ("--dataset", "--training-set", "--pretrained", "--model-dir", "--init")
TEMPLATE_SUFFIXES = (".py", ".yaml", ".yml")  # what features.copy_repo copies that shapes the Feast repo
TEMPLATE_IGNORED = {"data", ".feast", "__pycache__"}  # folders copy_repo leaves behind


def tiny_params(tmp: Path) -> dict:
    return merge(
        read_params(REPO_ROOT / "params.yaml"),
        {
            "data.source": "synthetic",
            "data.synthetic": {"n_users": 150, "n_items": 100, "n_interactions": 3000},
            "data.max_len": 8,
            "validation.min_rows": 100,
            "train": {"epochs": 1, "threads": 1, "progress": False, "batch_size": 512},
            "models.dcnv2": {"cross_layers": 1, "mlp": [8], "dropout": 0.0},
            "models.dgenctr": {"d_model": 8, "layers": 1, "heads": 2, "ffn_mult": 1, "steps": 10, "pretrain": {"epochs": 1, "batch_size": 512}},
            "models.star": {"hidden": [8], "aux": [4], "aux_embedding_dim": 4},
            "models.gsvr": {"latent_dim": 4, "posterior_hidden": [8], "prototypes": 2},
            "models.dmae": {"mlp": [8], "attention_mlp": [8], "pool_mlp": [8], "decoder_hidden": [8], "gate_hidden": 8},
            "gate.min_valid_auc": 0.0,
            "registry.bentoml_home": str(tmp / "bentoml"),
            "embeddings.cache_dir": str(tmp / "embeddings"),
        },
    )


@pytest.fixture(scope="module")
def stages() -> dict:
    return yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]


@pytest.fixture(scope="module")
def reads(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("dvc")
    (work / "params.yaml").write_text(yaml.safe_dump(tiny_params(work), sort_keys=False))
    env = {**os.environ, "BENTOML_HOME": str(work / "bentoml"), "GX_ANALYTICS_ENABLED": "false", "FEAST_USAGE": "False"}
    out = work / "reads.json"
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tests" / "dvc_stages.py"), str(work), str(out)],
        capture_output=True, text=True, env=env, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def _covered(key: str, declared: list[str]) -> bool:
    return any(key == d or key.startswith(d + ".") for d in declared)


def _declared_params(stage: dict) -> list[str]:
    out = []
    for entry in stage.get("params", []):
        if isinstance(entry, str):
            out.append(entry)
        else:  # {params file: [keys]}
            out.extend(k for keys in entry.values() for k in keys)
    return out


def _deps(stage: dict) -> list[str]:
    return [d if isinstance(d, str) else next(iter(d)) for d in stage.get("deps", [])]


def _dep_covers(path: str, deps: list[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)


def test_every_stage_ran(reads, stages):
    assert set(reads) == set(stages)
    failed = {name: r["error"] for name, r in reads.items() if not r["ok"]}
    assert not failed


def test_params_cover_every_key_a_stage_reads(reads, stages):
    missing = {
        name: [k for k in reads[name]["params"] if not _covered(k, _declared_params(stage))] for name, stage in stages.items()
    }
    assert not {n: m for n, m in missing.items() if m}, "dvc.yaml params miss keys the step reads"


def _has_code(path: str) -> bool:
    return bool((REPO_ROOT / path).read_text().strip())  # an empty __init__.py holds nothing to depend on


def test_deps_cover_the_code_each_stage_imports(reads, stages):
    missing = {
        name: [m for m in reads[name]["modules"] if _has_code(m) and not _dep_covers(m, _deps(stage))] for name, stage in stages.items()
    }
    assert not {n: m for n, m in missing.items() if m}, "dvc.yaml deps miss project code the command imports"


def test_deps_cover_the_feast_template_when_the_stage_copies_it(reads, stages):
    template = sorted(
        str(p.relative_to(REPO_ROOT))
        for p in (REPO_ROOT / read_params(REPO_ROOT / "params.yaml")["features"]["repo"]).rglob("*")
        if p.is_file() and p.suffix in TEMPLATE_SUFFIXES and not set(p.relative_to(REPO_ROOT).parts[1:-1]) & TEMPLATE_IGNORED
    )
    assert template
    missing = {
        name: [f for f in template if not _dep_covers(f, _deps(stage))]
        for name, stage in stages.items()
        if "features.repo" in reads[name]["params"]
    }
    assert missing, "no stage copies the Feast repository template (features.repo)"
    assert not {n: m for n, m in missing.items() if m}


def test_deps_list_every_input_folder_of_the_command(stages):
    missing = {}
    for name, stage in stages.items():
        argv = shlex.split(stage["cmd"])
        inputs = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in INPUT_OPTIONS]
        if [p for p in inputs if p not in _deps(stage)]:
            missing[name] = [p for p in inputs if p not in _deps(stage)]
    assert not missing
