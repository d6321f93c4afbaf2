"""The `ctrflow` command: help, compile, readable errors, drift exit codes, and `dvc repro` through the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from ctrflow.cli import cli
from ctrflow.config import REPO_ROOT, load_params, merge


def test_help_lists_every_step():
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    for command in ("validate", "features", "train", "register", "serve", "models", "monitor", "pipeline", "run-all"):
        assert command in result.output


def test_pipeline_compile_writes_ir_that_kfp_loads(tmp_path):
    from kfp import components

    out = tmp_path / "training.yaml"
    result = CliRunner().invoke(cli, ["pipeline", "compile", "--out", str(out)])
    assert result.exit_code == 0, result.output
    loaded = components.load_component_from_file(str(out))
    assert loaded.name == "ctrflow-training"
    assert {"params", "feature_repo"} <= set(loaded.component_spec.inputs)
    assert {"model", "tag", "gate_passed", "training_set"} == set(loaded.component_spec.outputs)


def test_bad_input_gets_a_readable_error_not_a_traceback(tmp_path, tiny_dataset, monkeypatch, capsys):
    from ctrflow.cli import main

    data = tmp_path / "data"
    data.mkdir()
    inter = tiny_dataset.interactions.copy()
    inter.loc[inter.index[:3], "scenario"] = "moon"
    inter.to_parquet(data / "interactions.parquet")
    tiny_dataset.users.to_parquet(data / "users.parquet")
    tiny_dataset.items.to_parquet(data / "items.parquet")
    (data / "schema.yaml").write_text(yaml.safe_dump({"scenarios": tiny_dataset.spec.scenarios, "fields": []}))
    # the real entry point (`ctrflow` calls main()) in this process: a subprocess would re-import everything
    argv = ["ctrflow", "--set", "data.source=parquet", "--set", f"data.path={data}", "validate", "--out", str(tmp_path / "ds"), "--report", str(tmp_path / "gx")]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.chdir(REPO_ROOT)
    with pytest.raises(SystemExit) as exit_:
        main()
    stderr = capsys.readouterr().err
    assert exit_.value.code == 2
    assert "Traceback" not in stderr
    assert "scenario" in stderr and "3" in stderr
    assert not (tmp_path / "ds").exists()  # nothing written downstream
    assert (tmp_path / "gx" / "validation.json").exists()


def test_set_overrides_parse_yaml_values():
    from ctrflow.config import parse_overrides

    assert parse_overrides(["train.epochs=3", "models.dcnv2.mlp=[8, 8]", "data.path=null"]) == {
        "train.epochs": 3,
        "models.dcnv2.mlp": [8, 8],
        "data.path": None,
    }
    with pytest.raises(ValueError, match="key.sub=value"):
        parse_overrides(["epochs"])


def test_models_list_on_an_empty_store(tmp_path, monkeypatch):
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "bentoml"))
    result = CliRunner().invoke(cli, ["models", "list"])
    assert result.exit_code == 0, result.output
    assert "no models registered" in result.output


@pytest.mark.slow
@pytest.mark.pipeline
def test_dvc_repro_runs_the_same_steps_through_the_cli(tmp_path):
    """`dvc repro` in a scratch copy of the project: validate → features → train → register, then a no-op re-run."""
    work = tmp_path / "project"
    work.mkdir()
    for name in ("dvc.yaml", "ctrflow", "feature_repo"):
        src = REPO_ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, work / name)
    params = merge(
        load_params(),
        {
            "data.source": "synthetic",
            "data.synthetic": {"n_users": 200, "n_items": 150, "n_interactions": 5000},
            "data.max_len": 10,
            "train.epochs": 1,
            "train.threads": 1,
            "train.progress": False,
            "models.dcnv2": {"cross_layers": 1, "mlp": [16], "dropout": 0.0},
            "gate.min_valid_auc": 0.5,
            "gate.min_lift_over_reference": -1.0,  # the reference (lr) is trained, but 1 epoch need not beat it
            "registry.bentoml_home": str(tmp_path / "bentoml"),
        },
    )
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "GX_ANALYTICS_ENABLED": "false"}
    env.pop("BENTOML_HOME", None)
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"], [sys.executable, "-m", "dvc", "config", "core.analytics", "false"]):
        subprocess.run(cmd, cwd=work, check=True, env=env, capture_output=True, timeout=120)

    repro = subprocess.run([sys.executable, "-m", "dvc", "repro", "register"], cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert repro.returncode == 0, repro.stdout[-3000:] + repro.stderr[-3000:]
    metrics = json.loads((work / "runs/dvc/metrics.json").read_text())
    assert 0.5 < metrics["test"]["auc"] <= 1.0
    register = json.loads((work / "runs/dvc/register.json").read_text())
    assert register["gate_passed"] is True and register["deployment"]["model_tag"] == register["tag"]
    assert (work / "dvc.lock").exists()

    again = subprocess.run([sys.executable, "-m", "dvc", "repro", "register"], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0
    assert "didn't change" in again.stdout or "is cached" in again.stdout or "Skipping" in again.stdout


@pytest.mark.parametrize(
    ("content", "says"),
    [
        ("{}", "lacks 'feature_repo', 'bentoml_home', 'model_tag or model_name' (non-empty text)"),
        ('{"model_tag": "m:1", "feature_repo": "/r"}', "lacks 'bentoml_home' (non-empty text)"),
        ("{", "is not valid JSON (line 1, column 2)"),
    ],
)
def test_serve_names_what_a_hand_edited_deployment_file_lacks(content, says, tmp_path, monkeypatch, capsys):
    # `ctrflow serve` stopped with a bare KeyError: "error: 'bentoml_home'"
    from ctrflow.cli import main

    deployment = tmp_path / "deployment.json"
    deployment.write_text(content)
    monkeypatch.setattr("sys.argv", ["ctrflow", "serve", "--deployment", str(deployment), "--port", "1"])
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"error: {deployment}: the deployment file {says}" in err


def test_serve_on_a_port_in_use_says_so_before_starting(tmp_path, monkeypatch, capsys):
    # BentoML's answer was a circus traceback ending in "OSError: [Errno 98] Address already in use", exit 1
    import socket

    from ctrflow.cli import main

    deployment = tmp_path / "deployment.json"
    deployment.write_text(json.dumps({"model_tag": "m:1", "feature_repo": str(tmp_path), "bentoml_home": str(tmp_path)}))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        monkeypatch.setattr("sys.argv", ["ctrflow", "serve", "--deployment", str(deployment), "--port", str(port)])
        with pytest.raises(SystemExit) as exit_:
            main()
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and "Traceback" not in err
    assert f"cannot serve on 127.0.0.1:{port}: Address already in use (another server? choose --port or serving.port)" in err
