"""The `ctrflow` command: one sub-command per pipeline step, plus pipeline, serve, models and monitor.

Every step reads params.yaml (`--params`, overrides with `--set key.sub=value`) and calls `ctrflow.steps`;
dvc.yaml and the KFP components call the same functions.

The training commands (train, pretrain, finetune, train-gsvr) train data-parallel with `--nproc N` (or
`train.nproc`): the command relaunches itself under torchrun with N local processes. A process that a launcher
started (torchrun, a Kubeflow PyTorchJob: WORLD_SIZE > 1 in its environment) joins the process group
(`train.backend`) before any step runs; only rank 0 prints, logs at INFO and writes (ctrflow.training.distributed).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import click

from ctrflow.config import FAMILIES, ConfigError, load_params, parse_overrides, read_params

for _var, _value in (("GX_ANALYTICS_ENABLED", "false"), ("FEAST_USAGE", "False"), ("BENTOML_DO_NOT_TRACK", "true"), ("HF_HUB_OFFLINE", "1")):
    os.environ.setdefault(_var, _value)


class ParamsError(click.ClickException):
    """params.yaml or a --set override is invalid: exit code 2 with the readable message, no traceback."""

    exit_code = 2


def _params(ctx: click.Context) -> dict[str, Any]:
    return ctx.obj["params"]


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--params", "params_file", type=click.Path(dir_okay=False), default=None, help="params.yaml to use (default: ./params.yaml).")
@click.option(
    "--profile", default="local", envvar="CTRFLOW_PROFILE", show_default=True,
    help="Overlay params.<profile>.yaml on params.yaml: production = Spark, Redis, PostgreSQL registry ($CTRFLOW_PROFILE).",
)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a param, e.g. --set train.epochs=3 (repeatable).")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.pass_context
def cli(ctx: click.Context, params_file: str | None, profile: str, overrides: tuple[str, ...], verbose: bool) -> None:
    """ctrflow: validate → features → train → register → serve → monitor CTR models."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    ctx.ensure_object(dict)
    try:  # validated before any step runs: an unknown key or a value of the wrong type stops here
        base = read_params(params_file, profile)
        ctx.obj["params"] = load_params(params_file, parse_overrides(overrides, base), profile)
    except (ConfigError, FileNotFoundError) as exc:
        raise ParamsError(str(exc)) from None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # started by torchrun / a PyTorchJob: join the process group
        from ctrflow.training.distributed import init_from_env

        if not init_from_env(ctx.obj["params"]["train"]["backend"]).is_main:
            logging.getLogger().setLevel(logging.WARNING)  # one copy of the logs: rank 0's


def _nproc_option(f: Any) -> Any:
    return click.option(
        "--nproc", type=click.IntRange(min=1), default=None,
        help="Data-parallel processes on this machine (default: train.nproc); >1 relaunches the command under torchrun.",
    )(f)  # fmt: skip


def _data_parallel(ctx: click.Context, nproc: int | None) -> None:
    """Relaunch this command under torchrun when more than one process is asked for and no launcher started this
    one; exits with torchrun's code (the ranks run the same command and train together)."""
    n = nproc or ctx.obj["params"]["train"]["nproc"]
    if n <= 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return
    from ctrflow.training.distributed import launch

    ctx.exit(launch(n, _without_nproc(sys.argv[1:]), threads=ctx.obj["params"]["train"]["threads"]))


