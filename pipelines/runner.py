"""Compile, run locally (KFP SubprocessRunner), submit and schedule the pipelines.

Local and cluster runs execute the same compiled components; what changes is configuration: the pipeline root
(a local folder or an object store), the KFP host and the base image ($CTRFLOW_BASE_IMAGE).
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kfp import compiler, local

from ctrflow.config import section, to_struct

PIPELINES = ("training", "monitoring")


def pipeline_func(name: str, family: str = "standard", params: dict[str, Any] | None = None) -> Any:
    """The pipeline object; `params` pick the training DAG's launcher (pipeline.launcher, pytorchjob section)."""
    if name == "training":
        from pipelines.training import build_training_pipeline

        return build_training_pipeline(family, params)
    if name == "monitoring":
        from pipelines.monitoring import monitoring_pipeline

        return monitoring_pipeline
    raise ValueError(f"unknown pipeline '{name}': choose one of {PIPELINES}")


def pipeline_params(params: dict[str, Any]) -> dict[str, Any]:
    """params.yaml as a KFP struct argument (nulls recorded aside: KFP rejects None values); the components get
    them back, typed, with `ctrflow.config.validate_params`."""
    return to_struct(params)


def compile_pipeline(name: str, package_path: str | Path, family: str = "standard", params: dict[str, Any] | None = None) -> Path:
    """Write the KFP IR YAML (what a Kubeflow cluster runs); `params` as in `pipeline_func`."""
    package_path = Path(package_path)
    package_path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(pipeline_func(name, family, params), str(package_path))
    return package_path


def run_training_local(params: dict[str, Any], workdir: str | Path, model_name: str = "", family: str | None = None) -> dict[str, Any]:
    """Run the training pipeline with the KFP local SubprocessRunner in this interpreter.

    Returns the artifact paths and gate outcome (`gate`: the decision with its reasons and the metrics of every model
    compared), and writes them to `workdir/run.json`. When the gate fails nothing is deployed, and a deployment.json
    an earlier run left in `workdir` is removed (it would pair an old model with this run's feature repository).
    """
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    root = workdir / "kfp"
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    with private_tmpdir():
        family = family or section(params, "pipeline").family
        arguments = {"params": pipeline_params(params), "feature_repo": str(workdir / "feature_repo")}
        if model_name:
            arguments["model_name"] = model_name
        task = pipeline_func("training", family, params)(**arguments)
    outputs = task.outputs
    run = {
        "family": family,
        "workdir": str(workdir),
        "pipeline_root": str(root),
        "training_set": outputs["training_set"].path,
        "model_dir": outputs["model"].path,
        "model_tag": outputs["tag"],
        "gate_passed": bool(outputs["gate_passed"]),
        "feature_repo": str(workdir / "feature_repo"),
    }
    run_dir = Path(run["training_set"]).parents[1]  # <pipeline_root>/<run name>/<task>/<artifact>
    run["run_dir"] = str(run_dir)
    deployment = run_dir / "deploy-model" / "deployment"
    if run["gate_passed"] and deployment.exists():
        run["deployment"] = str(deployment)
    run["gate"] = _gate_record(run["model_tag"])
    if not run["gate_passed"]:
        # a deployment.json left in this workdir by an earlier run points at this workdir's feature repository, which
        # this run rebuilt: never leave it for `ctrflow serve` to pick up (it may be of another data set)
        stale = workdir / "deployment.json"
        if stale.exists():
            stale.unlink()
            run["removed_stale_deployment"] = str(stale)
    report = run_dir / "validate-data" / "validation_report"
    run["validation_report_json"] = str(report / "validation.json")
    html = sorted(report.glob("gx/uncommitted/data_docs/local_site/index.html"))
    run["validation_report_html"] = str(html[0]) if html else str(report)
    (workdir / "run.json").write_text(json.dumps(run, indent=2))
    return run


def _gate_record(tag: str) -> dict[str, Any] | None:
    """The gate decision the pipeline's gate step recorded for `tag` (reasons, every compared model's metrics)."""
    from ctrflow import registry

    try:
        decision = registry.last_gate(tag)
    except registry.RegistryError:
        return None
    return {**decision.to_dict(), "summary": decision.summary()} if decision else None


def run_monitoring_local(
    params: dict[str, Any], workdir: str | Path, training_set: str, model_dir: str, current: str, labels: str = "", fail_on_breach: bool = True
) -> Any:
    """The monitoring pipeline with the KFP local SubprocessRunner (drift, quality when `labels` is given, decision)."""
    workdir = Path(workdir).resolve()
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(workdir / "kfp"), raise_on_error=True)
    with private_tmpdir():
        return pipeline_func("monitoring")(
            params=pipeline_params(params), training_set_uri=training_set, model_uri=model_dir, current=current, labels=labels,
            fail_on_breach=fail_on_breach,
        )  # fmt: skip


