"""The engine client: between a validated request and the engine, and the only part of the server that runs it.

The routes above hold pydantic models and never import torch. `submit` turns a request into a `Job` on a
thread of its own (tokenizing and the chat template are CPU work that would stall the event loop): the
prompts tokenized and checked against the model (`check_request`), the settings made a `DecodeConfig`, one
engine `Request` per choice; then it hands the job to the scheduler thread, which owns the model. `stream`,
`result` and `cancel` are how the routes follow a job; `start` / `stop` run and drain the scheduler thread.

What one request may cost is capped here, before any work: its drafting width (draft_len, proposals), its
max_tokens and its prompt tokens (the server's --max-* flags). A row's forward grows with draft_len x
(1 + proposals) and every running batch steps once per iteration, so without the caps one request could make
every other wait on its steps.
"""

from __future__ import annotations

import asyncio
import re
import time
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator

from ..core.errors import ConfigError
from ..decode.core import Request, row_seed
from ..decode.engine import check_request
from ..model.lm import DiffusionLM
from .config import ServeConfig
from .metrics import Metrics
from .protocol import APIError, ChatCompletionRequest, CompletionRequest
from .scheduler import DONE, Choice, Draining, Event, Job, QueueFull, Scheduler

ABSOLUTE_DIRS = r"(?<![\w.])(?:~|[A-Za-z]:)?[/\\](?:[^\s'\"/\\]+[/\\])+(?=[^\s'\"/\\])"
"""The directories of an absolute path (/home/u/.cache/m/ar2dlm.json -> ar2dlm.json): not a client's business."""
PARAMS = {"max_new_tokens": "max_tokens", "eos_token_id": "ignore_eos"}
"""DecodeConfig fields under their request names."""


