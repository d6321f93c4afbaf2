"""The service guard on its own: strict /rank rules, the one error shape, settings, and the ASGI middleware driven
with real ASGI messages (the same middleware runs in `bentoml serve`: tests/test_guarded_serving.py)."""

from __future__ import annotations

import asyncio
import json

import pytest

from ctrflow.guard import (
    ENV_AUTH_TOKEN_ENV,
    ENV_MAX_REQUEST_BYTES,
    VALUE_CHARS,
    RankRules,
    RequestError,
    ServiceGuard,
    max_request_bytes_from_env,
    parse_json,
    reshape_error,
    set_rules,
    token_from_env,
    value_text,
)

RULES = RankRules(("home", "search"), max_candidates=5)
SHAPE = {"status", "field", "rule", "message", "value"}


def _refused(payload) -> RequestError:
    with pytest.raises(RequestError) as info:
        RULES.check(payload)
    assert set(info.value.body()) == SHAPE
    return info.value


def test_a_valid_body_passes_unchanged():
    body = {"user_id": -(2**63), "scenario": "home", "item_ids": [0, 2**63 - 1, 5]}
    assert RULES.check(body) is body


@pytest.mark.parametrize(
    ("payload", "field", "rule", "value"),
    [
        ({"user_id": True, "scenario": "home", "item_ids": [1]}, "user_id", "type", "true"),
        ({"user_id": False, "scenario": "home", "item_ids": [1]}, "user_id", "type", "false"),
        ({"user_id": "7", "scenario": "home", "item_ids": [1]}, "user_id", "type", '"7"'),
        ({"user_id": 7.0, "scenario": "home", "item_ids": [1]}, "user_id", "type", "7.0"),
        ({"user_id": None, "scenario": "home", "item_ids": [1]}, "user_id", "type", "null"),
        ({"user_id": 2**63, "scenario": "home", "item_ids": [1]}, "user_id", "int64_range", str(2**63)),
        ({"user_id": -(2**63) - 1, "scenario": "home", "item_ids": [1]}, "user_id", "int64_range", str(-(2**63) - 1)),
        ({"user_id": 1, "scenario": "home", "item_ids": [1, True]}, "item_ids[1]", "type", "true"),
        ({"user_id": 1, "scenario": "home", "item_ids": [1, "2"]}, "item_ids[1]", "type", '"2"'),
        ({"user_id": 1, "scenario": "home", "item_ids": [2.5]}, "item_ids[0]", "type", "2.5"),
        ({"user_id": 1, "scenario": "home", "item_ids": [2**64]}, "item_ids[0]", "int64_range", str(2**64)),
        ({"user_id": 1, "scenario": "home", "item_ids": 3}, "item_ids", "type", "3"),
        ({"user_id": 1, "scenario": "home", "item_ids": []}, "item_ids", "min_items", "[]"),
        ({"user_id": 1, "scenario": "home", "item_ids": [1, 2, 3, 4, 5, 6]}, "item_ids", "max_items", "[1, 2, 3, 4, 5, 6]"),
        ({"user_id": 1, "scenario": "home", "item_ids": [3, 1, 3, 1, 2]}, "item_ids", "unique", "[1, 3]"),
        ({"user_id": 1, "scenario": 3, "item_ids": [1]}, "scenario", "type", "3"),
        ({"user_id": 1, "scenario": "nowhere", "item_ids": [1]}, "scenario", "one_of", '"nowhere"'),
        ({"scenario": "home", "item_ids": [1]}, "user_id", "required", None),
        ({"user_id": 1, "item_ids": [1]}, "scenario", "required", None),
        ({"user_id": 1, "scenario": "home", "item_ids": [1], "items": [2]}, "items", "unknown_field", None),
        ([1, 2], None, "type", "[1, 2]"),
    ],
)
def test_each_broken_rule_is_a_422_naming_field_and_rule(payload, field, rule, value):
    err = _refused(payload)
    assert (err.status, err.field, err.rule) == (422, field, rule)
    assert err.body()["value"] == value


def test_fields_the_api_accepts_besides_the_three_are_let_through():
    rules = RankRules(("home",), 5, frozenset({"user_id", "scenario", "item_ids", "explain"}))
    assert rules.check({"user_id": 1, "scenario": "home", "item_ids": [1], "explain": True})["explain"] is True


def test_a_megabyte_scenario_is_never_echoed_whole():
    err = _refused({"user_id": 1, "scenario": "x" * 1_000_000, "item_ids": [1]})
    body = json.dumps(err.body())
    assert len(body) < 1000
    assert err.body()["value"] == json.dumps("x" * VALUE_CHARS) + "... (1000000 characters)"
    assert "1000000 characters" in err.body()["message"]


def test_value_text_bounds_every_kind_of_value():
    assert value_text("abc") == '"abc"'
    assert value_text(list(range(10_000))).endswith("characters)")
    assert len(value_text(list(range(10_000)))) < VALUE_CHARS + 40
    assert value_text({"a": 1}) == '{"a": 1}'


