"""The FastAPI application: routes, authentication, lifecycle, and running it with uvicorn.

Routes only translate: they hand the validated body to `OpenAIServing` and return what
it builds. The engine loop (`AsyncEngine`) is started with the app and stopped with
it. With an API key set, `/v1/*` and the docs (`/docs`, `/redoc`, `/openapi.json`, unless
`open_docs`) need it, checked from the headers before any body is read (401 first);
`/health` and `/metrics` never do (they are for the operator's probes), so `/health`
then names no model. Idle connections, and requests whose headers or body arrive too
slowly, are closed (`security.py`). The OpenAPI schema is FastAPI's, corrected to say what
the server really answers: 400 (not 422) for a body that fails validation, the error
JSON for every 4xx/5xx, and server-sent events as the other 200 body of the two
completion endpoints.
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import json
import logging
import signal
import socket
import sys
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST

from thinkwise.engine.async_engine import AsyncEngine
from thinkwise.server.errors import AuthenticationError, RequestContextMiddleware, install_error_handlers
from thinkwise.server.metrics import ServerMetrics
from thinkwise.server.json_bodies import OFFLOAD_BYTES, JSONBodyDecoder
from thinkwise.server.security import APIKeyMiddleware, timed_protocol
from thinkwise.server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    HealthResponse,
    ModelCard,
    ModelList,
)
from thinkwise.server.serving import OpenAIServing, ServerSettings

logger = logging.getLogger("thinkwise.server")

ROUTES = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/models/{model_id:path}", "/health",
                    "/metrics", "/openapi.json", "/docs", "/redoc"})

_ERRORS = {status: {"model": ErrorResponse, "description": description} for status, description in {
    400: "invalid request: malformed JSON, a wrong type, an unknown field, a value out of range, a prompt too long",
    401: "missing or wrong API key",
    404: "unknown model",
    413: "the request body, or the prompt's KV cache need, is larger than the server allows",
    429: "the server's queue is full; retry later",
    500: "internal error (logged under the x-request-id of the response)",
}.items()}


def _completion_responses(model, chunk_name: str) -> dict[int | str, dict[str, Any]]:
    # Before OpenAPI 3.2, the schema of an event-stream media type describes one event.
    event = {"type": "object", "required": ["data"], "properties": {
        "data": {"type": "string", "description": f"a JSON-encoded {chunk_name}, or [DONE] after the last one"},
        "event": {"type": "string"}}}
    return {
        200: {"model": model, "description": "the completion (JSON), or with stream=true server-sent events",
              "content": {"text/event-stream": {"schema": event}}},
        **_ERRORS,
    }


def build_app(llm, settings: ServerSettings, async_engine: AsyncEngine | None = None) -> FastAPI:
    async_engine = async_engine or AsyncEngine(llm.engine)
    metrics = ServerMetrics(async_engine)
    serving = OpenAIServing(llm, async_engine, settings, metrics)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        # Everything loaded so far (model, tokenizer, libraries) lives as long as the
        # server: out of the collector's sight, a full collection no longer walks those
        # millions of objects and stalls the event loop for a tenth of a second.
        gc.collect()
        gc.freeze()
        async_engine.start()
        logger.info("thinkwise: serving %s", ", ".join(settings.served_model_names))
        try:
            yield
        finally:
            serving._prepare_pool.shutdown(wait=False, cancel_futures=True)
            _json_decoder.close()
            await asyncio.to_thread(async_engine.shutdown)

    app = FastAPI(title="thinkwise", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible API of the thinkwise inference engine")
    app.router.route_class = _OffLoopJSONRoute
    app.state.serving = serving
    app.state.metrics = metrics
    app.state.async_engine = async_engine
    install_error_handlers(app)
    if settings.api_key:  # inner to RequestContextMiddleware: a 401 still gets its request id and metrics
        app.add_middleware(APIKeyMiddleware, api_key=settings.api_key, open_docs=settings.open_docs)
    app.add_middleware(RequestContextMiddleware, max_body_bytes=settings.max_body_bytes, metrics=metrics,
                       routes=ROUTES, body_timeout=settings.timeout_request_read)

    bearer = HTTPBearer(auto_error=False, description="the server's --api-key")

    async def require_api_key(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if credentials is None:
            raise AuthenticationError("missing API key; send the header 'Authorization: Bearer <key>'")
        if not hmac.compare_digest(credentials.credentials.encode(), settings.api_key.encode()):
            raise AuthenticationError("incorrect API key provided")

    v1 = [Depends(require_api_key)] if settings.api_key else []

    @app.post("/v1/chat/completions", dependencies=v1, response_model=None,
              responses=_completion_responses(ChatCompletionResponse, "ChatCompletionChunk"))
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await serving.chat(body, request)

    @app.post("/v1/completions", dependencies=v1, response_model=None,
              responses=_completion_responses(CompletionResponse, "CompletionResponse"))
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await serving.completions(body, request)

    def card(name: str) -> ModelCard:
        return ModelCard(id=name, created=settings.created, max_model_len=llm.engine.max_model_len)

    @app.get("/v1/models", dependencies=v1, response_model=ModelList, responses={401: _ERRORS[401]})
    async def list_models() -> ModelList:
        return ModelList(data=[card(name) for name in settings.served_model_names])

    @app.get("/v1/models/{model_id:path}", dependencies=v1, response_model=ModelCard,
             responses={401: _ERRORS[401], 404: _ERRORS[404]})
    async def get_model(model_id: str) -> ModelCard:
        serving.check_model(model_id)
        return card(model_id)

    @app.get("/health", response_model=HealthResponse,
             responses={503: {"model": HealthResponse, "description": "the engine loop is not running"}})
    async def health() -> JSONResponse:
        body: dict[str, Any] = {"status": "ok", "requests_in_flight": serving.requests_in_flight,
                                "sequences_in_flight": serving.sequences_in_flight}
        if not settings.api_key:  # /v1/models guards the names when a key is set
            body["model"] = settings.served_model_names[0]
        try:
            body["engine"] = await asyncio.wait_for(async_engine.call(_engine_snapshot), timeout=30)
        except Exception as error:  # a dead or stuck engine is what this endpoint exists to report
            body.update(status="error", error=f"engine not responding: {type(error).__name__}: {error}")
            return JSONResponse(body, status_code=503)
        body["engine"]["steps"] = async_engine.num_steps
        return JSONResponse(body)

    @app.get("/metrics", response_class=Response,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                              "description": "Prometheus text format"}})
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
                    for parameter in operation.get("parameters", []):
                        if parameter.get("name") == "model_id":
                            parameter["schema"]["enum"] = list(settings.served_model_names)
            components = schema.get("components", {}).get("schemas", {})
            components.pop("HTTPValidationError", None)
            components.pop("ValidationError", None)
            _state_server_limits(components, max_n=serving.max_n, max_tokens=llm.engine.max_model_len - 1,
                                 vocab_size=llm.engine.model_config.vocab_size,
                                 model_names=settings.served_model_names)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    return app


_json_decoder = JSONBodyDecoder()


class _OffLoopJSONRequest(Request):
    """A request whose large JSON body is decoded by the helper process (json_bodies.py)."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            if len(body) > OFFLOAD_BYTES:
                self._json = await asyncio.to_thread(_json_decoder.decode, body)
            else:
                self._json = json.loads(body)
        return self._json


