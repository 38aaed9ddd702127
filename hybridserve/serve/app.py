"""The FastAPI application: routes, body parsing, API-key check, readiness, drain.

`build_app` takes either a ready engine client (tests, in-process use) or an async factory that
creates one after the server is listening, so `/health` can answer 503 while the model loads.
Bodies are parsed by hand: a non-JSON content type is 415, a body that is not a JSON object is 400,
and validation failures are 400 naming the parameter (never 422, never a stack trace).
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import msgspec
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from hybridserve import __version__
from hybridserve.serve.chat import thinking_tokens
from hybridserve.serve.chat_completion import create_chat_completion
from hybridserve.serve.completion import create_completion
from hybridserve.serve.context import RequestTracker, ServerContext, ServeSettings
from hybridserve.serve.errors import (
    APIError,
    error_body,
    error_response,
    install_error_handlers,
    validation_error,
)
from hybridserve.serve.logs import clip, install_log_filter
from hybridserve.serve.metrics import Metrics, cache_config_info
from hybridserve.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from hybridserve.serve.responses import ClientDisconnected

logger = logging.getLogger("hybridserve.serve")

# readable without the API key (orchestrators, scrapers, API browsers)
OPEN_PATHS = ("/health", "/ping", "/metrics", "/openapi.json", "/docs")
REQUEST_MODELS = {"/v1/chat/completions": ChatCompletionRequest, "/v1/completions": CompletionRequest,
                  "/tokenize": TokenizeRequest, "/detokenize": DetokenizeRequest}
M = TypeVar("M", bound=BaseModel)


class ApiKeyMiddleware:
    """Every path except OPEN_PATHS needs `Authorization: Bearer <key>`; failures use the error envelope."""

    def __init__(self, app: Any, api_key: str):
        self.app = app
        self.key = api_key.encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or scope["method"] == "OPTIONS":
            return await self.app(scope, receive, send)
        scheme, _, token = dict(scope["headers"]).get(b"authorization", b"").partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key):
            return await self.app(scope, receive, send)
        response = JSONResponse(error_body(401, "Invalid or missing API key."), status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, read as it streams in: past `limit` bytes it is 413 at once (a declared length is
    checked before anything is read), so an oversized upload costs neither time nor memory."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body is larger than {limit} bytes (--max-request-body-bytes)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"request body is larger than {limit} bytes (--max-request-body-bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


async def parse_body(request: Request, model: type[M], limit: int) -> M:
    ctype = request.headers.get("content-type", "")
    if ctype.split(";")[0].strip().lower() != "application/json":
        raise APIError(415, f"Content-Type must be application/json (got {clip(ctype, 64) or 'none'!r})")
    body = await read_body(request, limit)
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as e:
        raise APIError(400, f"request body is not valid JSON: {clip(str(e), 200)}") from None
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object")
    if b"\\ud" in body.lower():  # escaped surrogates: reject lone ones
        try:
            json.dumps(data, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise APIError(400, "request body contains invalid Unicode (a lone surrogate)") from None
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise validation_error(e) from None


def openapi_schema(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema, plus the request bodies: the handlers parse bodies themselves (to stream the
    size limit and answer 400, not 422), so FastAPI cannot see the models in their signatures."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for path, model in REQUEST_MODELS.items():
            body = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(body.pop("$defs", {}))
            components[model.__name__] = body
            schema["paths"][path]["post"]["requestBody"] = {"required": True, "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}
        app.openapi_schema = schema
    return app.openapi_schema


def build_app(settings: ServeSettings, engine: Any | None = None,
              engine_factory: Callable[[], Awaitable[Any]] | None = None,
              on_engine_failure: Callable[[BaseException], None] | None = None) -> FastAPI:
    install_log_filter(logger)
    tracker = RequestTracker(settings.admission_limit, settings.per_request_limit)
    startup: dict[str, BaseException | None] = {"error": None}

    def stats() -> Any:
        return ctx.engine.stats() if ctx.engine is not None else None

    metrics = Metrics(settings.model_name, stats,
                      lambda: {"in_flight": tracker.in_flight, "rejections": tracker.rejections},
                      lambda: cache_config_info(ctx.engine))
    ctx = ServerContext(engine, settings, tracker, metrics)

    async def start_engine() -> None:
        try:
            eng = await engine_factory()
        except BaseException as e:
            startup["error"] = e
            logger.exception("engine failed to start")
            if on_engine_failure:
                on_engine_failure(e)
            return
        await ctx.offload(thinking_tokens, eng.tokenizer)  # a pass over the vocabulary: once, off the loop
        ctx.engine = eng
        logger.info("engine ready: serving %s (max_model_len %d)", settings.model_name, eng.max_model_len)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        task = asyncio.ensure_future(start_engine()) if engine is None and engine_factory else None
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                if ctx.engine is not None:
                    await ctx.engine.shutdown()
            ctx.pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="hybridserve", version=__version__, lifespan=lifespan, redoc_url=None)
    app.openapi = functools.partial(openapi_schema, app)  # type: ignore[method-assign]
    app.state.ctx = ctx
    metrics.instrument(app)
    install_error_handlers(app)
    if settings.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key)

    def ready_error() -> APIError | None:
        eng = ctx.engine
        if tracker.draining:
            return APIError(503, "The server is shutting down.", headers={"Retry-After": "5"})
        if eng is None:
            failed = startup["error"] is not None
            return APIError(503, "The engine failed to start." if failed else "The engine is starting.",
                            headers={"Retry-After": "5"})
        if getattr(eng, "errored", False) or not getattr(eng, "is_ready", True):
            return APIError(503, "The engine is not running.", headers={"Retry-After": "5"})
        return None

    def require_engine() -> None:
        err = ready_error()
        if err is not None:
            raise err

    async def health(_: Request) -> Response:
        err = ready_error()
        return Response(status_code=200) if err is None else error_response(err)

    app.add_api_route("/health", health, methods=["GET"])
    for method in ("GET", "POST"):  # one route per method: each gets its own OpenAPI operation id
        app.add_api_route("/ping", health, methods=[method])

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        max_len = ctx.engine.max_model_len if ctx.engine is not None else None
        return {"object": "list", "data": [  # root is the served name: the server's paths stay private
            {"id": name, "object": "model", "created": int(time.time()), "owned_by": "hybridserve",
             "root": settings.model_name, "parent": None, "max_model_len": max_len}
            for name in settings.served_model_names]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        req = await parse_body(request, ChatCompletionRequest, settings.max_request_body_bytes)
        require_engine()
        try:
            return await create_chat_completion(ctx, request, req)
        except ClientDisconnected:
            return Response(status_code=499)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req = await parse_body(request, CompletionRequest, settings.max_request_body_bytes)
        require_engine()
        try:
            return await create_completion(ctx, request, req)
        except ClientDisconnected:
            return Response(status_code=499)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        req = await parse_body(request, TokenizeRequest, settings.max_request_body_bytes)
        require_engine()
        ctx.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", "prompt")
        if req.messages is not None:
            tools = [t.model_dump(exclude_unset=True) for t in req.tools] if req.tools else None
            ids = (await ctx.render_chat(req, tools)).prompt_token_ids
        else:
            ids = await ctx.offload(ctx.encode, req.prompt, "prompt", req.add_special_tokens)

        def respond() -> Response:
            """Off the loop, and with msgspec: the json module holds the GIL for the whole of a long token
            list (2 s for 2.6 M ids), which would stall the loop from any thread."""
            out: dict[str, Any] = {"count": len(ids), "max_model_len": ctx.max_model_len, "tokens": ids}
            if req.return_token_strs:
                out["token_strs"] = ctx.tokenizer.convert_ids_to_tokens(ids)
            return Response(msgspec.json.encode(out), media_type="application/json")

        return await ctx.offload(respond)

    @app.post("/detokenize")
    async def detokenize(request: Request) -> Response:
        req = await parse_body(request, DetokenizeRequest, settings.max_request_body_bytes)
        require_engine()
        ctx.check_model(req.model)
        ctx.check_token_ids(req.tokens, "tokens")
        return await ctx.offload(lambda: JSONResponse({"prompt": ctx.tokenizer.decode(req.tokens)}))

    return app


STOP_TIMEOUT_S = 5.0  # after a second signal: how long in-flight requests get to send their error


async def drain(ctx: ServerContext, timeout: float) -> None:
    """Stop admitting, let in-flight requests finish for `timeout` seconds, then abort the rest."""
    ctx.tracker.draining = True
    logger.info("draining: %d requests in flight, waiting up to %.0fs", ctx.tracker.in_flight, timeout)
    if await ctx.tracker.wait_idle(timeout):
        return
    logger.warning("shutdown timeout reached: aborting %d requests", len(ctx.tracker.engine_request_ids))
    await _abort_all(ctx)
    await ctx.tracker.wait_idle(STOP_TIMEOUT_S)


async def stop_now(ctx: ServerContext) -> bool:
    """A second signal: every in-flight request ends now with a 503 error (an error envelope, or an SSE
    error frame on a stream that has begun) and releases its admission; True if all did in time."""
    ctx.tracker.draining = ctx.tracker.stopping = True
    logger.warning("stopping now: %d requests in flight get a 503", ctx.tracker.in_flight)
    await _abort_all(ctx)
    return await ctx.tracker.wait_idle(STOP_TIMEOUT_S)


async def _abort_all(ctx: ServerContext) -> None:
    for rid in list(ctx.tracker.engine_request_ids):
        try:
            await ctx.engine.abort(rid)
        except Exception:
            logger.exception("abort of %s failed", rid)