@contextlib.contextmanager
def private_tmpdir() -> Iterator[Path]:
    """A TMPDIR of this run's own for the local runner's task subprocesses, removed afterwards with what they left.

    The local runner writes each task's ephemeral_component.py under ``mktemp -d`` and never removes it (PITFALLS).
    Removing every ``$TMPDIR/tmp*/ephemeral_component.py`` after a run, as before, deleted the components of
    pipelines running beside it (two test workers: a train-model task failed with FileNotFoundError on its own
    component file). Task subprocesses inherit the variable; this process's own temporary directory is unchanged
    (read before the switch, so tempfile's cached value stays the system one)."""
    import os
    import tempfile

    private = Path(tempfile.mkdtemp(prefix="ctrflow-kfp-"))
    saved = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(private)
    try:
        yield private
    finally:
        if saved is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved
        shutil.rmtree(private, ignore_errors=True)


def submit(
    host: str,
    params: dict[str, Any],
    feature_repo: str,
    *,
    experiment: str = "ctrflow",
    pipeline_root: str | None = None,
    cron: str | None = None,
    job_name: str = "ctrflow-training",
    family: str = "standard",
    client: Any = None,
) -> dict[str, Any]:
    """Submit the training pipeline to a Kubeflow Pipelines API server, once or on a schedule.

    `cron` has KFP's six fields, seconds first (e.g. "0 0 2 * * *" = daily at 02:00).
    """
    import tempfile

    import kfp

    if cron is not None and len(cron.split()) != 6:
        raise ValueError(f"cron '{cron}' must have 6 fields (seconds first), got {len(cron.split())}")
    client = client or kfp.Client(host=host)
    with tempfile.TemporaryDirectory() as tmp:
        package = compile_pipeline("training", Path(tmp) / "training.yaml", family, params)
        arguments = {"params": pipeline_params(params), "feature_repo": feature_repo}
        exp = client.create_experiment(name=experiment)
        exp_id = getattr(exp, "experiment_id", None) or getattr(exp, "id", None)
        if cron is not None:
            run = client.create_recurring_run(
                experiment_id=exp_id,
                job_name=job_name,
                cron_expression=cron,
                pipeline_package_path=str(package),
                params=arguments,
                pipeline_root=pipeline_root,
            )
            return {"recurring_run_id": getattr(run, "recurring_run_id", None) or getattr(run, "id", None)}
        result = client.create_run_from_pipeline_package(
            str(package), arguments=arguments, run_name=job_name, experiment_id=exp_id, pipeline_root=pipeline_root
        )
        return {"run_id": getattr(result, "run_id", None)}


def schedule_monitoring(
    host: str,
    params: dict[str, Any],
    training_set_uri: str,
    model_uri: str,
    current: str,
    labels: str = "",
    *,
    cron: str | None = None,
    experiment: str = "ctrflow",
    pipeline_root: str | None = None,
    job_name: str = "ctrflow-monitoring",
    client: Any = None,
) -> dict[str, Any]:
    """Submit the monitoring pipeline as a recurring run on `cron` (default `monitoring.schedule_cron`; six fields,
    seconds first). Returns {"recurring_run_id", "cron"}."""
    import tempfile

    import kfp

    cron = cron or section(params, "monitoring").schedule_cron
    if len(cron.split()) != 6:
        raise ValueError(f"cron '{cron}' must have 6 fields (seconds first), got {len(cron.split())}")
    client = client or kfp.Client(host=host)
    with tempfile.TemporaryDirectory() as tmp:
        package = compile_pipeline("monitoring", Path(tmp) / "monitoring.yaml")
        arguments = {"params": pipeline_params(params), "training_set_uri": training_set_uri, "model_uri": model_uri, "current": current, "labels": labels}
        exp = client.create_experiment(name=experiment)
        exp_id = getattr(exp, "experiment_id", None) or getattr(exp, "id", None)
        run = client.create_recurring_run(
            experiment_id=exp_id, job_name=job_name, cron_expression=cron, pipeline_package_path=str(package),
            params=arguments, pipeline_root=pipeline_root,
        )  # fmt: skip
        return {"recurring_run_id": getattr(run, "recurring_run_id", None) or getattr(run, "id", None), "cron": cron}