class EngineClient:
    """The model behind the HTTP layer: `submit` a request, then `stream` its events or await its `result`."""

    def __init__(self, lm: DiffusionLM, cfg: ServeConfig):
        self.lm, self.cfg = lm, cfg
        self.metrics = Metrics()
        self.scheduler = Scheduler(lm, cfg, self.metrics)
        # one thread: a fast tokenizer is not to be called from several threads at once
        self.builder = ThreadPoolExecutor(1, thread_name_prefix="ar2dlm-tokenize")
        self.live: set[Job] = set()  # admitted jobs someone still waits for (the event loop's)
        self.deadline: float | None = None  # when the shutdown's grace period ends (time.monotonic)
        K, R = lm.settings.decode_defaults() if lm.settings is not None else (1, 1)
        block = lm.settings.block_size if lm.settings is not None else 1
        # (field, largest value, the flag that sets it); the model's own defaults are always within
        self.limits = [("draft_len", max(cfg.max_draft_len or block, K), "--max-draft-len"),
                       ("proposals", max(cfg.max_proposals, R), "--max-proposals"),
                       ("max_tokens", cfg.max_output_tokens, "--max-output-tokens")]

    # ------------------------------------------------------------------ life
    def start(self) -> None:
        if not self.scheduler.running:  # else `ar2dlm serve` runs the scheduler in its main thread
            self.scheduler.thread.start()

    async def stop(self) -> None:
        """Admit nothing more, let the admitted requests finish within the grace period (the rest get 503), end
        the threads."""
        if self.deadline is None:  # else a signal started the drain (`ar2dlm serve`), and it is done
            self.stop_admission()
        await self.drain()
        await asyncio.to_thread(self.scheduler.stop, self.remaining())
        self.builder.shutdown(wait=False, cancel_futures=True)

    def stop_admission(self) -> None:
        """A signal asked the server to stop: admit nothing new, and start the grace period; a second signal ends
        it now (plain writes: safe in a signal handler)."""
        now = time.monotonic()
        self.deadline = now + self.cfg.grace if self.deadline is None else min(self.deadline, now)
        self.scheduler.stop_admission()

    def remaining(self) -> float:
        """Seconds left of the grace period (all of it before a signal)."""
        return self.cfg.grace if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    async def drain(self, margin: float = 0.0) -> None:
        """Wait for the admitted requests until `margin` seconds before the grace period ends, then end every
        one still unfinished with a 503 (a stream gets an error event and [DONE], a whole answer a JSON 503):
        the server exits in time even when a step outlasts the grace period."""
        while self.live and self.remaining() > margin:
            await asyncio.sleep(0.02)
        for job in list(self.live):
            self.cancel(job)
            job.resolve("the server is shutting down and could not finish this request within its grace period: "
                     "send it again to another instance", 503)

    @property
    def health(self) -> str:
        """ok | draining | scheduler stopped."""
        if not self.scheduler.accepting:
            return "draining"
        return "ok" if self.scheduler.alive else "scheduler stopped"

    # ------------------------------------------------------------------ requests
    async def submit(self, request: CompletionRequest | ChatCompletionRequest) -> Job:
        """The request's job, admitted to the queue; APIError 413 / 422 for what the model or the server's limits
        cannot take, 429 for a full queue (with Retry-After), 503 while draining."""
        self._admissible()  # before any work: a refusal costs nothing
        self._within_limits(request)
        choices, prompt_tokens = await asyncio.get_running_loop().run_in_executor(self.builder, self._build, request)
        job = Job(choices, asyncio.get_running_loop(), prompt_tokens, stream=request.stream)
        try:
            self.scheduler.submit(job)
        except QueueFull as e:
            raise _busy(e) from None
        except Draining:
            raise _draining() from None
        self.live.add(job)
        job.done.add_done_callback(lambda _: self.live.discard(job))
        self.metrics.tokens(0, 0, prompt=job.prompt_tokens)
        return job

    async def stream(self, job: Job) -> AsyncIterator[Event]:
        """A streamed job's events, up to its last (an error event is the last too)."""
        while (event := await job.events.get()) is not DONE:
            yield event
            if event.error:
                return

    async def result(self, job: Job) -> None:
        """Wait until every choice has finished; APIError 500 if decoding failed, 503 if the shutdown cut it."""
        failure = await asyncio.shield(job.done)
        if failure is not None:
            raise APIError(*failure)

    def cancel(self, job: Job) -> None:
        """No one waits for the job any more: its rows leave the batch before the next step."""
        job.cancel()
        self.live.discard(job)

    def _admissible(self) -> None:
        if not self.scheduler.accepting:
            raise _draining()
        if len(self.scheduler.waiting) >= self.cfg.max_queue:
            raise _busy(self.scheduler.queue_full())

    def _within_limits(self, request: CompletionRequest | ChatCompletionRequest) -> None:
        """422 for a setting over the server's caps, 413 for token-id prompts over --max-prompt-tokens."""
        for field, limit, flag in self.limits:
            value = getattr(request, field)
            if value is not None and value > limit:
                if field == "max_tokens" and getattr(request, "max_completion_tokens", None) is not None:
                    field = "max_completion_tokens"
                raise APIError(422, f"{field}={value} is over this server's limit of {limit} (its {flag}): ask "
                                    f"for at most {limit}", field, "over_limit")
        ids = [p for p in request.prompts() if not isinstance(p, (str, dict)) and p and isinstance(p[0], int)]
        self._prompt_cap(sum(map(len, ids)) * (request.n or 1), "prompt")

    def _prompt_cap(self, tokens: int, where: str) -> None:
        if tokens > self.cfg.max_prompt_tokens:
            raise APIError(413, f"the prompts have {tokens} tokens (counted once per choice); this server takes at "
                                f"most {self.cfg.max_prompt_tokens} per request (its --max-prompt-tokens): shorten "
                                f"them or ask for fewer choices", where, "prompt_too_long")

    # ------------------------------------------------------------------ the tokenizer thread
    def _build(self, request: CompletionRequest | ChatCompletionRequest) -> tuple[list[Choice], int]:
        """A request's choices (its prompts tokenized and checked, its settings validated, one engine row per
        choice) and its prompt tokens."""
        chat = isinstance(request, ChatCompletionRequest)
        where, n, prompts = "messages" if chat else "prompt", request.n or 1, request.prompts()
        if n * len(prompts) > self.cfg.max_batch:
            raise APIError(422, f"{n * len(prompts)} choices (n x prompts) exceed the server's max_batch of "
                                f"{self.cfg.max_batch}", "n")
        settings = dict(request.settings(), max_new_tokens=request.max_tokens, ar=True if self.cfg.ar else None)
        choices, prompt_tokens, ctx = [], 0, self.lm.context_len
        for i, prompt in enumerate(prompts):
            ids = self._tokenize(prompt, chat)
            prompt_tokens += len(ids)
            room = None if ctx is None else ctx - len(ids)
            if room is not None and room < 1:
                raise APIError(413, f"the prompt has {len(ids)} tokens, the model's context {ctx}: shorten it to "
                                    f"at most {ctx - 1}", where, "context_length_exceeded")
            own = dict(settings)
            if own["max_new_tokens"] is None:
                own["max_new_tokens"] = min(self.cfg.default_max_tokens, room or self.cfg.default_max_tokens)
            try:
                cfg = self.lm.decode_config(**own)
            except ConfigError as e:
                raise APIError(422, self._words(e), PARAMS.get(e.field, e.field), "invalid_value") from None
            if room is not None and cfg.max_new_tokens > room:
                raise APIError(413, f"the prompt has {len(ids)} tokens; with max_tokens={cfg.max_new_tokens} that "
                                    f"exceeds the model's context of {ctx} tokens: lower max_tokens to at most "
                                    f"{room}", "max_tokens", "context_length_exceeded")
            try:
                check_request(self.lm, [ids], cfg)
            except ConfigError as e:
                raise APIError(422, self._words(e), PARAMS.get(e.field, e.field or where)) from None
            self._prompt_cap(prompt_tokens * n, where)
            for j in range(n):  # choice i * n + j draws from the stream generate gives row i * n + j
                choices.append(Choice(i * n + j, ids, cfg, Request(self.lm, cfg, ids, row_seed(cfg, i * n + j))))
        return choices, prompt_tokens

    def _tokenize(self, prompt, chat: bool) -> list[int]:
        where = "messages" if chat else "prompt"
        try:
            if not chat:
                return self.lm.encode([prompt])[0]
            if not getattr(self.lm.tokenizer, "chat_template", None):
                raise ConfigError("this model's tokenizer has no chat template: use /v1/completions with the "
                                  "prompt text as the model expects it")
            ids = self.lm.tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                                        return_dict=False)
            ids = list(ids["input_ids"]) if hasattr(ids, "keys") else list(ids)
            if not ids:
                raise ConfigError("the messages render to an empty prompt")
            return ids
        except ConfigError as e:
            raise APIError(422, self._words(e), where) from None
        except Exception as e:  # noqa: BLE001 -- the template's own checks (a jinja error: "roles must alternate")
            raise APIError(422, f"the chat template refused these messages: {type(e).__name__}: "
                                f"{self._words(str(e))[:200]}", where) from None

    @staticmethod
    def _words(error) -> str:
        """A DecodeConfig message in the request's words (max_new_tokens is OpenAI's max_tokens), without the
        server's paths (a checkpoint's default names its file: the file name is kept, not where it lives)."""
        return re.sub(ABSOLUTE_DIRS, "", str(error).replace("max_new_tokens", "max_tokens"))


def _busy(e: QueueFull) -> APIError:
    return APIError(429, str(e), code="queue_full", headers={"Retry-After": str(e.retry_after)})


def _draining() -> APIError:
    return APIError(503, "the server is shutting down: retry against another instance", headers={"Retry-After": "1"})