@pytest.mark.parametrize("body", [b"{", b"", b'{"user_id": NaN}', b"\xff\xfe", b"[" * 100_000 + b"]" * 100_000])
def test_bodies_that_are_not_strict_json_are_a_400(body):
    with pytest.raises(RequestError) as info:
        parse_json(body)
    assert (info.value.status, info.value.rule) == (400, "json")


# ---- BentoML's and Starlette's error answers, reshaped ---------------------------------------------------------------
def test_bentoml_pydantic_errors_become_a_422_naming_the_field():
    bentoml_body = {
        "error": "2 validation errors for Input",
        "detail": [{"type": "int_type", "loc": ["item_ids", 3], "msg": "Input should be a valid integer"}, {"type": "x"}],
    }
    status, body = reshape_error(400, json.dumps(bentoml_body).encode(), {"path": "/rank"})
    assert status == 422
    assert body == {
        "status": 422, "field": "item_ids[3]", "rule": "int_type",
        "message": "item_ids[3]: Input should be a valid integer (and 1 more error)", "value": None,
    }  # fmt: skip


def test_bentoml_exception_lists_and_server_errors_get_the_shape():
    status, body = reshape_error(400, json.dumps([{"error": "scenario: bad"}]).encode(), {})
    assert (status, body["field"], body["rule"], body["message"]) == (400, "scenario", "bad_request", "scenario: bad")
    status, body = reshape_error(500, b'{"error": "An unexpected error has occurred"}', {})
    assert (status, body["rule"], body["field"]) == (500, "internal", None)
    status, body = reshape_error(404, b"Not Found", {"path": "/x" * 500})
    assert set(body) == SHAPE and body["field"] == "path" and len(body["value"]) < VALUE_CHARS + 40
    status, body = reshape_error(503, b"", {})
    assert body["message"] == "HTTP 503" and body["rule"] == "unavailable"


# ---- settings ----------------------------------------------------------------------------------------------------------
def test_the_token_is_read_from_the_variable_the_config_names():
    assert token_from_env({}) is None
    assert token_from_env({ENV_AUTH_TOKEN_ENV: "MY_TOKEN", "MY_TOKEN": "s3cret"}) == "s3cret"
    with pytest.raises(RuntimeError, match="MY_TOKEN is unset or empty"):
        token_from_env({ENV_AUTH_TOKEN_ENV: "MY_TOKEN"})


def test_max_request_bytes_defaults_to_the_typed_config():
    from ctrflow.config import ServingParams

    assert max_request_bytes_from_env({}) == ServingParams().max_request_bytes == 1_048_576
    assert max_request_bytes_from_env({ENV_MAX_REQUEST_BYTES: "2048"}) == 2048
    with pytest.raises(RuntimeError, match="integer"):
        max_request_bytes_from_env({ENV_MAX_REQUEST_BYTES: "1e6"})


# ---- the middleware, driven with ASGI messages --------------------------------------------------------------------------
async def _downstream(scope, receive, send):
    """A stand-in for BentoML's app: echoes the body it received, or answers like Starlette for unknown paths."""
    if scope["path"] == "/boom":
        await send({"type": "http.response.start", "status": 500, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b'{"error": "An unexpected error has occurred"}'})
        return
    message = await receive()
    body = json.dumps({"echo": message.get("body", b"").decode()}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


def _call(guard, path, body=b"", headers=(), chunks=None, method="POST"):
    """(status, headers, JSON body, how many body messages the app read)."""
    messages = [{"type": "http.request", "body": c, "more_body": k < len(chunks) - 1} for k, c in enumerate(chunks)] if chunks else [
        {"type": "http.request", "body": body, "more_body": False}
    ]
    read = []
    sent = []

    async def receive():
        if messages:
            read.append(1)
            return messages.pop(0)
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "path": path, "method": method, "headers": [(k.lower().encode(), v.encode()) for k, v in headers]}
    asyncio.run(guard(scope, receive, send))
    start, payload = sent[0], b"".join(m.get("body", b"") for m in sent[1:])
    return start["status"], dict(start["headers"]), json.loads(payload), len(read)


def test_middleware_refuses_a_declared_oversize_body_without_reading_it():
    guard = ServiceGuard(_downstream, max_request_bytes=2048, token=None)
    status, headers, body, read = _call(guard, "/rank", b"x" * 4096, headers=[("Content-Length", "4096")])
    assert (status, body["rule"], body["field"], read) == (413, "max_request_bytes", "body", 0)
    assert headers[b"connection"] == b"close"
    status, _, body, read = _call(guard, "/rank", chunks=[b"x" * 1000] * 5)  # chunked: stops at the limit
    assert (status, read) == (413, 3)


