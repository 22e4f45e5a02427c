"""The scheduler: one thread owns the model and runs the continuous batch.

Requests (`Job`s, one row per choice) wait in a bounded queue. Between two
steps the scheduler drops the rows whose client went away, admits waiting
jobs while rows are free (`max_batch`), prefills them into the running batch
of their step settings (`decode.core.Batch`), then steps every running
batch once. Tokens go back to the request's handler on the event loop
(`Job.send`, one event per commit of a streamed request; `Job.finish` once).

Drafting adapts to load: while more than `draft_max_batch` rows run, the
steps are plain AR steps (no draft or proposal rows). In a large batch the
forward is no longer bound by reading the weights, so the extra rows a draft
adds cost their full price, as serving engines turn speculation off at high
batch. Greedy output does not depend on the draft length, sampled output
does: seeded sampled requests run in batches of their own that keep their
drafting whatever the load, so a seed reproduces its text.
"""

from __future__ import annotations

import asyncio
import collections
import math
import sys
import threading
import time
import traceback
from dataclasses import dataclass

from ..decode.core import Batch, Request, step_settings
from ..decode.config import DecodeConfig
from ..decode.interface import DecodeModel
from .config import ServeConfig
from .metrics import Metrics

DONE = object()
"""The last event of a streamed job: every choice has finished."""


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"the server's queue is full; retry in {retry_after} s")
        self.retry_after = retry_after


class Draining(Exception):
    """The server is shutting down and admits nothing new."""


@dataclass
class Choice:
    index: int  # OpenAI's choice index: prompt i, choice j -> i * n + j
    prompt: list[int]
    cfg: DecodeConfig
    row: Request  # the engine's row: its tokens, text, generator


@dataclass
class Event:
    index: int
    text: str  # new text safe to show
    finish: str | None  # the engine's finish reason when the choice is done
    error: str | None = None
    status: int = 500  # the error's HTTP status: 500 a failed step, 503 a request the shutdown cut short


class Job:
    """One HTTP request: its choices, and how its handler on the event loop hears of them.

    A streamed job gets each commit as an `Event` in `events`, then DONE (or an error event). Every job's
    `done` future resolves once: None when all its choices have finished, else (HTTP status, message) of the
    error. The scheduler thread reaches the loop only through `call_soon_threadsafe`.
    """

    def __init__(self, choices: list[Choice], loop: asyncio.AbstractEventLoop, prompt_tokens: int, stream: bool):
        self.choices, self.loop, self.prompt_tokens = choices, loop, prompt_tokens
        self.events: asyncio.Queue | None = asyncio.Queue() if stream else None
        self.done: asyncio.Future = loop.create_future()
        self.cancelled = False
        self.left = len(choices)

    # ------------------------------------------------------------------ the scheduler thread's side
    def send(self, event: Event) -> None:
        if self.events is not None:
            self._call(self.events.put_nowait, event)

    def finish(self, error: str | None = None) -> None:
        self._call(self.resolve, error)

    def _call(self, fn, *args) -> None:
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop has closed: no one is listening any more
            self.cancelled = True

    # ------------------------------------------------------------------ the event loop's side
    def resolve(self, error: str | None, status: int = 500) -> None:
        """Resolve `done` (if not yet): finished (error None), or failed with `status`."""
        if self.done.done():
            return
        self.done.set_result(None if error is None else (status, error))
        if self.events is not None:
            self.events.put_nowait(DONE if error is None else Event(0, "", None, error, status))

    def cancel(self) -> None:
        """The client went away: its rows leave the batch before the next step."""
        self.cancelled = True

    def indices(self) -> list[int]:
        return [c.index for c in self.choices]

    def outputs(self) -> list[tuple[int, str, str]]:
        """(choice index, text, engine finish reason) of every choice, once done."""
        return [(c.index, c.row.text(), c.row.finish_reason) for c in self.choices]

    def completion_tokens(self) -> int:
        return sum(len(c.row.tokens) for c in self.choices)


