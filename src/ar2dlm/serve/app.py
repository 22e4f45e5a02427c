"""The HTTP side: an OpenAI-compatible FastAPI app over the engine client, in thin routes.

Endpoints: POST /v1/completions and /v1/chat/completions (whole, or streamed as server-sent events, one per
commit of accepted tokens, then `data: [DONE]`), GET /v1/models, GET|HEAD /health, GET /metrics (Prometheus
text), and the OpenAPI schema at /openapi.json with its pages at /docs. A route parses (protocol.py), submits
(the engine client) and answers (serving.py); nothing here imports torch.

Every error a client can cause is an OpenAI-style body with a 4xx status: 400 a body that is not a JSON object
(or not JSON, or not UTF-8), 401 a missing or wrong API key, 404 an unknown model or path, 413 a body or prompt
too long (a body as soon as its length is known, while the client may still be sending it), 415 a POST that
is not `application/json`, 422 a field of the wrong type, an unknown field, or a value the settings refuse,
429 a full queue (with Retry-After), 503 while shutting down.
"""

from __future__ import annotations

import contextlib
import hmac

from fastapi import APIRouter, Depends, FastAPI, Request, Security
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from . import serving
from .config import ServeConfig
from .protocol import (
    APIError,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    refusal,
)
from .serving import Engine

router = APIRouter()
bearer = HTTPBearer(auto_error=False, description="the server's --api-key (or $AR2DLM_API_KEY), when it has one")


def create_app(engine: Engine, cfg: ServeConfig, name: str) -> FastAPI:
    """The app serving `engine` as model `name`; its lifespan starts and drains the engine's scheduler thread."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        await engine.stop()

    app = FastAPI(title="ar2dlm", version="1", summary="An OpenAI-compatible server of a block-diffusion LM",
                  lifespan=lifespan, redoc_url=None)
    app.state.engine, app.state.cfg, app.state.name = engine, cfg, name
    app.add_middleware(BodyLimit, limit=cfg.max_request_bytes, refuse=lambda e: _error(engine, e))

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return _error(engine, e)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):  # unknown paths, wrong methods
        code = "not_found" if e.status_code == 404 else None
        return _error(engine, APIError(e.status_code, str(e.detail), code=code))

    @app.exception_handler(ClientDisconnect)
    async def gone(request, e: ClientDisconnect):  # it left while sending its body: no one to answer, no error
        engine.metrics.request("cancelled")
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def server_error(request, e: Exception):  # a bug: say so without the details (the log has them)
        return _error(engine, APIError(500, f"internal server error ({type(e).__name__})"))

    app.include_router(router)
    app.openapi = lambda: _openapi(app)
    return app


def _error(engine: Engine, e: APIError) -> JSONResponse:
    engine.metrics.request(e.status)
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


# ---------------------------------------------------------------------------- boundary checks
class BodyLimit:
    """413 for a body over `limit` bytes as soon as that is known: from its Content-Length before a byte is read,
    or, for a body sent in chunks, when the count passes the limit (the route never sees the excess). What the
    client still sends, uvicorn reads and drops: a client that writes its whole body before it reads gets the
    answer, not a reset."""

    def __init__(self, app: ASGIApp, limit: int, refuse):
        self.app, self.limit, self.refuse = app, limit, refuse

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            refused = APIError(413, f"the request body has {int(length)} bytes; this server takes at most "
                                    f"{self.limit}")
            return await self.refuse(refused)(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise APIError(413, f"the request body is longer than {self.limit} bytes")
            return message

        await self.app(scope, counted, send)


def authorize(request: Request, credentials: HTTPAuthorizationCredentials | None = Security(bearer)) -> None:
    key = request.app.state.cfg.api_key
    if key is None:
        return
    given = credentials.credentials.strip() if credentials is not None else ""
    # compare_digest: the time taken does not tell how much of the key was right
    if not hmac.compare_digest(given.encode(), key.encode()):
        raise APIError(401, "missing or wrong API key: send the header `Authorization: Bearer KEY`",
                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


async def parse(request: Request, model: type[BaseModel]):
    """The body as `model`: 415 unless it is sent as JSON, 400 unless it is a JSON object, 422 for a field."""
    kind = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if kind != "application/json" and not (kind.startswith("application/") and kind.endswith("+json")):
        raise APIError(415, f"the request body must be sent as JSON, with the header `Content-Type: "
                            f"application/json` (got {kind or 'none'!r})")
    try:
        body = model.model_validate_json(await request.body())
    except ValidationError as e:
        raise refusal(e) from None
    name = request.app.state.name
    if body.model is not None and body.model != name:
        raise APIError(404, f"model {body.model!r} does not exist; this server serves {name!r}", "model",
                       "model_not_found")
    return body


# ---------------------------------------------------------------------------- routes
ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 415, 422, 429, 500, 503)}
EVENTS = {"text/event-stream": {"schema": {"type": "string", "description": "with stream: true: `data: "
                                           "{CompletionChunk or ChatCompletionChunk}` events, then `data: [DONE]`"}}}


def _body(model: type[BaseModel]) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


@router.post("/v1/completions", dependencies=[Depends(authorize)], openapi_extra=_body(CompletionRequest),
             responses={200: {"model": CompletionResponse, "content": EVENTS}, **ERRORS})
async def completions(request: Request) -> Response:
    body = await parse(request, CompletionRequest)
    return await serving.complete(request.app.state.engine, request, body, request.app.state.name)


@router.post("/v1/chat/completions", dependencies=[Depends(authorize)], openapi_extra=_body(ChatCompletionRequest),
             responses={200: {"model": ChatCompletionResponse, "content": EVENTS}, **ERRORS})
async def chat_completions(request: Request) -> Response:
    body = await parse(request, ChatCompletionRequest)
    return await serving.complete(request.app.state.engine, request, body, request.app.state.name)


@router.get("/v1/models", dependencies=[Depends(authorize)], responses=ERRORS)
async def models(request: Request) -> ModelList:
    request.app.state.engine.metrics.request(200)
    return ModelList(data=[ModelCard(id=request.app.state.name)])


@router.get("/v1/models/{model:path}", dependencies=[Depends(authorize)], responses=ERRORS)
async def model_card(request: Request, model: str) -> ModelCard:
    name = request.app.state.name
    if model != name:
        raise APIError(404, f"model {model!r} does not exist; this server serves {name!r}", "model",
                       "model_not_found")
    request.app.state.engine.metrics.request(200)
    return ModelCard(id=name)


@router.api_route("/health", methods=["GET", "HEAD"])
async def health(request: Request) -> JSONResponse:
    """{"status": "ok"}; 503 while draining or when the scheduler thread has stopped."""
    status = request.app.state.engine.health
    return JSONResponse({"status": status}, status_code=200 if status == "ok" else 503)


@router.get("/metrics", response_class=PlainTextResponse)
async def prometheus(request: Request) -> PlainTextResponse:
    """Requests by outcome, tokens, tokens per forward, tokens/s, queue depth, running batch (Prometheus text)."""
    return PlainTextResponse(request.app.state.engine.metrics.render(), media_type="text/plain; version=0.0.4")


def _openapi(app: FastAPI) -> dict:
    """FastAPI's schema, with the request bodies the routes parse themselves (strict, errors in OpenAI's form)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        shapes = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in (CompletionRequest, ChatCompletionRequest, CompletionChunk, ChatCompletionChunk):
            shape = model.model_json_schema(ref_template="#/components/schemas/{model}")
            shapes.update(shape.pop("$defs", {}))
            shapes[model.__name__] = shape
        app.openapi_schema = schema
    return app.openapi_schema