def test_middleware_checks_registered_rules_and_passes_the_body_on():
    set_rules("/guarded-test", RULES)
    guard = ServiceGuard(_downstream, max_request_bytes=2048, token=None)
    ok = json.dumps({"user_id": 1, "scenario": "home", "item_ids": [1]}).encode()
    assert _call(guard, "/guarded-test", ok)[:3:2] == (200, {"echo": ok.decode()})
    status, _, body, _ = _call(guard, "/guarded-test", b'{"user_id": true, "scenario": "home", "item_ids": [1]}')
    assert (status, body["field"], body["rule"]) == (422, "user_id", "type")
    status, _, body, _ = _call(guard, "/guarded-test", ok, headers=[("Content-Type", "text/plain")])
    assert (status, body["rule"]) == (415, "media_type")
    status, _, body, _ = _call(guard, "/boom", ok)
    assert status == 500 and set(body) == SHAPE and body["rule"] == "internal"


def test_middleware_token_guards_all_but_probes_and_metrics():
    guard = ServiceGuard(_downstream, max_request_bytes=2048, token="s3cret")
    status, headers, body, _ = _call(guard, "/anything", b"{}")
    assert (status, body["field"], body["rule"]) == (401, "Authorization", "auth")
    assert headers[b"www-authenticate"].startswith(b"Bearer")
    assert _call(guard, "/anything", b"{}", headers=[("Authorization", "Bearer wrong")])[0] == 401
    assert _call(guard, "/anything", b"{}", headers=[("Authorization", "Basic s3cret")])[0] == 401
    assert _call(guard, "/anything", b"{}", headers=[("Authorization", "Bearer s3cret")])[0] == 200
    for path in ("/healthz", "/livez", "/readyz", "/metrics"):
        assert _call(guard, path, b"{}", method="GET")[0] == 200


def test_the_serving_section_reaches_the_service_environment_and_the_client(monkeypatch):
    from ctrflow.guard import guard_env
    from ctrflow.server import auth_headers

    env = guard_env({"max_request_bytes": 2048, "auth_token_env": None})
    assert env == {ENV_MAX_REQUEST_BYTES: "2048", ENV_AUTH_TOKEN_ENV: ""}  # overrides an inherited token variable
    assert token_from_env({**env, "SERVE_TOKEN": "abc"}) is None and max_request_bytes_from_env(env) == 2048
    env = guard_env({"max_request_bytes": 4096, "auth_token_env": "SERVE_TOKEN"})
    assert (env[ENV_MAX_REQUEST_BYTES], env[ENV_AUTH_TOKEN_ENV]) == ("4096", "SERVE_TOKEN")
    assert token_from_env({**env, "SERVE_TOKEN": "abc"}) == "abc"

    assert auth_headers({"auth_token_env": None}) == {}
    monkeypatch.setenv("SERVE_TOKEN", "abc")
    assert auth_headers({"auth_token_env": "SERVE_TOKEN"}) == {"Authorization": "Bearer abc"}
    monkeypatch.delenv("SERVE_TOKEN")
    with pytest.raises(RuntimeError, match="SERVE_TOKEN is unset"):
        auth_headers({"auth_token_env": "SERVE_TOKEN"})


def test_auth_token_env_must_be_a_variable_name():
    from ctrflow.config import ConfigError, load_params, parse_overrides

    assert load_params(None, parse_overrides(["serving.auth_token_env=CTR_TOKEN"]))["serving"]["auth_token_env"] == "CTR_TOKEN"
    with pytest.raises(ConfigError, match="auth_token_env"):
        load_params(None, parse_overrides(["serving.auth_token_env=not a name"]))
    with pytest.raises(ConfigError, match="max_request_bytes"):
        load_params(None, parse_overrides(["serving.max_request_bytes=10"]))


def test_the_request_log_flush_thresholds_come_from_params(tmp_path):
    """serving.request_log_flush_rows / _seconds reach the worker's environment; params.yaml and the typed default
    agree (one place for the default), and a bad value is refused naming the key."""
    from ctrflow.config import ConfigError, ServingParams, load_params, parse_overrides
    from ctrflow.server import service_env

    deployment = {"bentoml_home": tmp_path, "feature_repo": tmp_path, "model_tag": "m:1"}
    env = service_env(deployment, tmp_path / "log")
    assert (env["CTRFLOW_REQUEST_LOG_FLUSH_ROWS"], env["CTRFLOW_REQUEST_LOG_FLUSH_SECONDS"]) == ("20000", "5.0")
    s = load_params(None, parse_overrides(["serving.request_log_flush_rows=500", "serving.request_log_flush_seconds=0.25"]))["serving"]
    env = service_env(deployment, tmp_path / "log", request_log_flush_rows=s["request_log_flush_rows"], request_log_flush_seconds=s["request_log_flush_seconds"])
    assert (env["CTRFLOW_REQUEST_LOG_FLUSH_ROWS"], env["CTRFLOW_REQUEST_LOG_FLUSH_SECONDS"]) == ("500", "0.25")
    assert load_params(None)["serving"]["request_log_flush_rows"] == ServingParams().request_log_flush_rows
    with pytest.raises(ConfigError, match="request_log_flush_rows"):
        load_params(None, parse_overrides(["serving.request_log_flush_rows=0"]))
