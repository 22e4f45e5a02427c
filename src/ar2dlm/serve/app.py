"""The HTTP side: an OpenAI-compatible FastAPI app over the engine client, in thin routes.

Endpoints: POST /v1/completions and /v1/chat/completions (whole, or streamed as server-sent events, one per
commit of accepted tokens, then `data: [DONE]`), GET /v1/models, GET|HEAD /health, GET /metrics (Prometheus
text), and the OpenAPI schema at /openapi.json with its pages at /docs. A route parses (protocol.py), submits
(the engine client) and answers (serving.py); nothing here imports torch.

Every error a client can cause is an OpenAI-style body with a 4xx status: 400 a body that is not a JSON object
(or not JSON, or not UTF-8), 401 a missing or wrong API key, 403 a `Host` or `Origin` the server does not
answer (a web page's request), 404 an unknown model or path, 408 a body not sent within --upload-timeout, 413
a body or prompt too long (a body as soon as its length is known, while the client may still be sending it),
415 a POST that is not `application/json`, 422 a field of the wrong type, an unknown field, a value the settings
refuse or one over the server's limits, 429 a full queue (with Retry-After), 503 while shutting down.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress

from fastapi import APIRouter, Depends, FastAPI, Request, Security
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.middleware.cors import CORSMiddleware
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
    if cfg.allowed_origins:  # let the pages of these origins read the answers (and send their preflights)
        app.add_middleware(CORSMiddleware, allow_origins=list(cfg.allowed_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(Boundary, cfg=cfg, refuse=lambda e: _error(engine, e))  # the outermost: before CORS

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
LOOPBACK_NAMES = ("localhost", "localhost.localdomain")


class Boundary:
    """What every request passes before a route sees it.

    1. Who may address it. A browser lets any web page send requests to 127.0.0.1: by DNS rebinding (a name
       of the page's own that resolves to this machine; its `Host` header says that name) or cross-origin
       (its `Origin` header says the page's origin). So `Host` must be an IP address, localhost, --host or in
       --allowed-hosts, and an `Origin` must be this server's own or in --allowed-origins: 403 otherwise.
    2. How much and how fast it sends. 413 for a body over `limit` bytes as soon as that is known: from its
       Content-Length before a byte is read, or, for a body sent in chunks, when the count passes the limit
       (what the client still sends, uvicorn reads and drops: a client that writes its whole body before it
       reads gets the answer, not a reset). 408, and the connection closed, for a body not complete within
       `timeout` seconds of its headers.
    """

    def __init__(self, app: ASGIApp, cfg: ServeConfig, refuse):
        self.app, self.refuse, self.limit, self.timeout = app, refuse, cfg.max_request_bytes, cfg.upload_timeout
        names = {h.lower().rstrip(".") for h in cfg.allowed_hosts} | {cfg.host.lower(), *LOOPBACK_NAMES}
        self.hosts = None if "*" in names else names
        origins = {o.lower().rstrip("/") for o in cfg.allowed_origins}
        self.origins = None if "*" in origins else origins

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        refused = self._addressed(headers) or self._sized(headers)
        if refused is not None:
            return await self.refuse(refused)(scope, receive, send)
        seen, deadline, complete = 0, asyncio.get_running_loop().time() + self.timeout, False

        async def guarded():
            nonlocal seen, complete
            if complete:  # the body is in: what follows is the wait for a disconnect, as long as it takes
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), deadline - asyncio.get_running_loop().time())
            except TimeoutError:
                raise APIError(408, f"the request body did not arrive within {self.timeout:g} s (the server's "
                                    f"--upload-timeout)", headers={"Connection": "close"}) from None
            seen += len(message.get("body", b""))
            complete = message["type"] != "http.request" or not message.get("more_body", False)
            if seen > self.limit:
                raise APIError(413, f"the request body is longer than {self.limit} bytes")
            return message

        await self.app(scope, guarded, send)

    def _addressed(self, headers: dict) -> APIError | None:
        host = headers.get(b"host", b"").decode("latin-1").strip()
        name = _hostname(host) if host else ""  # no Host (HTTP/1.0): no browser sends that
        if name is None or (self.hosts is not None and name and name not in self.hosts and not _is_ip(name)):
            return APIError(403, f"this server does not answer to the host name {host[:100]!r} (a web page's "
                                 f"name for this machine could reach it that way): use its address, or start it "
                                 f"with --allowed-hosts NAME", code="host_not_allowed")
        origin = headers.get(b"origin", b"").decode("latin-1").strip().lower().rstrip("/")
        own = origin.partition("://")[2] == host.lower()  # this server's own pages (/docs)
        if origin and not own and self.origins is not None and origin not in self.origins:
            return APIError(403, f"requests from web pages of origin {origin[:100]!r} are refused: start the "
                                 f"server with --allowed-origins {origin[:100]} to let that page call it",
                            code="origin_not_allowed")
        return None

    def _sized(self, headers: dict) -> APIError | None:
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            return APIError(413, f"the request body has {int(length)} bytes; this server takes at most {self.limit}")
        return None


def _hostname(host: str) -> str | None:
    """The name of a Host header (`[::1]:8000` -> ::1, `LocalHost.:80` -> localhost); None if it is no host."""
    name, bracket, rest = host.lower().partition("]")
    if bracket:  # an IPv6 literal
        name = name.removeprefix("[")
        return name if host.startswith("[") and (not rest or rest[1:].isdigit() and rest[0] == ":") else None
    name, _, port = host.lower().partition(":")
    if (port and not port.isdigit()) or not name or any(c in name for c in "@/\\ "):
        return None
    return name.rstrip(".")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


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
ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 403, 404, 408, 413, 415, 422, 429, 500, 503)}
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
