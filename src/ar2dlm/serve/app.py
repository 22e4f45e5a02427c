"""The HTTP side: an OpenAI-compatible FastAPI app over the scheduler.

Endpoints: GET /health, GET /metrics (Prometheus text), GET /v1/models,
POST /v1/completions and /v1/chat/completions (streamed as server-sent
events, one per commit of accepted tokens, then `data: [DONE]`, or whole).
Every error a client can cause is an OpenAI-style body with a 4xx status:
400 a body that is not a JSON object, 401 a missing or wrong API key, 404 an
unknown model or path, 413 a body or prompt too long, 422 a field whose
value the settings refuse, 429 a full queue (with Retry-After), 503 while
shutting down.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from ..core.errors import ConfigError
from ..decode.batching import new_row
from ..decode.engine import check_request
from . import schema
from .config import ServeConfig
from .metrics import Metrics
from .scheduler import DONE, Choice, Draining, Job, QueueFull, Scheduler
from .schema import APIError

PARAMS = {"max_new_tokens": "max_tokens", "eos_token_id": "ignore_eos"}
"""DecodeConfig fields under their request names."""


def create_app(lm, cfg: ServeConfig, name: str) -> FastAPI:
    """The app serving `lm` as model `name`; its lifespan starts and drains the scheduler thread."""
    metrics = Metrics()
    scheduler = Scheduler(lm, cfg, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        scheduler.thread.start()
        yield
        await asyncio.to_thread(scheduler.stop, cfg.grace)

    app = FastAPI(title="ar2dlm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler, app.state.metrics = scheduler, metrics

    def error(e: APIError) -> JSONResponse:
        metrics.request(e.status)
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return error(e)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):  # unknown paths, wrong methods
        return error(APIError(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None))

    @app.exception_handler(Exception)
    async def server_error(request, e: Exception):  # a bug: say so without the details
        return error(APIError(500, f"internal server error ({type(e).__name__})"))

    def authorize(request: Request) -> None:
        if cfg.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # compare_digest: the time taken does not tell how much of the key was right
        if not (hmac.compare_digest(token.strip().encode(), cfg.api_key.encode()) and scheme.lower() == "bearer"):
            raise APIError(401, "missing or wrong API key: send the header `Authorization: Bearer KEY`",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def read_json(request: Request):
        limit = cfg.max_request_bytes
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise APIError(413, f"the request body has {length} bytes; this server takes at most {limit}")
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > limit:
                raise APIError(413, f"the request body is longer than {limit} bytes")
        try:
            return json.loads(body)
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
            raise APIError(400, f"the request body is not valid JSON: {str(e)[:200]}") from None

    def build(spec: schema.Spec, loop) -> Job:
        """The job of a parsed request: its prompts tokenized and checked, settings validated, one row per choice."""
        where = "messages" if spec.chat else "prompt"
        if spec.n * len(spec.prompts) > cfg.max_batch:
            raise APIError(422, f"{spec.n * len(spec.prompts)} choices (n x prompts) exceed the server's "
                                f"max_batch of {cfg.max_batch}", "n")
        choices, prompt_tokens = [], 0
        for i, prompt in enumerate(spec.prompts):
            ids = _tokenize(lm, prompt, spec.chat)
            prompt_tokens += len(ids)
            ctx = lm.context_len
            room = None if ctx is None else ctx - len(ids)
            if room is not None and room < 1:
                raise APIError(413, f"the prompt has {len(ids)} tokens, the model's context {ctx}: shorten it to "
                                    f"at most {ctx - 1}", where, "context_length_exceeded")
            settings = dict(spec.settings, max_new_tokens=spec.max_tokens, ar=True if cfg.ar else None)
            if settings["max_new_tokens"] is None:
                settings["max_new_tokens"] = min(cfg.default_max_tokens, room or cfg.default_max_tokens)
            try:
                dcfg = lm.decode_config(**settings)
            except ConfigError as e:
                raise APIError(422, _request_words(str(e)), PARAMS.get(e.field, e.field), "invalid_value") from None
            if room is not None and dcfg.max_new_tokens > room:
                raise APIError(413, f"the prompt has {len(ids)} tokens; with max_tokens={dcfg.max_new_tokens} that "
                                    f"exceeds the model's context of {ctx} tokens: lower max_tokens to at most "
                                    f"{room}", "max_tokens", "context_length_exceeded")
            try:
                check_request(lm, [ids], dcfg)
            except ConfigError as e:
                raise APIError(422, _request_words(str(e)), PARAMS.get(e.field, e.field or where)) from None
            for j in range(spec.n):
                seed = None if dcfg.seed is None else (dcfg.seed + j) % 2**64  # choice j: the next stream
                choices.append(Choice(i * spec.n + j, ids, dcfg, new_row(lm, dcfg, seed)))
        return Job(choices, loop, prompt_tokens)

    def usage(job: Job) -> dict:
        done = sum(len(c.row.out.tokens) for c in job.choices)
        return {"prompt_tokens": job.prompt_tokens, "completion_tokens": done,
                "total_tokens": job.prompt_tokens + done}

    async def complete(request: Request, chat: bool):
        authorize(request)
        body = await read_json(request)
        if isinstance(body, dict) and isinstance(body.get("model"), str) and body["model"] != name:
            raise APIError(404, f"model {body['model']!r} does not exist; this server serves {name!r}", "model",
                           "model_not_found")
        spec = schema.parse(body, chat)
        job = build(spec, asyncio.get_running_loop())
        try:
            scheduler.submit(job)
        except QueueFull as e:
            raise APIError(429, str(e), code="queue_full", headers={"Retry-After": str(e.retry_after)}) from None
        except Draining:
            raise APIError(503, "the server is shutting down: retry against another instance",
                           headers={"Retry-After": "1"}) from None
        metrics.tokens(0, 0, prompt=job.prompt_tokens)
        rid, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())
        if spec.stream:
            return StreamingResponse(stream(job, spec, rid, created), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        event, checked = None, time.monotonic()
        try:
            while True:
                try:
                    event = await asyncio.wait_for(job.events.get(), 0.25)
                except asyncio.TimeoutError:
                    event = None
                if event is DONE:
                    break
                if event is not None and event.error:
                    raise APIError(500, event.error)
                if time.monotonic() - checked > 0.25:  # events come every step: look for a disconnect by the clock
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        metrics.request("cancelled")
                        return JSONResponse({}, status_code=499)
        finally:  # whichever way it ended (a disconnect, an error, the handler cancelled), its rows are free
            if event is not DONE:
                job.cancel()
        choices = [(c.index, c.row.out.text(), c.row.out.finish_reason) for c in job.choices]
        metrics.request(200)
        return schema.result(spec, rid, created, name, choices, usage(job))

    async def stream(job: Job, spec: schema.Spec, rid: str, created: int):
        done = False
        try:
            if spec.chat:
                for c in job.choices:
                    yield _sse(schema.chunk(spec, rid, created, name, c.index, "", None, role=True))
            while True:
                event = await job.events.get()
                if event is DONE:
                    break
                if event.error:
                    metrics.request(500)
                    done = True
                    job.cancel()  # its other choices, if any, stop too
                    yield _sse(APIError(500, event.error).body())
                    return
                yield _sse(schema.chunk(spec, rid, created, name, event.index, event.text, event.finish))
            if spec.include_usage:
                yield _sse(schema.chunk(spec, rid, created, name, None, None, None, usage(job)))
            yield "data: [DONE]\n\n"
            done = True
            metrics.request(200)
        finally:
            if not done:  # the client went away (the response was cancelled): free its rows
                job.cancel()
                metrics.request("cancelled")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, chat=True)

    def card() -> dict:
        return {"id": name, "object": "model", "created": 0, "owned_by": "ar2dlm"}

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [card()]}

    @app.get("/v1/models/{model:path}")
    async def model(request: Request, model: str):
        authorize(request)
        if model != name:
            raise APIError(404, f"model {model!r} does not exist; this server serves {name!r}", "model",
                           "model_not_found")
        return card()

    @app.get("/health")
    async def health():
        if not scheduler.accepting:
            return JSONResponse({"status": "draining"}, status_code=503)
        if not scheduler.thread.is_alive():
            return JSONResponse({"status": "scheduler stopped"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    return app


def _tokenize(lm, prompt, chat: bool) -> list[int]:
    where = "messages" if chat else "prompt"
    try:
        if not chat:
            return lm.encode([prompt])[0]
        if not getattr(lm.tokenizer, "chat_template", None):
            raise ConfigError("this model's tokenizer has no chat template: use /v1/completions with the prompt "
                              "text as the model expects it")
        ids = lm.tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
        ids = list(ids["input_ids"]) if hasattr(ids, "keys") else list(ids)
        if not ids:
            raise ConfigError("the messages render to an empty prompt")
        return ids
    except ConfigError as e:
        raise APIError(422, str(e), where) from None
    except Exception as e:  # noqa: BLE001 -- the template's own checks (a jinja error such as "roles must alternate")
        raise APIError(422, f"the chat template refused these messages: {type(e).__name__}: {str(e)[:200]}",
                       where) from None


def _request_words(message: str) -> str:
    """A DecodeConfig message in the request's words (max_new_tokens is OpenAI's max_tokens)."""
    return message.replace("max_new_tokens", "max_tokens")


def _sse(body: dict) -> str:
    return f"data: {json.dumps(body)}\n\n"
