"""Every failure becomes an OpenAI-style JSON error: `{"error": {message, type, param, code}}`.

Client mistakes map to 4xx: a `ThinkwiseError` carries its own status (400 bad
parameter or prompt too long, 404 unknown model, 413 does not fit the KV cache), a body
that fails validation (malformed JSON, wrong types, unknown fields) is a 400 naming the
field, a missing or wrong key is 401, a full queue is 429. Anything else is a bug: it is
logged with the request id and answered with a 500 that quotes that id, never with the
exception text. The middleware here also stamps each response with `x-request-id`,
refuses oversized bodies before they are read, and counts responses by route and status.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from thinkwise.errors import ThinkwiseError

logger = logging.getLogger("thinkwise.server")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

# OpenAI's error codes for the thinkwise errors that have one.
_CODES = {
    "PromptTooLongError": "context_length_exceeded",
    "ModelNotFoundError": "model_not_found",
    "CapacityError": "kv_cache_too_small",
}


class AuthenticationError(ThinkwiseError):
    http_status = 401
    error_type = "invalid_request_error"
    code = "invalid_api_key"


class QueueFullError(ThinkwiseError):
    http_status = 429
    error_type = "rate_limit_error"
    code = "queue_full"


class RequestTooLargeError(ThinkwiseError):
    http_status = 413
    error_type = "invalid_request_error"
    code = "request_too_large"


class RequestTimeoutError(ThinkwiseError):
    http_status = 408
    error_type = "invalid_request_error"
    code = "request_timeout"


def error_body(message: str, error_type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def error_response(status: int, message: str, error_type: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, error_type, param, code), status_code=status, headers=headers)


def thinkwise_error_body(error: ThinkwiseError) -> dict[str, Any]:
    code = getattr(error, "code", None) or _CODES.get(type(error).__name__)
    return error_body(error.message, error.error_type, error.param, code)


def _thinkwise_error(_request: Request, error: ThinkwiseError) -> JSONResponse:
    headers = {"retry-after": "1"} if error.http_status == 429 else None
    return JSONResponse(thinkwise_error_body(error), status_code=error.http_status, headers=headers)


def _location(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p != "body"]
    # pydantic names the branches of a union (`prompt.str`, `prompt.list[int]`); keep the field path.
    parts = [p for p in parts if not re.match(r"^(str|int|float|bool|list\[.*\]|dict\[.*\]|function-after\[.*\]|"
                                              r"constrained-.*|ChatMessage|TextContentPart|StreamOptions|"
                                              r"ResponseFormat|tagged-union\[.*\])$", p)]
    return ".".join(parts) or None


def _validation_error(_request: Request, error: RequestValidationError) -> JSONResponse:
    errors = error.errors()
    first = errors[0] if errors else {"msg": "invalid request", "loc": (), "type": ""}
    if first.get("type") == "json_invalid":
        return error_response(400, "the request body is not valid JSON: "
                              f"{first.get('ctx', {}).get('error', first.get('msg'))}", "invalid_request_error")
    param = _location(tuple(first.get("loc", ())))
    if first.get("type") == "extra_forbidden":
        message = f"unrecognized request argument supplied: {param}"
    elif first.get("type") == "missing":
        message = f"'{param}' is a required property" if param else "a request body is required"
    else:
        text = str(first.get("msg")).removeprefix("Value error, ")
        message = f"{param}: {text}" if param else text
        if first.get("type") == "model_attributes_type":
            message = "the request body must be a JSON object"
    more = len({_location(tuple(e.get("loc", ()))) for e in errors}) - 1
    if more > 0:
        message += f" (and {more} more problem{'s' if more > 1 else ''})"
    return error_response(400, message, "invalid_request_error", param)


def _http_error(_request: Request, error: StarletteHTTPException) -> JSONResponse:
    error_type = {401: "invalid_request_error", 404: "not_found_error", 405: "invalid_request_error"}.get(
        error.status_code, "invalid_request_error" if error.status_code < 500 else "internal_server_error")
    detail = error.detail if isinstance(error.detail, str) else json.dumps(error.detail)
    return error_response(error.status_code, detail, error_type, headers=getattr(error, "headers", None))


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ThinkwiseError, _thinkwise_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)


class RequestContextMiddleware:
    """Request ids, body-size limit, 500s for uncaught errors, and per-route status counts.

    A pure ASGI middleware (no per-chunk overhead on streams, unlike BaseHTTPMiddleware).
    """

    def __init__(self, app, *, max_body_bytes: int, metrics=None, routes: frozenset[str] = frozenset(),
                 body_timeout: float | None = None):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_timeout = body_timeout
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.monotonic()
        status = {"code": 500, "started": False}

        # A body that is too large or too slow: the app may catch the error raised from
        # receive() (FastAPI answers "error parsing the body", 400); the real reason wins.
        body_failure: list[ThinkwiseError] = []

        async def forward(message):
            if message["type"] == "http.response.start":
                status["code"], status["started"] = message["status"], True
                message = dict(message)
                message["headers"] = list(message.get("headers", [])) + [(b"x-request-id", request_id.encode())]
            await send(message)

        async def send_with_id(message):
            if body_failure:
                if message["type"] == "http.response.start" and not status["started"]:
                    await send_json(forward, body_failure[0].http_status, thinkwise_error_body(body_failure[0]),
                                     extra_headers=[(b"connection", b"close")])
                return
            await forward(message)

        try:
            length = headers.get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
                raise RequestTooLargeError(f"the request body is larger than the server's limit of "
                                           f"{self.max_body_bytes} bytes")
            received = 0
            body_done = False
            body_deadline = None if self.body_timeout is None else started + self.body_timeout

            async def limited_receive():
                nonlocal received, body_done
                if body_done or body_deadline is None:
                    message = await receive()  # after the body: only disconnects, no deadline
                else:
                    try:
                        message = await asyncio.wait_for(receive(), max(body_deadline - time.monotonic(), 0.001))
                    except asyncio.TimeoutError:
                        body_failure.append(RequestTimeoutError(
                            f"the request body did not arrive within {self.body_timeout:g} s (the server's "
                            "--timeout-request-read)"))
                        raise body_failure[-1] from None
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > self.max_body_bytes:
                        body_failure.append(RequestTooLargeError(
                            f"the request body is larger than the server's limit of {self.max_body_bytes} bytes"))
                        raise body_failure[-1]
                    body_done = not message.get("more_body", False)
                return message

            await self.app(scope, limited_receive, send_with_id)
        except (RequestTooLargeError, RequestTimeoutError) as error:
            if not status["started"]:
                await send_json(forward, error.http_status, thinkwise_error_body(error),
                                 extra_headers=[(b"connection", b"close")])
        except Exception:
            logger.exception("internal error while serving request %s (%s %s)", request_id, scope.get("method"),
                             scope.get("path"))
            if not status["started"]:
                await send_json(forward, 500, error_body(
                    f"internal server error; the server logged the details under request id {request_id}",
                    "internal_server_error", None, "internal_error"))
        finally:
            if self.metrics is not None:
                route = scope.get("route")
                path = getattr(route, "path", None) or scope.get("path", "")
                self.metrics.observe_http(scope.get("method", ""), path if path in self.routes else "other",
                                          status["code"], time.monotonic() - started)


async def send_json(send, status: int, body: dict[str, Any], extra_headers: list | None = None) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            *(extra_headers or [])]})
    await send({"type": "http.response.body", "body": payload})
