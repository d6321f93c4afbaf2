"""The ranking service's HTTP boundary: a body-size limit, strict request types, one error shape, a bearer token.

`ServiceGuard` is an ASGI middleware that serving/service.py adds to the BentoML service
(`Service.add_asgi_middleware`); it runs in each worker in front of BentoML's own request handling.

Why in front of BentoML and not in the API's signature: BentoML reads the whole body and parses it with pydantic in
lax mode before the API method runs, so a 300 MB body costs its memory before any check (measured: +200 MB), JSON
`true` becomes user id 1 and "7" becomes 7, and its errors come in two shapes (`{"error", "detail"}` for pydantic,
a one-element list `[{"error": ...}]` for its own exceptions) that echo whatever the message holds.

What it does, per request (probes and /metrics pass untouched: `OPEN_PATHS`):
1. auth: with a token configured, `Authorization: Bearer <token>` is required (401 otherwise, compared in constant
   time). The token is read from the environment variable *named* by `serving.auth_token_env`, never from a file
   in the repository. /healthz, /livez, /readyz and /metrics stay open: orchestrators and Prometheus probe them
   without credentials, and they hold no request content (counters and latencies only).
2. size: a declared Content-Length above `serving.max_request_bytes` is refused with 413 before a byte of the body is
   read; a body without one (chunked) is read only up to the limit, then refused the same way.
3. types: for an API with registered rules (`set_rules`, the service registers /rank's), the body is parsed here,
   strictly: ids must be JSON integers in int64 range (no booleans, numeric strings or floats, not even 1.0), the
   scenario a known string, the candidates 1..N distinct ids, no unknown fields. 422 names the field. The checked
   payload is left in the request's state (`request.state.ctrflow_request`). Cost: ~60 us for 100 candidates,
   ~0.5 ms for 1000 (JSON parsing is most of it), measured on this 2-core machine.
4. one error shape: every error answer of the service, ours and BentoML's (404, 405, pydantic, 500), is
   `error_body`'s JSON object: {"status", "field", "rule", "message", "value"}, the value and the message cut to a
   bounded length (`VALUE_CHARS`, `MESSAGE_CHARS`), so a 1 MB string is never echoed back.

Rejections are counted on /metrics: `ctrflow_requests_rejected_total{status, rule}`.
Not covered: BentoML's own outer middlewares answer a timeout (504) and a full concurrency limit (429) in their own
shape before this one runs; neither is configured to trigger for /rank by default (traffic timeout 30 s).
"""

from __future__ import annotations

import hmac
import json
import logging
import os
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/healthz", "/livez", "/readyz", "/metrics"})
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
VALUE_CHARS = 100  # an offending value is echoed at most this long
MESSAGE_CHARS = 400
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
ENV_MAX_REQUEST_BYTES = "CTRFLOW_MAX_REQUEST_BYTES"  # serving.max_request_bytes, set by ctrflow.server.service_env
ENV_AUTH_TOKEN_ENV = "CTRFLOW_AUTH_TOKEN_ENV"  # serving.auth_token_env: the NAME of the variable holding the token

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_RULE_OF_STATUS = {
    400: "bad_request", 401: "auth", 403: "forbidden", 404: "not_found", 405: "method", 413: "max_request_bytes",
    415: "media_type", 422: "invalid", 429: "too_many_requests", 500: "internal", 503: "unavailable", 504: "timeout",
}  # fmt: skip