class _OffLoopJSONRoute(APIRoute):
    def get_route_handler(self):
        handler = super().get_route_handler()

        async def route_handler(request: Request) -> Response:
            return await handler(_OffLoopJSONRequest(request.scope, request.receive))

        return route_handler


def _state_server_limits(components: dict[str, Any], *, max_n: int, max_tokens: int, vocab_size: int,
                         model_names: list[str]) -> None:
    """Write this server's names and limits into the request schemas (the pydantic models cannot know them)."""
    def cap(node: Any, maximum: int) -> None:
        if isinstance(node, dict):
            if node.get("type") == "integer":
                node["maximum"] = min(node.get("maximum", maximum), maximum)
            for value in node.values():
                cap(value, maximum)
        elif isinstance(node, list):
            for value in node:
                cap(value, maximum)

    for name in ("ChatCompletionRequest", "CompletionRequest"):
        properties = components.get(name, {}).get("properties", {})
        if "model" in properties:
            properties["model"]["enum"] = list(model_names)
        cap(properties.get("n"), max_n)
        cap(properties.get("max_tokens"), max_tokens)
        cap(properties.get("max_completion_tokens"), max_tokens)
        cap(properties.get("min_tokens"), max_tokens)
        if name == "CompletionRequest":
            for branch in properties.get("prompt", {}).get("anyOf", []):
                if branch.get("type") == "array" and branch.get("items", {}).get("type") != "string":
                    cap(branch, vocab_size - 1)


def _engine_snapshot(engine) -> dict[str, int]:
    blocks = engine.block_manager
    return {"running_sequences": len(engine.scheduler.running), "waiting_sequences": len(engine.scheduler.waiting),
            "kv_blocks_total": blocks.num_blocks, "kv_blocks_free": blocks.num_free_blocks,
            "kv_blocks_used": blocks.num_used_blocks}


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def run_server(llm, settings: ServerSettings, *, host: str = "127.0.0.1", port: int = 8000,
               log_level: str = "info", access_log: bool = True) -> None:
    """Serve until SIGINT/SIGTERM. Port 0 picks a free port; the address is printed to stderr."""
    import uvicorn

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = build_app(llm, settings)
    sock = _bind(host, port)
    bound_port = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    print(f"thinkwise: listening on http://{shown}:{bound_port} (model: {', '.join(settings.served_model_names)})",
          file=sys.stderr, flush=True)
    config = uvicorn.Config(app, log_level=log_level, access_log=access_log, timeout_graceful_shutdown=5,
                            timeout_keep_alive=settings.timeout_keep_alive, lifespan="on",
                            http=timed_protocol(settings.timeout_request_read))
    server = uvicorn.Server(config)
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal to the
    # handlers it found; make those end the process normally (exit status 0).
    previous = {sig: signal.signal(sig, _stop_requested) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run(sockets=[sock])  # uvloop and httptools when installed
    except _StopRequested:
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()


class _StopRequested(Exception):
    pass


def _stop_requested(_signum, _frame) -> None:
    raise _StopRequested()


__all__ = ["build_app", "run_server", "ServerSettings"]