def _without_nproc(args: list[str]) -> list[str]:
    out: list[str] = []
    skip = False
    for a in args:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def _is_main() -> bool:
    """False on the ranks other than 0 of a data-parallel run: they neither print nor write."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return True
    from ctrflow.training.distributed import current

    return current().is_main


# ---- steps ----------------------------------------------------------------------------------------------
@cli.command()
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Where the validated canonical dataset is written.")
@click.option("--report", "report_dir", required=True, type=click.Path(file_okay=False), help="Where the GX results (JSON + HTML) go.")
@click.pass_context
def validate(ctx: click.Context, out_dir: str, report_dir: str) -> None:
    """Load the configured source (data.source) and validate it with Great Expectations."""
    from ctrflow.steps import validate_step

    _echo_json(validate_step(_params(ctx), out_dir, report_dir))


@cli.command()
@click.option("--dataset", "dataset_dir", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--repo", "repo_dir", required=True, type=click.Path(file_okay=False), help="Feast repo (copied from feature_repo/ if new).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Training set folder (frame.parquet + spec.json).")
@click.pass_context
def features(ctx: click.Context, dataset_dir: str, repo_dir: str, out_dir: str) -> None:
    """Feast: write feature tables, apply, build the point-in-time training set, materialise online."""
    from ctrflow.steps import features_step

    _echo_json(features_step(_params(ctx), dataset_dir, repo_dir, out_dir))


@cli.command()
@click.option("--training-set", "training_set", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Model artifact folder.")
@click.option("--model", "model_name", default=None, help="Model name (default: train.model in params.yaml).")
@click.option("--metrics", "metrics_file", default=None, type=click.Path(dir_okay=False), help="Also write the metrics JSON here (for DVC).")
@_nproc_option
@click.pass_context
def train(ctx: click.Context, training_set: str, out_dir: str, model_name: str | None, metrics_file: str | None, nproc: int | None) -> None:
    """Train a model with early stopping on validation AUC; evaluate on valid and test."""
    from ctrflow.steps import train_step

    _data_parallel(ctx, nproc)
    result = train_step(_params(ctx), training_set, out_dir, model_name)
    if not _is_main():
        return
    _write_metrics(metrics_file, result["metrics"])
    _echo_json({k: v for k, v in result.items() if k != "metrics"})


def _write_metrics(metrics_file: str | None, metrics: dict) -> None:
    if metrics_file:
        Path(metrics_file).parent.mkdir(parents=True, exist_ok=True)
        Path(metrics_file).write_text(json.dumps(metrics, indent=2, default=str))


@cli.command()
@click.option("--training-set", "training_set", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Pre-trained checkpoint folder.")
@_nproc_option
@click.pass_context
def pretrain(ctx: click.Context, training_set: str, out_dir: str, nproc: int | None) -> None:
    """DGenCTR: discrete-diffusion pre-training on the train split (models.dgenctr in params.yaml)."""
    from ctrflow.steps import pretrain_step

    _data_parallel(ctx, nproc)
    result = pretrain_step(_params(ctx), training_set, out_dir)
    if _is_main():
        _echo_json(result)


@cli.command()
@click.option("--training-set", "training_set", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--pretrained", required=True, type=click.Path(exists=True, file_okay=False), help="Output folder of `ctrflow pretrain`.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Model artifact folder.")
@click.option("--metrics", "metrics_file", default=None, type=click.Path(dir_okay=False))
@_nproc_option
@click.pass_context
def finetune(ctx: click.Context, training_set: str, pretrained: str, out_dir: str, metrics_file: str | None, nproc: int | None) -> None:
    """DGenCTR: CTR fine-tuning of the pre-trained network (only the label masked)."""
    from ctrflow.steps import finetune_step

    _data_parallel(ctx, nproc)
    result = finetune_step(_params(ctx), training_set, pretrained, out_dir)
    if not _is_main():
        return
    _write_metrics(metrics_file, result["metrics"])
    _echo_json({k: v for k, v in result.items() if k != "metrics"})


@cli.command()
@click.option("--training-set", "training_set", required=True, help="The training set folder, inside the volume (pytorchjob.mount_path).")
@click.option("--out", "out_dir", required=True, help="The model artifact folder, inside the volume.")
@click.option("--image", default=None, help="Container image with ctrflow installed (default: $CTRFLOW_BASE_IMAGE, as the KFP components).")
@click.option("--name", default="ctrflow-train", show_default=True, help="PyTorchJob name (its ConfigMap: <name>-params).")
@click.option("--model", "model_name", default=None, help="Model name (default: train.model in params.yaml).")
@click.option("--file", "out_file", default=None, type=click.Path(dir_okay=False), help="Write the YAML here (default: stdout).")
@click.pass_context
def pytorchjob(ctx: click.Context, training_set: str, out_dir: str, image: str | None, name: str, model_name: str | None, out_file: str | None) -> None:
    """The train step as a Kubeflow PyTorchJob (kubeflow.org/v1) + its params ConfigMap: `| kubectl apply -f -`."""
    from components import BASE_IMAGE
    from ctrflow.training.pytorchjob import pytorchjob_manifests, to_yaml

    text = to_yaml(pytorchjob_manifests(_params(ctx), training_set, out_dir, image or BASE_IMAGE, name, model_name))
    if out_file:
        Path(out_file).write_text(text)
    else:
        click.echo(text, nl=False)


@cli.command("train-gsvr")
@click.option("--training-set", "training_set", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Model artifact folder.")
@click.option("--init", "init_from", default=None, type=click.Path(exists=True), help="Diffusion-pretrained embeddings (a `ctrflow pretrain` folder).")
@click.option("--metrics", "metrics_file", default=None, type=click.Path(dir_okay=False))
@_nproc_option
@click.pass_context
def train_gsvr(ctx: click.Context, training_set: str, out_dir: str, init_from: str | None, metrics_file: str | None, nproc: int | None) -> None:
    """GSVR: the multi-scenario variational model around models.gsvr.backbone."""
    from ctrflow.steps import gsvr_step

    _data_parallel(ctx, nproc)
    result = gsvr_step(_params(ctx), training_set, out_dir, init_embeddings=init_from)
    if not _is_main():
        return
    _write_metrics(metrics_file, result["metrics"])
    _echo_json({k: v for k, v in result.items() if k != "metrics"})


@cli.command()
@click.option("--dataset", "dataset_dir", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Dataset with item modality fields.")
@click.pass_context
def embed(ctx: click.Context, dataset_dir: str, out_dir: str) -> None:
    """Item modality embeddings (the embeddings section of params.yaml) added as features, for DMAE."""
    from ctrflow.steps import embed_step

    _echo_json(embed_step(_params(ctx), dataset_dir, out_dir))


@cli.command()
@click.option("--model-dir", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--dataset", "dataset_dir", default=None, type=click.Path(exists=True, file_okay=False), help="For the data fingerprint.")
@click.option(
    "--training-set", "training_set", default=None, type=click.Path(exists=True, file_okay=False),
    help="The training set the model was trained on: the gate trains its reference model (gate.reference_model) on "
    "it, and the item-side fingerprint is taken from it.",
)  # fmt: skip
@click.option("--deploy/--no-deploy", default=False, help="Promote to production when the gate passes.")
@click.option("--repo", "repo_dir", default=None, type=click.Path(file_okay=False), help="Feast repo the deployment serves from.")
@click.option("--deployment", "deployment_file", default=None, type=click.Path(dir_okay=False), help="Where to write deployment.json.")
@click.pass_context
def register(
    ctx: click.Context, model_dir: str, dataset_dir: str | None, training_set: str | None, deploy: bool,
    repo_dir: str | None, deployment_file: str | None,
) -> None:  # fmt: skip
    """Register a trained model (candidate) and run the promotion gate from params.yaml.

    Exit code 1 when --deploy was asked for and the gate failed (nothing deployed; the reasons are printed).
    """
    from ctrflow.steps import deploy_step, gate_step, register_step

    params = _params(ctx)
    if deploy and not (repo_dir and deployment_file):
        raise click.UsageError("--deploy needs --repo and --deployment")
    result = gate_step(params, register_step(params, model_dir, dataset_dir, training_set)["tag"], training_set)
    if deploy and result["gate_passed"]:
        result["deployment"] = deploy_step(params, result["tag"], repo_dir, deployment_file)
    _echo_json(result)
    if deploy and not result["gate_passed"]:
        click.echo(result["summary"], err=True)
        click.echo("nothing deployed: the promotion gate failed", err=True)
        sys.exit(1)


# ---- models ---------------------------------------------------------------------------------------------
@cli.group()
@click.pass_context
def models(ctx: click.Context) -> None:
    """List registered models, promote or roll back (a person overriding the gate)."""
    from ctrflow.steps import use_bentoml_home

    use_bentoml_home(_params(ctx))


def _model_name(ctx: click.Context, name: str | None) -> str | None:
    """--name, else registry.model_name; None (every name) when both are unset (names are per data set)."""
    return name or _params(ctx)["registry"]["model_name"] or None


@models.command("list")
@click.option("--name", default=None, help="Model name (default: registry.model_name; unset: every name).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def models_list(ctx: click.Context, name: str | None, as_json: bool) -> None:
    """Registered models, newest first, with data set, family, stage (`unrecorded`: in the store, not in the
    stage ledger: never a candidate) and role (champion: the production model; challenger: shadow-served)."""
    from ctrflow import registry

    rows = registry.list_models(_model_name(ctx, name))
    if as_json:
        _echo_json(rows)
        return
    if not rows:
        click.echo("no models registered")
        return
    click.echo(f"{'tag':40} {'dataset':16} {'family':14} {'stage':11} {'role':10} {'valid_auc':>9} {'test_auc':>9}  created")
    for r in rows:
        m = r.get("metrics", {}) or {}
        click.echo(
            f"{r['tag']:40} {str(r.get('dataset') or '-'):16} {str(r.get('model_family') or '-'):14} {r['stage']:11} "
            f"{r.get('role') or '-':10} {_fmt(m.get('valid_auc')):>9} {_fmt(m.get('test_auc')):>9}  {r.get('created', '')}"
        )


def _fmt(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, int | float) else "-"


@models.command("promote")
@click.argument("tag")
@click.option("--reason", required=True, help="Why a person overrides the gate (kept in the stage history).")
@click.pass_context
def models_promote(ctx: click.Context, tag: str, reason: str) -> None:
    from ctrflow import registry

    registry.promote(tag, reason=reason, force=True)
    click.echo(f"{tag} is now production")


@models.command("rollback")
@click.option("--name", default=None)
@click.option("--reason", required=True)
@click.pass_context
def models_rollback(ctx: click.Context, name: str | None, reason: str) -> None:
    from ctrflow import registry

    name = _model_name(ctx, name)
    if name is None:
        names = sorted(registry.production_models())
        if len(names) != 1:
            raise click.UsageError(f"say which model to roll back: --name (names with a production model: {names or 'none'})")
        name = names[0]
    tag = registry.rollback(name, reason=reason)
    click.echo(f"rolled back: {tag} is production again")


@models.command("shadow")
@click.argument("tag")
@click.option("--reason", default="shadow serving", show_default=True, help="Kept in the stage history.")
@click.pass_context
def models_shadow(ctx: click.Context, tag: str, reason: str) -> None:
    """Attach candidate TAG as the challenger of the production model of its name (same data set).

    Within seconds (a running service re-reads the registry every few seconds), every request is also scored by the
    challenger: its scores go to the request log (columns shadow_model, shadow_score) and never into the answer; its
    failures never fail a request."""
    from ctrflow import registry

    record = registry.attach_shadow(tag, reason=reason)
    click.echo(f"{record['tag']} now shadows {record['champion']} (a running service picks it up within seconds)")


@models.command("unshadow")
@click.option("--name", default=None, help="Model name (default: registry.model_name; unset: the only name with a challenger).")
@click.pass_context
def models_unshadow(ctx: click.Context, name: str | None) -> None:
    """Detach the challenger (it stays a candidate)."""
    from ctrflow import registry

    tag = registry.detach_shadow(_challenger_name(ctx, name))
    click.echo(f"{tag} no longer shadows production" if tag else "no challenger was attached")


@models.command("promote-challenger")
@click.option("--name", default=None, help="Model name (default: registry.model_name; unset: the only name with a challenger).")
@click.option("--reason", default="it did better in shadow serving", show_default=True, help="Kept in the stage history.")
@click.option("--force", is_flag=True, help="Promote even if the challenger failed its promotion gate (recorded).")
@click.option("--deployment", "deployment_file", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Also point this deployment.json at the promoted model (written atomically).")  # fmt: skip
@click.pass_context
def models_promote_challenger(ctx: click.Context, name: str | None, reason: str, force: bool, deployment_file: str | None) -> None:
    """Promote the attached challenger to production in one step (under the registry lock; the champion is
    archived, the challenger slot freed)."""
    from ctrflow import registry
    from ctrflow.registry import PromotionError
    from ctrflow.server import read_deployment

    # read before promoting: a broken deployment file must not leave the registry promoted and the file stale
    deployment = read_deployment(deployment_file, serving=False) if deployment_file else None
    try:
        record = registry.promote_challenger(_challenger_name(ctx, name), reason=reason, force=force)
    except PromotionError as exc:
        raise click.ClickException(f"{exc}\n(--force overrides the gate; the override is recorded)") from None
    click.echo(f"{record['tag']} is now production (was {record['replaced'] or 'none'})")
    if deployment_file and deployment is not None:
        path = Path(deployment_file)
        deployment["model_tag"] = record["tag"]
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(deployment, indent=2))
        os.replace(tmp, path)
        click.echo(f"{deployment_file} now serves {record['tag']} (restart the service)")


def _challenger_name(ctx: click.Context, name: str | None) -> str:
    """--name, else registry.model_name, else the only name that has a challenger attached."""
    from ctrflow import registry

    name = _model_name(ctx, name)
    if name:
        return name
    names = sorted(n for n in registry.production_models() if registry.shadow_model(n))
    if len(names) != 1:
        raise click.UsageError(f"say which model: --name (names with a challenger: {names or 'none'})")
    return names[0]


# ---- serve ----------------------------------------------------------------------------------------------
@cli.command()
@click.option("--deployment", "deployment_file", default="runs/latest/deployment.json", type=click.Path(exists=True, dir_okay=False))
@click.option("--port", default=None, type=int)
@click.option("--request-log", default=None, type=click.Path(file_okay=False), help="Default: request_log/ beside deployment.json.")
@click.pass_context
def serve(ctx: click.Context, deployment_file: str, port: int | None, request_log: str | None) -> None:
    """Serve the deployed model with `bentoml serve` in the foreground.

    The model must fit the deployment's feature repository (checked first; a mismatch is named and nothing starts).
    SIGTERM, SIGINT (Ctrl-C) or SIGHUP stop the whole server: in-flight requests are answered, the request log is
    flushed, and the command returns once no server process is left and the port is free.

    Guards (params serving section): bodies above serving.max_request_bytes get 413; with serving.auth_token_env
    naming an environment variable, every endpoint but /healthz, /livez, /readyz and /metrics needs
    `Authorization: Bearer <its value>` (the command refuses to start when that variable is unset).
    """
    from ctrflow import registry
    from ctrflow.fit_check import check_model_fits
    from ctrflow.request_log import recover_request_log
    from ctrflow.server import SERVICE, port_in_use, read_deployment, serve_foreground, service_env

    params = _params(ctx)
    deployment = read_deployment(deployment_file)
    host, port = params["serving"]["host"], port or params["serving"]["port"]
    # checked before anything starts: BentoML's own answer is a traceback from its process manager (circus)
    if (why := port_in_use(host, port)) is not None:
        raise click.ClickException(f"cannot serve on {host}:{port}: {why} (another server? choose --port or serving.port)")
    log_dir = request_log or str(Path(deployment_file).parent / "request_log")
    s = params["serving"]
    env = service_env(
        deployment, log_dir, s["threads"], s["workers"], s["item_cache_refresh_s"], s["request_log_compaction"],
        request_log_flush_rows=s["request_log_flush_rows"], request_log_flush_seconds=s["request_log_flush_seconds"],
    )  # fmt: skip
    os.environ["BENTOML_HOME"] = env["BENTOML_HOME"]
    from ctrflow.guard import guard_env, token_from_env

    env.update(guard_env(s))  # body limit and token variable for the service's guard
    try:
        token_from_env(env)  # serving.auth_token_env names a variable that is unset: refuse before anything starts
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from None
    tag = deployment.get("model_tag") or registry.production_model(env["CTRFLOW_MODEL_NAME"])
    if not tag:
        raise click.ClickException(f"no model to serve: '{env['CTRFLOW_MODEL_NAME']}' has no production model and {deployment_file} names none")
    check_model_fits(tag, deployment["feature_repo"], env["CTRFLOW_FEATURE_SERVICE"])  # before anything starts
    cmd = [sys.executable, "-m", "bentoml", "serve", SERVICE, "--host", host, "--port", str(port)]
    code = serve_foreground(cmd, env)
    recovered = recover_request_log(log_dir)  # rows a killed worker left in its segment, compacted now
    if recovered:
        click.echo(f"request log: recovered {recovered} rows left by a stopped worker", err=True)
    sys.exit(code)


# ---- monitor --------------------------------------------------------------------------------------------
@cli.group()
def monitor() -> None:
    """Monitoring: drift (Evidently), online quality, and the loop. Exit codes: 0 ok, 1 breach, 2 usage error,
    3 not enough data."""


@monitor.command("drift")
@click.option("--training-set", required=True, type=click.Path(exists=True, file_okay=False), help="Reference: the training set folder.")
@click.option("--current", required=True, type=click.Path(exists=True), help="The request log folder, or a Parquet slice.")
@click.option("--model-dir", default=None, type=click.Path(exists=True, file_okay=False), help="Scores the reference for prediction drift.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False))
@click.pass_context
def monitor_drift(ctx: click.Context, training_set: str, current: str, model_dir: str | None, out_dir: str) -> None:
    """Exit code: 0 ok, 1 breach (thresholds in params.yaml, drift section), 3 not enough data to test, 2 usage error."""
    from ctrflow.monitoring.loop import drift_page
    from ctrflow.steps import drift_step

    result = drift_step(_params(ctx), training_set, current, out_dir, model_dir=model_dir)
    click.echo(result.summary())
    page = drift_page(result, out_dir)
    click.echo(f"page: {page}\nHTML (Evidently): {result.html_path}\nJSON: {result.json_path}\nsummary: {result.summary_path}")
    sys.exit(result.exit_code)


@monitor.command("quality")
@click.option("--requests", "requests_path", required=True, type=click.Path(exists=True), help="The request log folder (or a Parquet slice).")
@click.option("--labels", required=True, type=click.Path(exists=True), help="The label feed: Parquet with request_id, item_id, clicked, timestamp.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False))
@click.pass_context
def monitor_quality(ctx: click.Context, requests_path: str, labels: str, out_dir: str) -> None:
    """Online AUC and calibration from delayed clicks, per scenario, model and time window (params.yaml: quality).

    Exit code: 0 ok, 1 breach, 3 not enough labelled rows, 2 usage error."""
    from ctrflow.monitoring.report import QUALITY_PNG, plot_quality
    from ctrflow.steps import quality_step

    result = quality_step(_params(ctx), requests_path, labels, out_dir)
    click.echo(result.summary())
    png = plot_quality(result.series, Path(out_dir) / QUALITY_PNG)
    click.echo(f"summary: {result.summary_path}" + (f"\nplot: {png}" if png else ""))
    sys.exit(result.exit_code)


@monitor.command("run")
@click.option("--training-set", required=True, type=click.Path(exists=True, file_okay=False), help="Reference: the training set folder.")
@click.option("--current", required=True, type=click.Path(exists=True), help="The request log folder, or a Parquet slice.")
@click.option("--labels", default=None, type=click.Path(exists=True), help="The label feed (Parquet); without it only drift runs.")
@click.option("--model-dir", default=None, type=click.Path(exists=True, file_okay=False), help="Scores the reference for prediction drift.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False))
@click.pass_context
def monitor_run_cmd(ctx: click.Context, training_set: str, current: str, labels: str | None, model_dir: str | None, out_dir: str) -> None:
    """Drift + online quality; a breach writes a retraining request (and submits training when params.yaml's
    monitoring section says so). Exit code: 0 ok, 1 breach, 3 not enough data, 2 usage error."""
    from ctrflow.monitoring.loop import monitor_run

    run = monitor_run(_params(ctx), training_set, current, out_dir, labels=labels, model_dir=model_dir)
    click.echo(run.summary())
    sys.exit(run.exit_code)


@monitor.command("schedule")
@click.option("--host", required=True, help="Kubeflow Pipelines API endpoint.")
@click.option("--training-set-uri", required=True, help="The training set artifact (object store URI) used as reference.")
@click.option("--model-uri", required=True, help="The served model's artifact URI.")
@click.option("--current", required=True, help="The request log location as the cluster sees it.")
@click.option("--labels", default="", help="The label feed location (empty: drift only).")
@click.option("--pipeline-root", default=None, help="Object-store root, e.g. s3://bucket/ctrflow.")
@click.option("--cron", default=None, help="Six-field cron, seconds first (default: monitoring.schedule_cron).")
@click.pass_context
def monitor_schedule(ctx: click.Context, host: str, training_set_uri: str, model_uri: str, current: str, labels: str, pipeline_root: str | None, cron: str | None) -> None:
    """Submit the monitoring pipeline (drift + quality + retraining request) as a recurring run."""
    from pipelines.runner import schedule_monitoring

    _echo_json(schedule_monitoring(host, _params(ctx), training_set_uri, model_uri, current, labels, pipeline_root=pipeline_root, cron=cron))


# ---- pipeline -------------------------------------------------------------------------------------------
@cli.group()
def pipeline() -> None:
    """The KFP pipelines: run locally, compile to IR YAML, submit to a Kubeflow cluster."""


@pipeline.command("run")
@click.option("--workdir", default="runs/latest", type=click.Path(file_okay=False), show_default=True)
@click.option("--model", "model_name", default="", help="Model to train (default: train.model).")
@click.option("--family", type=click.Choice(FAMILIES), default=None, help="DAG to run (default: pipeline.family).")
@click.pass_context
def pipeline_run(ctx: click.Context, workdir: str, model_name: str, family: str | None) -> None:
    """Run the training pipeline with the KFP local runner (SubprocessRunner, this venv); exit 1 when the gate fails."""
    from ctrflow.steps import use_bentoml_home
    from pipelines.runner import run_training_local

    params = _params(ctx)
    use_bentoml_home(params)
    run = run_training_local(params, workdir, model_name, family)
    _echo_json(run)
    if not run["gate_passed"]:
        click.echo((run.get("gate") or {}).get("summary", "promotion gate failed"), err=True)
        click.echo("nothing deployed: the promotion gate failed", err=True)
        sys.exit(1)


@pipeline.command("compile")
@click.option("--name", type=click.Choice(["training", "monitoring"]), default="training", show_default=True)
@click.option("--family", type=click.Choice(FAMILIES), default="standard", show_default=True, help="Training DAG's model family.")
@click.option("--out", "out_path", default=None, type=click.Path(dir_okay=False), help="Default: runs/<name>_pipeline.yaml")
@click.pass_context
def pipeline_compile(ctx: click.Context, name: str, family: str, out_path: str | None) -> None:
    """Write the pipeline's IR YAML (what Kubeflow Pipelines runs); pipeline.launcher picks its train step."""
    from pipelines.runner import compile_pipeline

    click.echo(compile_pipeline(name, out_path or f"runs/{name}_pipeline.yaml", family, _params(ctx)))