# ---- the error shape ----------------------------------------------------------------------------------------------
def cut(text: str, limit: int) -> str:
    """`text`, or its first `limit` characters and how long it was."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def value_text(value: Any, limit: int = VALUE_CHARS) -> str:
    """The JSON text of an offending value, cut to `limit` characters (a long string is cut before it is encoded)."""
    if isinstance(value, str):
        return json.dumps(value) if len(value) <= limit else f"{json.dumps(value[:limit])}... ({len(value)} characters)"
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return cut(text, limit)


_ABSENT = object()
FROM_ENV = object()  # ServiceGuard(token=FROM_ENV): read the token from the environment


@dataclass
class RequestError(Exception):
    """A refused request: HTTP status, the field at fault (None: the request as a whole), the rule it broke, a message
    for a person, and the offending value (absent: not shown)."""

    status: int
    field: str | None
    rule: str
    message: str
    value: Any = _ABSENT
    headers: Mapping[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.message

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.field, self.rule, self.message, None if self.value is _ABSENT else value_text(self.value))


def error_body(status: int, field: str | None, rule: str, message: str, value: str | None = None) -> dict[str, Any]:
    """The one error body of the service: {"status", "field", "rule", "message", "value"} (value: JSON text or None)."""
    return {"status": status, "field": field, "rule": rule, "message": cut(message, MESSAGE_CHARS), "value": value}


# ---- strict request rules -----------------------------------------------------------------------------------------
def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a JSON boolean"
    if isinstance(value, float):
        return "a JSON number with a fraction or an exponent"
    if isinstance(value, str):
        return "a JSON string"
    if value is None:
        return "null"
    if isinstance(value, list):
        return "a JSON array"
    if isinstance(value, dict):
        return "a JSON object"
    return "a JSON integer" if isinstance(value, int) else type(value).__name__


def int64(value: Any, field_name: str) -> int:
    """`value` if it is a JSON integer within int64, else RequestError 422 (booleans, strings, floats refused)."""
    if type(value) is not int:  # bool is a subclass of int: `true` is not user 1
        raise RequestError(422, field_name, "type", f"{field_name} must be a JSON integer (int64), not {_json_kind(value)}", value)
    if not INT64_MIN <= value <= INT64_MAX:
        raise RequestError(422, field_name, "int64_range", f"{field_name} must lie in the int64 range [-2^63, 2^63-1]", value)
    return value


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_json(body: bytes) -> Any:
    """The JSON value of a request body; RequestError 400 (rule `json`) for anything that is not strict JSON."""
    try:
        return json.loads(body, parse_constant=_refuse_constant)  # NaN / Infinity are not JSON
    except json.JSONDecodeError as exc:
        raise RequestError(400, None, "json", f"the body is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from None
    except UnicodeDecodeError:
        raise RequestError(400, None, "json", "the body is not valid UTF-8 JSON") from None
    except RecursionError:
        raise RequestError(400, None, "json", "the body's JSON is nested too deeply") from None
    except ValueError as exc:
        raise RequestError(400, None, "json", f"the body is not valid JSON: {exc}") from None


@dataclass(frozen=True)
class RankRules:
    """The /rank body, strictly: {"user_id": int64, "scenario": one of `scenarios`, "item_ids": 1..`max_candidates`
    distinct int64}; `fields`: every field the API accepts (others are refused; None: only these three)."""

    scenarios: tuple[str, ...]
    max_candidates: int
    fields: frozenset[str] | None = None

    def check(self, payload: Any) -> dict[str, Any]:
        """The validated request (user_id, scenario, item_ids, and any other accepted field), or RequestError 422."""
        if not isinstance(payload, dict):
            raise RequestError(
                422, None, "type", f"the body must be a JSON object with user_id, scenario and item_ids, not {_json_kind(payload)}", payload
            )
        allowed = self.fields if self.fields is not None else frozenset(("user_id", "scenario", "item_ids"))
        for name in payload:
            if name not in allowed:
                raise RequestError(422, cut(name, VALUE_CHARS), "unknown_field", f"unknown field; the accepted fields are {sorted(allowed)}")
        for name in ("user_id", "scenario", "item_ids"):
            if name not in payload:
                raise RequestError(422, name, "required", f"{name} is required")
        int64(payload["user_id"], "user_id")
        scenario = payload["scenario"]
        if type(scenario) is not str:
            raise RequestError(422, "scenario", "type", f"scenario must be a JSON string, not {_json_kind(scenario)}", scenario)
        if scenario not in self.scenarios:
            raise RequestError(
                422, "scenario", "one_of", f"scenario {value_text(scenario, 40)} is not one of the model's scenarios {list(self.scenarios)}", scenario
            )
        ids = payload["item_ids"]
        if type(ids) is not list:
            raise RequestError(422, "item_ids", "type", f"item_ids must be a JSON array of integers, not {_json_kind(ids)}", ids)
        if not ids:
            raise RequestError(422, "item_ids", "min_items", "item_ids must hold at least 1 candidate", ids)
        if len(ids) > self.max_candidates:
            raise RequestError(
                422, "item_ids", "max_items", f"item_ids holds {len(ids)} candidates; at most {self.max_candidates} are ranked per request", ids
            )
        for k, v in enumerate(ids):
            if type(v) is not int or not INT64_MIN <= v <= INT64_MAX:
                int64(v, f"item_ids[{k}]")
        if len(set(ids)) != len(ids):
            seen: set[int] = set()
            repeated = sorted({i for i in ids if i in seen or seen.add(i)})
            raise RequestError(422, "item_ids", "unique", f"item ids must not repeat; {len(repeated)} do", repeated[:20])
        return payload


_RULES: dict[str, RankRules] = {}


def set_rules(path: str, rules: RankRules) -> None:
    """Check the JSON body of `path` with `rules` in this worker (the service registers them once its model is
    loaded: the scenarios are the model's)."""
    _RULES[path] = rules


def rules_for(path: str) -> RankRules | None:
    return _RULES.get(path)


# ---- settings ---------------------------------------------------------------------------------------------------
def token_from_env(env: Mapping[str, str] | None = None) -> str | None:
    """The bearer token: the value of the variable named by CTRFLOW_AUTH_TOKEN_ENV (serving.auth_token_env); None
    when no variable is named. A named variable that is unset or empty is an error: never serve open by mistake."""
    env = os.environ if env is None else env
    name = env.get(ENV_AUTH_TOKEN_ENV, "").strip()
    if not name:
        return None
    token = env.get(name, "")
    if not token.strip():
        raise RuntimeError(
            f"serving.auth_token_env names the environment variable {name}, but {name} is unset or empty: "
            "set it to the bearer token, or set serving.auth_token_env to null to serve without authentication"
        )
    return token.strip()


def guard_env(serving: Mapping[str, Any]) -> dict[str, str]:
    """The service's environment for the params' serving section: CTRFLOW_MAX_REQUEST_BYTES, and
    CTRFLOW_AUTH_TOKEN_ENV ('' when auth_token_env is null: no authentication, whatever the caller inherited)."""
    return {
        ENV_MAX_REQUEST_BYTES: str(int(serving["max_request_bytes"])),
        ENV_AUTH_TOKEN_ENV: str(serving.get("auth_token_env") or ""),
    }


def max_request_bytes_from_env(env: Mapping[str, str] | None = None) -> int:
    """serving.max_request_bytes as the service's environment carries it (its typed default when absent)."""
    env = os.environ if env is None else env
    raw = env.get(ENV_MAX_REQUEST_BYTES, "").strip()
    if not raw:
        from ctrflow.config import ServingParams

        return ServingParams().max_request_bytes
    try:
        value = int(raw)
    except ValueError:
        raise RuntimeError(f"{ENV_MAX_REQUEST_BYTES} must be an integer number of bytes, got '{cut(raw, 40)}'") from None
    if value < 1:
        raise RuntimeError(f"{ENV_MAX_REQUEST_BYTES} must be positive, got {value}")
    return value


# ---- counters -----------------------------------------------------------------------------------------------------
_COUNTER: list[Any] = []


def _count_rejection(status: int, rule: str) -> None:
    try:
        if not _COUNTER:  # created in the worker, after BentoML set up its multiprocess metrics
            import prometheus_client

            _COUNTER.append(
                prometheus_client.Counter(
                    "ctrflow_requests_rejected", "requests refused by the service guard", ["status", "rule"]
                )
            )
        _COUNTER[0].labels(status=str(status), rule=rule).inc()
    except Exception:  # noqa: BLE001 - counting never fails a request
        log.debug("could not count a rejected request", exc_info=True)


# ---- the middleware -----------------------------------------------------------------------------------------------
def _headers(scope: Scope) -> dict[bytes, bytes]:
    return {k.lower(): v for k, v in scope.get("headers") or ()}


class _Disconnected(Exception):
    """The client went away while its body was being read: nothing to answer."""


async def send_error(send: Send, error: RequestError, *, close: bool = False) -> None:
    """Answer `error` in the one error shape."""
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    if close:  # the rest of an over-long body is never read: the connection cannot carry another request
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def reshape_error(status: int, body: bytes, scope: Scope) -> tuple[int, dict[str, Any]]:
    """An error answer of BentoML or Starlette in the one error shape (pydantic errors become 422 naming the field)."""
    try:
        data: Any = json.loads(body) if body else None
    except (ValueError, RecursionError):
        data = None
    if isinstance(data, list) and len(data) == 1 and isinstance(data[0], dict):
        data = data[0]  # BentoML answers its own 4xx exceptions as a one-element list
    if isinstance(data, dict) and set(data) >= set(error_body(0, None, "", "")):
        return status, data  # already in shape
    if isinstance(data, dict) and isinstance(data.get("detail"), list) and data["detail"]:
        first = data["detail"][0] if isinstance(data["detail"][0], dict) else {}
        loc = [str(p) for p in first.get("loc") or ()]
        name = "".join(f"[{p}]" if p.isdigit() else (f".{p}" if i else p) for i, p in enumerate(loc)) or None
        message = str(first.get("msg") or data.get("error") or "invalid request")
        more = len(data["detail"]) - 1
        if more:
            message += f" (and {more} more error{'s' if more > 1 else ''})"
        status = 422 if status == 400 else status
        return status, error_body(status, name, str(first.get("type") or "invalid"), f"{name}: {message}" if name else message)
    if isinstance(data, dict) and data.get("error") is not None:
        message = str(data["error"])
    elif isinstance(data, dict) and data.get("detail") is not None:
        message = str(data["detail"])
    else:
        message = body.decode("utf-8", "replace").strip() or f"HTTP {status}"
    rule = _RULE_OF_STATUS.get(status, "error")
    if status == 404:
        return status, error_body(status, "path", rule, message, value_text(scope.get("path", "")))
    if status == 405:
        return status, error_body(status, "method", rule, message, value_text(scope.get("method", "")))
    name, sep, _ = message.partition(": ")
    return status, error_body(status, name if sep and name.isidentifier() else None, rule, message)


def _reshaping(send: Send, scope: Scope) -> Send:
    """`send` with every error answer (status >= 400) rewritten into the one error shape."""
    held: list[Message] = []
    chunks: list[bytes] = []

    async def wrapped(message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start" and message["status"] >= 400:
            held.append(message)
            return
        if kind == "http.response.body" and held:
            chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            start = held.pop()
            status, shaped = reshape_error(start["status"], b"".join(chunks), scope)
            body = json.dumps(shaped).encode()
            keep = [(k, v) for k, v in start.get("headers") or () if k.lower() not in (b"content-length", b"content-type")]
            headers = [*keep, (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        await send(message)

    return wrapped


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive channel that hands the app the already-read body once, then the client's later events."""
    sent = [False]

    async def replayed() -> Message:
        if not sent[0]:
            sent[0] = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


class ServiceGuard:
    """ASGI middleware: auth, size limit, strict rules, one error shape (see the module docstring).

    `max_request_bytes` (None) and `token` (`FROM_ENV`) are read from the worker's environment when the middleware
    is built (CTRFLOW_MAX_REQUEST_BYTES, and the variable named by CTRFLOW_AUTH_TOKEN_ENV); `token=None`: no auth.
    `open_paths` skip every check.
    """

    def __init__(
        self, app: Callable[..., Awaitable[None]], *, max_request_bytes: int | None = None, token: Any = FROM_ENV,
        open_paths: Iterable[str] = OPEN_PATHS,
    ) -> None:  # fmt: skip
        self.app = app
        self.max_request_bytes = max_request_bytes if max_request_bytes is not None else max_request_bytes_from_env()
        self.token: str | None = token_from_env() if token is FROM_ENV else token
        self.open_paths = frozenset(open_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        close = False
        try:
            if self.token is not None:
                self._authorise(headers)
            if scope["method"] in BODY_METHODS:
                close = True
                body = await self._read_body(headers, receive)
                close = False
                rules = _RULES.get(scope["path"])
                if rules is not None:
                    media = headers.get(b"content-type", b"application/json").split(b";")[0].strip().lower()
                    if media != b"application/json":
                        raise RequestError(415, "Content-Type", "media_type", "the body must be application/json", media.decode("latin-1"))
                    # kept for the app: a handler reading the raw request may reuse it instead of parsing again
                    scope.setdefault("state", {})["ctrflow_request"] = rules.check(parse_json(body))
                receive = _replay(body, receive)
        except _Disconnected:
            return
        except RequestError as exc:
            _count_rejection(exc.status, exc.rule)
            await send_error(send, exc, close=close)
            return
        await self.app(scope, receive, _reshaping(send, scope))

    def _authorise(self, headers: Mapping[bytes, bytes]) -> None:
        challenge = {"WWW-Authenticate": 'Bearer realm="ctrflow"'}
        given = headers.get(b"authorization")
        if given is None:
            raise RequestError(401, "Authorization", "auth", "this service needs `Authorization: Bearer <token>`", headers=challenge)
        scheme, _, token = given.decode("latin-1").partition(" ")
        expected = self.token or ""
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected.encode()):
            raise RequestError(401, "Authorization", "auth", "the bearer token is not valid", headers=challenge)

    async def _read_body(self, headers: Mapping[bytes, bytes], receive: Receive) -> bytes:
        limit = self.max_request_bytes
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                raise RequestError(400, "Content-Length", "content_length", "Content-Length is not a number") from None
            if size > limit:
                raise RequestError(
                    413, "body", "max_request_bytes", f"the body is {size} bytes; at most {limit} are accepted (serving.max_request_bytes)"
                )
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Disconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise RequestError(
                    413, "body", "max_request_bytes", f"the body is more than {limit} bytes (serving.max_request_bytes)"
                )
            chunks.append(chunk)
            if not message.get("more_body"):
                return b"".join(chunks)


def request_fields(api: Any) -> frozenset[str] | None:
    """The JSON fields a BentoML API method accepts (None when BentoML does not tell)."""
    try:
        return frozenset(api.input_spec.model_fields)
    except AttributeError:
        return None

