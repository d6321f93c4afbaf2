"""The typed configuration: unknown keys at every level (with the nearest name), values parsed by type, defaults
in one place, the KFP struct round trip, and the CLI stopping with exit code 2 on a bad key or value."""

from __future__ import annotations

import json
import sys

import pytest
import yaml
from google.protobuf import json_format, struct_pb2

from ctrflow import config
from ctrflow.config import (
    REPO_ROOT,
    ConfigError,
    load_config,
    load_params,
    parse_overrides,
    read_params,
    section,
    to_struct,
    validate_params,
)


def write(tmp_path, data) -> str:
    path = tmp_path / "params.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return str(path)


# ---- the committed file and the defaults ---------------------------------------------------------------------
def test_committed_params_validate_and_keep_every_value():
    raw = read_params(REPO_ROOT / "params.yaml")
    params = load_params(REPO_ROOT / "params.yaml")

    def contained(a, b, path=""):  # every value written in params.yaml comes back as written
        if isinstance(a, dict):
            for k, v in a.items():
                assert k in b, f"{path}{k} dropped"
                contained(v, b[k], f"{path}{k}.")
        else:
            assert a == b, f"{path}: {a!r} -> {b!r}"

    contained(raw, params)
    assert params["train"]["lr"] == 0.001 and isinstance(params["train"]["epochs"], int)


def test_missing_sections_get_the_typed_defaults(tmp_path):
    params = load_params(write(tmp_path, {"train": {"epochs": 1}}))
    assert params["train"]["epochs"] == 1 and params["train"]["batch_size"] == 1024
    # the defaults that disagreed in code (gate minimum 0.0, drift threshold 0.05) now come from one place: a
    # candidate must beat a reference model trained in the same run
    assert params["gate"] == {"reference_model": "lr", "min_lift_over_reference": 0.0, "tolerance": 0.005, "min_valid_auc": None}
    assert params["drift"]["stattest_threshold"] == 0.1
    assert set(params) == set(config.Params.model_fields)


def test_an_empty_section_is_its_defaults_never_promote_anything(tmp_path):
    params = load_params(write(tmp_path, "gate:\ndrift:\n"))
    assert params["gate"]["reference_model"] == "lr"  # a candidate must still beat the reference
    assert section({}, "gate").reference_model == "lr"  # the typed accessor on a dict without `gate`


def test_an_empty_file_is_all_defaults(tmp_path):
    assert load_params(write(tmp_path, "")) == config.Params().model_dump()


def test_typed_access_matches_the_dict():
    cfg = load_config(REPO_ROOT / "params.yaml", {"train.lr": 0.01})
    assert cfg.train.lr == 0.01 and cfg.model_dump()["train"]["lr"] == 0.01


# ---- unknown keys ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("override", "named", "suggested"),
    [
        ({"trian": {"epochs": 1}}, "trian", "train"),
        ({"train.epcohs": 1}, "train.epcohs", "epochs"),
        ({"data.synthetic.n_user": 10}, "data.synthetic.n_user", "n_users"),
        ({"models.dcnv3": {"mlp": [8]}}, "models.dcnv3", "dcnv2"),
        ({"models.dcnv2.cross_layer": 2}, "models.dcnv2.cross_layer", "cross_layers"),
        ({"models.dgenctr.pretrain.epoch": 2}, "models.dgenctr.pretrain.epoch", "epochs"),
        ({"models.dgenctr.finetune.transfr": "all"}, "models.dgenctr.finetune.transfr", "transfer"),
        ({"models.gsvr.backbone_params": {"hiden": [8]}}, "models.gsvr.backbone_params.hiden", "hidden"),
        ({"embeddings.modalities.kg.dimm": 8}, "embeddings.modalities.kg.dimm", "dim"),
        ({"embeddings.modalities.text.column": ["title"]}, "embeddings.modalities.text.column", "columns"),
        ({"serving.worker": 2}, "serving.worker", "workers"),
    ],
)
def test_unknown_keys_are_rejected_at_every_level_with_the_nearest_name(override, named, suggested):
    with pytest.raises(ConfigError) as err:
        load_params(REPO_ROOT / "params.yaml", override)
    assert f"unknown key '{named}'" in str(err.value) and f"'{suggested}'" in str(err.value)


