"""What the server checks before it reads a request: the API key, and how long a client may take.

`APIKeyMiddleware` (pure ASGI) answers 401 from the headers alone, before any body is
read or parsed, for every /v1 route and, unless `open_docs`, for /docs, /redoc and
/openapi.json (they describe the served models). The key is compared in constant time.
`TimedHttpToolsProtocol` is uvicorn's httptools protocol with one timer more: a
connection must complete each request's headers within `timeout_request_read` seconds
of opening or of the request's first byte (uvicorn closes idle keep-alive connections
itself, but has no timer for a connection that never finishes its headers). The body's
deadline is enforced by `RequestContextMiddleware` (408).
"""

from __future__ import annotations

import hmac

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from thinkwise.server.errors import AuthenticationError, send_json, thinkwise_error_body

DOCS_PATHS = ("/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")


def _protected(path: str, open_docs: bool) -> bool:
    if path == "/v1" or path.startswith("/v1/"):
        return True
    return not open_docs and path in DOCS_PATHS


def check_api_key(headers: dict[bytes, bytes], api_key: str) -> AuthenticationError | None:
    """None when the Authorization header carries `api_key`, else the error to answer."""
    value = headers.get(b"authorization")
    if value is None:
        return AuthenticationError("missing API key; send the header 'Authorization: Bearer <key>'")
    scheme, _, token = value.partition(b" ")
    if scheme.lower() != b"bearer" or not token.strip():
        return AuthenticationError("malformed Authorization header; send the API key as 'Authorization: Bearer <key>'")
    if not hmac.compare_digest(token.strip(), api_key.encode("utf-8")):
        return AuthenticationError("incorrect API key provided")
    return None


class APIKeyMiddleware:
    def __init__(self, app, *, api_key: str, open_docs: bool = False):
        self.app = app
        self.api_key = api_key
        self.open_docs = open_docs

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and _protected(scope.get("path", ""), self.open_docs):
            error = check_api_key(dict(scope.get("headers") or []), self.api_key)
            if error is not None:
                await send_json(send, 401, thinkwise_error_body(error),
                                 extra_headers=[(b"www-authenticate", b"Bearer")])
                return
        await self.app(scope, receive, send)


class TimedHttpToolsProtocol(HttpToolsProtocol):
    """Closes a connection whose request headers do not arrive in time (slowloris, or a
    connection opened and never used)."""

    timeout_request_read = 30.0

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.timeout_request_read, self._header_timeout)

    def _cancel_header_timer(self) -> None:
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.close()

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm_header_timer()

    def on_headers_complete(self) -> None:
        self._cancel_header_timer()
        super().on_headers_complete()

    def connection_lost(self, exc) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)


def timed_protocol(timeout_request_read: float) -> type[TimedHttpToolsProtocol]:
    return type("TimedHttpToolsProtocol", (TimedHttpToolsProtocol,), {"timeout_request_read": timeout_request_read})
