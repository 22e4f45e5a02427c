"""OpenAI serving: a validated request, through the engine client, to a response or a stream of chunks.

Nothing here imports torch: the engine is reached through the `Engine` interface (serve/client.py implements
it). A whole answer waits on the job's future while a watcher listens for the client's `http.disconnect`;
whichever comes first ends the wait, and a client that left frees its rows at once. A stream is cancelled by
starlette when the client leaves; either way the job is cancelled on the way out.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any, AsyncIterator, Protocol

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from .metrics import Metrics
from .protocol import (
    FINISH,
    APIError,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    CompletionChoice,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    Delta,
    Usage,
)


class Job(Protocol):
    """A submitted request, as the routes see it."""

    prompt_tokens: int

    def indices(self) -> list[int]: ...  # its choices' indices
    def outputs(self) -> list[tuple[int, str, str]]: ...  # (index, text, engine finish reason), once done
    def completion_tokens(self) -> int: ...


class Engine(Protocol):
    """What the routes need of the engine client (and all they know of it)."""

    metrics: Metrics
    health: str  # ok | draining | scheduler stopped

    def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def submit(self, request: CompletionRequest | ChatCompletionRequest) -> Job: ...
    def stream(self, job: Job) -> AsyncIterator[Any]: ...  # events: .index, .text, .finish, .error, .status
    async def result(self, job: Job) -> None: ...
    def cancel(self, job: Job) -> None: ...


async def complete(engine: Engine, http: Request, request: CompletionRequest | ChatCompletionRequest,
                   model: str) -> Response:
    """Serve one request: the whole answer, or (stream: true) server-sent events ending in `data: [DONE]`."""
    job = await engine.submit(request)
    chat = isinstance(request, ChatCompletionRequest)
    head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()), "model": model}
    if request.stream:
        return StreamingResponse(_events(engine, job, request, head), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    if not await _finished(engine, job, http):
        engine.metrics.request("cancelled")
        return Response(status_code=499)  # nginx's "client closed request": no one reads it
    usage = _usage(job)
    if chat:
        body = ChatCompletionResponse(**head, usage=usage, choices=[
            ChatChoice(index=i, message=ChatMessage(content=text), finish_reason=FINISH.get(f))
            for i, text, f in job.outputs()])
    else:
        body = CompletionResponse(**head, usage=usage, choices=[
            CompletionChoice(index=i, text=text, finish_reason=FINISH.get(f)) for i, text, f in job.outputs()])
    engine.metrics.request(200)
    return Response(body.model_dump_json(), media_type="application/json")


async def _finished(engine: Engine, job: Job, http: Request) -> bool:
    """Wait for the job: True once it is done, False if the client went away first (the job is cancelled)."""
    done = asyncio.ensure_future(engine.result(job))
    gone = asyncio.ensure_future(_disconnect(http))
    finished = False
    try:
        await asyncio.wait({done, gone}, return_when=asyncio.FIRST_COMPLETED)
        if done.done():
            done.result()  # decoding failed: its APIError 500
            finished = True
        return finished
    finally:  # whichever way it ended (done, gone, failed, this handler cancelled), nothing is left running
        gone.cancel()
        done.cancel()
        if not finished:
            engine.cancel(job)


async def _disconnect(http: Request) -> None:
    """Return when the client closes the connection (the body has been read: the next message is the close)."""
    while (await http.receive())["type"] != "http.disconnect":
        pass


async def _events(engine: Engine, job: Job, request: CompletionRequest | ChatCompletionRequest,
                  head: dict) -> AsyncIterator[str]:
    chat, done, include_usage = isinstance(request, ChatCompletionRequest), False, request.include_usage

    def chunk(index: int, text: str | None, finish: str | None, role: bool = False) -> str:
        if chat:
            choice = ChatChunkChoice(index=index, delta=Delta(role="assistant" if role else None, content=text),
                                     finish_reason=FINISH.get(finish))
            body = ChatCompletionChunk(**head, choices=[choice])
        else:
            body = CompletionChunk(**head, choices=[CompletionChoice(index=index, text=text or "",
                                                                     finish_reason=FINISH.get(finish))])
        # include_usage: "usage" is null in every chunk but the last; else it is left out
        return _sse(body.model_dump_json(exclude=None if include_usage else {"usage"}))

    try:
        if chat:
            for index in job.indices():
                yield chunk(index, "", None, role=True)
        async for event in engine.stream(job):
            if event.error:  # a failed step (500), or the shutdown's grace period ended (503)
                engine.metrics.request(event.status)
                done = True
                engine.cancel(job)  # its other choices, if any, stop too
                yield _sse(json.dumps(APIError(event.status, event.error).body()))
                yield "data: [DONE]\n\n"
                return
            yield chunk(event.index, event.text, event.finish)
        if include_usage:
            last = (ChatCompletionChunk if chat else CompletionChunk)(**head, choices=[], usage=_usage(job))
            yield _sse(last.model_dump_json())
        yield "data: [DONE]\n\n"
        done = True
        engine.metrics.request(200)
    finally:
        if not done:  # the client went away (starlette cancelled the response): free its rows
            engine.cancel(job)
            engine.metrics.request("cancelled")


def _usage(job: Job) -> Usage:
    completion = job.completion_tokens()
    return Usage(prompt_tokens=job.prompt_tokens, completion_tokens=completion,
                 total_tokens=job.prompt_tokens + completion)


def _sse(data: str) -> str:
    return f"data: {data}\n\n"