def test_every_fault_is_listed_at_once(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_params(write(tmp_path, {"train": {"epcohs": 1, "lr": "fast"}, "gate": {"min_valid_auc": 2}}))
    text = str(err.value)
    assert len(err.value.problems) == 3
    assert "train.epcohs" in text and "train.lr" in text and "gate.min_valid_auc" in text
    assert "Traceback" not in text


def test_backbone_params_follow_the_configured_backbone():
    ok = load_params(REPO_ROOT / "params.yaml", {"models.gsvr.backbone": "mmoe", "models.gsvr.backbone_params": {"experts": 2}})
    assert ok["models"]["gsvr"]["backbone_params"] == {"experts": 2}
    with pytest.raises(ConfigError, match="backbone_params.experts"):  # star has no experts
        load_params(REPO_ROOT / "params.yaml", {"models.gsvr.backbone": "star", "models.gsvr.backbone_params": {"experts": 2}})
    with pytest.raises(ConfigError, match="did you mean 'star'"):
        load_params(REPO_ROOT / "params.yaml", {"models.gsvr.backbone": "stra"})


def test_unknown_model_in_train_model():
    with pytest.raises(ConfigError, match="train.model.*did you mean 'dcnv2'"):
        load_params(REPO_ROOT / "params.yaml", {"train.model": "dcn2"})


# ---- values by type -------------------------------------------------------------------------------------------
def test_set_reads_scientific_notation_as_a_float():
    overrides = parse_overrides(["train.lr=1e-3", "models.dgenctr.pretrain.lr=2E-4", "train.epochs=1e1"])
    params = load_params(REPO_ROOT / "params.yaml", overrides)
    assert params["train"]["lr"] == 0.001 and isinstance(params["train"]["lr"], float)
    assert params["models"]["dgenctr"]["pretrain"]["lr"] == 0.0002
    assert params["train"]["epochs"] == 10 and isinstance(params["train"]["epochs"], int)


def test_a_yaml_file_with_scientific_notation_is_read_as_a_float(tmp_path):
    # PyYAML (YAML 1.1) reads `1e-3` as the string "1e-3": the typed field makes it the float
    params = load_params(write(tmp_path, "train:\n  lr: 1e-3\nmodels:\n  dcnv2:\n    dropout: 5e-2\n"))
    assert params["train"]["lr"] == 0.001 and params["models"]["dcnv2"]["dropout"] == 0.05


@pytest.mark.parametrize(("text", "value"), [("false", False), ("off", False), ("no", False), ("true", True), ("on", True), ("yes", True)])
def test_set_reads_bools_for_bool_fields(text, value):
    assert parse_overrides([f"train.progress={text}"]) == {"train.progress": value}


def test_set_keeps_text_for_text_fields():
    # YAML 1.1 would make these a bool, an int and a date
    got = parse_overrides(["features.service=no", "registry.model_name=123", "validation.min_timestamp=2001-02-03"])
    params = load_params(REPO_ROOT / "params.yaml", got)
    assert params["features"]["service"] == "no" and params["registry"]["model_name"] == "123"
    assert params["validation"]["min_timestamp"] == "2001-02-03"


def test_set_reads_lists_mappings_and_null():
    got = parse_overrides(["models.dcnv2.mlp=[8, 8]", "data.path=null", "data.synthetic={n_users: 10}", "embeddings.modalities=[text]"])
    assert got["models.dcnv2.mlp"] == [8, 8] and got["data.path"] is None and got["data.synthetic"] == {"n_users": 10}
    params = load_params(REPO_ROOT / "params.yaml", got)
    assert params["data"]["synthetic"]["n_users"] == 10 and params["data"]["synthetic"]["n_items"] == 1000
    assert list(params["embeddings"]["modalities"]) == ["text"]


@pytest.mark.parametrize(
    ("pair", "message"),
    [
        ("train.epochs=abc", "train.epochs=abc"),
        ("data.split=sideways", "'temporal' or 'random'"),
        ("train.lr.x=1", "is a value, not a section"),
        ("epochs", "key.sub=value"),
        ("train.epcohs=1", "did you mean 'epochs'"),
        ("data.synthetic={n_user: 5}", r"unknown key 'data.synthetic.n_user' \(did you mean 'n_users'\?\)"),
    ],
)
def test_set_rejects_bad_values_and_keys_readably(pair, message):
    with pytest.raises(ConfigError, match=message):
        parse_overrides([pair])


def test_out_of_range_values_are_rejected():
    for override in ({"gate.min_valid_auc": 1.5}, {"train.batch_size": 0}, {"drift.max_drifted_share": -0.1}):
        with pytest.raises(ConfigError, match=next(iter(override))):
            load_params(REPO_ROOT / "params.yaml", override)


@pytest.mark.parametrize("pair", ["train.lr=inf", "train.lr=nan", "train.lr=-inf", "models.dcnv2.dropout=inf", "gate.min_valid_auc=nan"])
def test_set_refuses_infinite_and_nan_numbers(pair):
    # a float field takes any numeric notation (1e-3, .5, 10) but never ±inf or NaN: they only show up as a diverged run
    with pytest.raises(ConfigError, match="finite number"):
        load_params(REPO_ROOT / "params.yaml", parse_overrides([pair]))


def test_a_params_file_with_infinite_numbers_is_refused(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_params(write(tmp_path, "train:\n  lr: .inf\nmodels:\n  dcnv2:\n    dropout: .nan\n"))
    assert "train.lr" in str(err.value) and "models.dcnv2.dropout" in str(err.value)
    assert len(err.value.problems) == 2


@pytest.mark.parametrize(
    ("pair", "named"),
    [
        ("train.epochs=true", "train.epochs: expected int, got a yes/no value (true)"),
        ("train.lr=yes", "train.lr: expected float, got a yes/no value (true)"),
        ("validation.max_rows=false", "validation.max_rows: expected int or None, got a yes/no value (false)"),
        ("models.dcnv2.cross_layers=on", "models.dcnv2.cross_layers: expected int, got a yes/no value (true)"),
    ],
)
def test_a_yes_no_value_for_a_number_is_refused(pair, named):
    # pydantic alone reads true as 1: `--set train.epochs=true` would train one epoch without a word
    with pytest.raises(ConfigError) as err:
        load_params(REPO_ROOT / "params.yaml", parse_overrides([pair]))
    assert named in str(err.value)


def test_a_yes_no_value_in_a_params_file_is_refused_for_numbers_only(tmp_path):
    with pytest.raises(ConfigError, match="train.patience: expected int, got a yes/no value"):
        load_params(write(tmp_path, "train:\n  patience: yes\n"))
    assert load_params(write(tmp_path, "train:\n  progress: no\n"))["train"]["progress"] is False


# ---- the KFP struct round trip --------------------------------------------------------------------------------
def struct_round_trip(params: dict) -> dict:
    s = struct_pb2.Struct()
    s.update(to_struct(params))
    return json_format.MessageToDict(s)


def test_ints_come_back_as_ints_after_the_struct_round_trip():
    params = load_params(REPO_ROOT / "params.yaml")
    back = struct_round_trip(params)
    assert back["train"]["epochs"] == 20.0 and isinstance(back["train"]["epochs"], float)  # what KFP hands over
    again = validate_params(back)
    assert json.dumps(again, sort_keys=True) == json.dumps(params, sort_keys=True)  # same values and same types
    assert again["models"]["dcnv2"]["mlp"] == [400, 400, 400] and all(isinstance(v, int) for v in again["models"]["dcnv2"]["mlp"])


def test_nulls_survive_the_struct_round_trip():
    # null is not always the default: no upper bound on rows, DGenCTR's width = train.embedding_dim, no cache
    params = load_params(REPO_ROOT / "params.yaml", {"validation.max_rows": None, "models.dgenctr.d_model": None, "embeddings.cache_dir": None})
    again = validate_params(struct_round_trip(params))
    assert again["validation"]["max_rows"] is None and again["models"]["dgenctr"]["d_model"] is None
    assert again["embeddings"]["cache_dir"] is None
    assert again == params


def test_a_non_integral_float_for_an_int_is_rejected():
    with pytest.raises(ConfigError, match="train.epochs"):
        validate_params({"train": {"epochs": 2.5}})


# ---- the CLI ---------------------------------------------------------------------------------------------------
def run_main(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """The `ctrflow` entry point in this process: (exit code, stdout + stderr)."""
    from ctrflow.cli import main

    monkeypatch.setattr(sys, "argv", ["ctrflow", *args])
    code = 0
    try:
        main()
    except SystemExit as exit_:
        code = exit_.code or 0
    out = capsys.readouterr()
    return code, out.out + out.err


def test_cli_misspelt_set_exits_2_naming_the_nearest_key(monkeypatch, capsys, tmp_path):
    code, text = run_main(monkeypatch, capsys, "--set", "train.epcohs=1", "train", "--training-set", str(tmp_path), "--out", str(tmp_path / "m"))
    assert code == 2
    assert "train.epcohs" in text and "'epochs'" in text and "Traceback" not in text
    assert not (tmp_path / "m").exists()


def test_cli_bad_params_file_exits_2(monkeypatch, capsys, tmp_path):
    bad = write(tmp_path, {"drift": {"stattest_treshold": 0.1}})
    code, text = run_main(monkeypatch, capsys, "--params", bad, "models", "list")
    assert code == 2 and "drift.stattest_treshold" in text and "stattest_threshold" in text and "Traceback" not in text


def test_a_named_params_file_that_does_not_exist_is_an_error_not_a_fallback(monkeypatch, tmp_path):
    # falling back to ./params.yaml or the repo's file would run with settings nobody chose
    missing = tmp_path / "my-params.yaml"
    with pytest.raises(FileNotFoundError, match="my-params.yaml"):
        load_params(missing)
    monkeypatch.setenv("CTRFLOW_PARAMS", str(missing))
    with pytest.raises(FileNotFoundError, match=r"\$CTRFLOW_PARAMS .*my-params.yaml"):
        load_params()
    mine = write(tmp_path, {"train": {"epochs": 3}})
    monkeypatch.setenv("CTRFLOW_PARAMS", mine)
    assert load_params()["train"]["epochs"] == 3  # the variable is read when it names a file
    assert load_params(REPO_ROOT / "params.yaml")["train"]["epochs"] == 20  # an explicit path wins over it


def test_cli_missing_params_file_or_variable_exits_2(monkeypatch, capsys, tmp_path):
    missing = str(tmp_path / "nope.yaml")
    code, text = run_main(monkeypatch, capsys, "--params", missing, "models", "list")
    assert code == 2 and "nope.yaml" in text and "does not exist" in text and "Traceback" not in text
    monkeypatch.setenv("CTRFLOW_PARAMS", missing)
    code, text = run_main(monkeypatch, capsys, "models", "list")
    assert code == 2 and "$CTRFLOW_PARAMS" in text and "nope.yaml" in text


# ---- the library's defaults come from the typed sections --------------------------------------------------------
def test_library_defaults_are_the_typed_sections():
    from ctrflow.embeddings import KG_DEFAULTS, TEXT_DEFAULTS
    from ctrflow.training.pretrain import PRETRAIN_DEFAULTS, dgenctr_settings

    assert PRETRAIN_DEFAULTS == config.DGenCTRPretrain().model_dump()
    assert TEXT_DEFAULTS == config.TextModality().model_dump() and KG_DEFAULTS == config.KGModality().model_dump()
    _, pre = dgenctr_settings({"train": {"seed": 3, "threads": 1}, "models": {"dgenctr": {}}})
    assert pre["seed"] == 3 and pre["threads"] == 1 and pre["epochs"] == config.DGenCTRPretrain().epochs
    with pytest.raises(ConfigError, match="models.dgenctr.pretrain.epoch.*'epochs'"):
        dgenctr_settings({"pretrain": {"epoch": 2}})


@pytest.mark.component
def test_cli_set_lr_in_scientific_notation_trains_with_that_float(monkeypatch, capsys, tmp_path, tiny_training_set):
    tiny = ["train.epochs=1", "train.threads=1", "train.progress=off", "train.embedding_dim=4", "models.dcnv2.mlp=[8]", "models.dcnv2.cross_layers=1"]
    sets = [a for pair in ["train.lr=1e-3", *tiny] for a in ("--set", pair)]
    code, text = run_main(monkeypatch, capsys, *sets, "train", "--training-set", str(tiny_training_set), "--out", str(tmp_path / "m"))
    assert code == 0, text
    saved = json.loads((tmp_path / "m" / "params.json").read_text())
    assert saved["train"]["lr"] == 0.001 and isinstance(saved["train"]["lr"], float)
    assert saved["train"]["epochs"] == 1


# ---- tests by level ----------------------------------------------------------------------------------------------
def test_every_test_file_has_a_level():
    # an unlisted file silently falls to the default level: `make test-quick` would run (or skip) it by accident
    from conftest import FILE_LEVELS, LEVELS  # tests/ is on sys.path (pytest prepends a conftest's folder)

    files = {p.name for p in (REPO_ROOT / "tests").rglob("test_*.py")}
    assert sorted(files - set(FILE_LEVELS)) == []
    assert sorted(set(FILE_LEVELS) - files) == []  # no level for a file that is gone
    assert set(FILE_LEVELS.values()) <= set(LEVELS)