@pipeline.command("submit")
@click.option("--host", required=True, help="Kubeflow Pipelines API endpoint.")
@click.option("--feature-repo", required=True, help="Feast repo path inside the cluster's image or volume.")
@click.option("--pipeline-root", default=None, help="Object-store root, e.g. s3://bucket/ctrflow.")
@click.option("--cron", default=None, help="Six-field cron (seconds first) for a recurring run.")
@click.option("--family", type=click.Choice(FAMILIES), default=None, help="Training DAG (default: pipeline.family).")
@click.pass_context
def pipeline_submit(ctx: click.Context, host: str, feature_repo: str, pipeline_root: str | None, cron: str | None, family: str | None) -> None:
    """Submit the training pipeline to a Kubeflow cluster (once, or on a schedule with --cron)."""
    from pipelines.runner import submit

    params = _params(ctx)
    family = family or params["pipeline"]["family"]
    _echo_json(submit(host, params, feature_repo, pipeline_root=pipeline_root, cron=cron, family=family))


# ---- everything -----------------------------------------------------------------------------------------
@cli.command("run-all")
@click.option("--workdir", default="runs/latest", type=click.Path(file_okay=False), show_default=True)
@click.option("--requests", "n_requests", default=200, show_default=True, help="Rank requests sent to the deployed service.")
@click.pass_context
def run_all(ctx: click.Context, workdir: str, n_requests: int) -> None:
    """`make run`: the training pipeline, requests to the deployed service, the drift report; prints every path.

    Exit code 1, with the gate's reasons and the metrics of the models it compared, when the gate fails (then
    nothing new is deployed and nothing is served)."""
    from ctrflow.demo import run_everything
    from ctrflow.registry import GateFailedError

    try:
        summary = run_everything(_params(ctx), Path(workdir), n_requests=n_requests)
    except GateFailedError as exc:
        click.echo("\n" + str(exc), err=True)
        sys.exit(1)
    click.echo("\n" + summary)


def main() -> None:
    """Entry point: known failures print a readable message and exit 2, never a traceback."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as e:  # noqa: BLE001 - the CLI boundary
        if os.environ.get("CTRFLOW_DEBUG"):
            raise
        click.echo(f"error: {e}", err=True)
        click.echo("(set CTRFLOW_DEBUG=1 for the full traceback)", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