class Scheduler:
    def __init__(self, lm: DecodeModel, cfg: ServeConfig, metrics: Metrics):
        self.lm, self.cfg, self.metrics = lm, cfg, metrics
        self.lock = threading.Condition()
        self.waiting: collections.deque[Job] = collections.deque()
        self.groups: dict[tuple[DecodeConfig, bool], Batch] = {}  # (step settings, seeded sampling) -> batch
        self.owner: dict[Request, tuple[Job, Choice, Batch]] = {}  # row -> its job, choice and batch
        self.accepting, self.stopping, self.running = True, False, False
        self.abandoned = False  # the HTTP server has ended: no one can be answered any more
        self.mean_seconds = 1.0  # running mean of a request's time, for Retry-After
        self.thread = threading.Thread(target=self.run, name="ar2dlm-scheduler", daemon=True)
        self.finished = threading.Event()  # run() has returned

    # ------------------------------------------------------------------ the event loop's side
    def queue_full(self) -> QueueFull:
        """The refusal of one more request, saying when to retry (from the mean time of a request)."""
        waits = (len(self.waiting) + 1) / self.cfg.max_batch
        return QueueFull(max(1, math.ceil(waits * self.mean_seconds)))

    def submit(self, job: Job) -> None:
        with self.lock:
            if not self.accepting:
                raise Draining()
            if len(self.waiting) >= self.cfg.max_queue:
                raise self.queue_full()
            self.waiting.append(job)
            self.metrics.queue_depth = len(self.waiting)
            self.lock.notify()

    def stop_admission(self) -> None:
        """SIGTERM: admit nothing new (a plain write: this runs in a signal handler, which must not lock)."""
        self.accepting = False

    def stop(self, timeout: float) -> None:
        """Finish what was admitted (or give up after `timeout` s), then end the thread."""
        self.accepting = False
        with self.lock:
            self.stopping = True
            self.lock.notify()
        self.finished.wait(timeout)

    def abandon(self) -> None:
        """The HTTP server has ended (drained, or given up after the grace period): run() returns."""
        self.abandoned = self.stopping = True
        with self.lock:
            self.lock.notify()

    @property
    def alive(self) -> bool:
        """Whether run() is going (in its own thread, or in the thread that called it)."""
        return self.running and not self.finished.is_set()

    # ------------------------------------------------------------------ the scheduler thread
    def run(self) -> None:
        """The loop, until stop(): in `thread`, or in the caller's thread (`ar2dlm serve` runs it in the main
        thread: torch's OpenMP keeps a team of worker threads per thread that runs parallel work, and a second
        live team makes every parallel region wait on a futex, about 40% of a step here)."""
        self.running = True
        try:
            self._loop()
        finally:
            self.finished.set()

    def _loop(self) -> None:
        while not self.abandoned:
            with self.lock:
                self.waiting = collections.deque(job for job in self.waiting if not job.cancelled)
                admitted = []
                free = self.cfg.max_batch - len(self.owner)
                while self.waiting and len(self.waiting[0].choices) <= free:
                    job = self.waiting.popleft()
                    admitted.append(job)
                    free -= len(job.choices)
                self.metrics.queue_depth = len(self.waiting)
                if not admitted and not self.owner:
                    if self.stopping and not self.waiting:
                        return
                    self.lock.wait(0.25)
                    continue
            try:
                self._iteration(admitted)
            except Exception as e:  # noqa: BLE001 -- a bug outside a batch's step: end every request, go on
                traceback.print_exc(file=sys.stderr)
                for job in admitted + [job for job, _, _ in self.owner.values()]:
                    job.finish(error=_internal(e))
                self.owner.clear()
                self.groups.clear()

    def _iteration(self, admitted: list[Job]) -> None:
        """Join the admitted jobs, drop rows no one waits for, step every running batch once."""
        self._join(admitted)
        self._reap()
        draft = len(self.owner) <= self.cfg.draft_max_batch
        self.metrics.running = len(self.owner)
        for key, group in list(self.groups.items()):
            if len(group):
                self._guarded(group, group.step, draft or key[1])
            if not len(group):
                del self.groups[key]
        self.metrics.running = len(self.owner)

    def _join(self, jobs: list[Job]) -> None:
        """Prefill the admitted jobs' choices, one forward per step setting, into the running batches."""
        by_key: dict[tuple[DecodeConfig, bool], list[tuple[Job, Choice]]] = {}
        for job in jobs:
            for choice in job.choices:
                key = step_settings(choice.cfg), not choice.cfg.greedy and choice.cfg.seed is not None
                by_key.setdefault(key, []).append((job, choice))
        for key, rows in by_key.items():
            if key not in self.groups:
                self.groups[key] = Batch(self.lm, rows[0][1].cfg)
            group = self.groups[key]
            for job, choice in rows:
                self.owner[choice.row] = (job, choice, group)
            joining = [choice.row for _, choice in rows]
            self._guarded(group, group.join, joining, joining=joining)

    def _guarded(self, group: Batch, run, *args, joining: list[Request] = ()) -> None:
        """run(*args) (a join or a step) and send its tokens; a failure (a bug, never the input) fails that
        batch's requests."""
        try:
            taken = run(*args)
        except Exception as e:  # noqa: BLE001 -- the server stays up: report it, end this batch's requests
            traceback.print_exc(file=sys.stderr)
            for row in list(group.rows) + list(joining):
                if row in self.owner:
                    job, _, _ = self.owner.pop(row)
                    job.finish(error=_internal(e))  # its other choices, if any, are reaped: the handler cancels
            group.leave(list(group.rows))
            return
        self.metrics.steps += 1
        self.metrics.tokens(sum(len(t) for _, t in taken), len(taken))
        for row, _ in taken:
            job, choice, _ = self.owner[row]
            finish = row.finish_reason or None
            if job.events is not None:  # a whole answer is read once at the end (row.text), not in deltas
                text = row.delta()
                if text or finish:
                    job.send(Event(choice.index, text, finish))
            if finish:
                del self.owner[row]
                job.left -= 1
                if job.left == 0:
                    self.mean_seconds = 0.9 * self.mean_seconds + 0.1 * (time.perf_counter() - row.started)
                    job.finish()

    def _reap(self) -> None:
        """Rows whose client went away leave their batch."""
        for row in [row for row, (job, _, _) in self.owner.items() if job.cancelled]:
            _, _, group = self.owner.pop(row)
            group.leave([row])


def _internal(e: Exception) -> str:
    """What a client is told of a bug: its kind, not its text (which may name the server's files)."""
    return f"internal error while decoding ({type(e).__name__}); the server's log has the details"
