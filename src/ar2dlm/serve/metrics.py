"""Counters of the server, shown by GET /metrics in the Prometheus text format (no client library needed)."""

from __future__ import annotations

import collections
import threading
import time

WINDOW = 10.0
"""Seconds over which tokens/s is averaged."""


class Metrics:
    """Written by the scheduler thread and the request handlers; read by /metrics."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: collections.Counter = collections.Counter()  # HTTP status (or "cancelled") -> requests
        self.prompt_tokens = self.completion_tokens = 0
        self.row_forwards = 0  # forwards per row: TPF = completion tokens / row forwards
        self.steps = 0  # forwards of the model (one serves every running row of a batch)
        self.queue_depth = self.running = 0
        self.recent: collections.deque = collections.deque()  # (time, tokens) of the last WINDOW seconds

    def request(self, status) -> None:
        with self.lock:
            self.requests[str(status)] += 1

    def tokens(self, new: int, rows: int, prompt: int = 0) -> None:
        now = time.monotonic()
        with self.lock:
            self.completion_tokens += new
            self.prompt_tokens += prompt
            self.row_forwards += rows
            self.recent.append((now, new))
            while self.recent and self.recent[0][0] < now - WINDOW:
                self.recent.popleft()

    def render(self) -> str:
        with self.lock:
            now = time.monotonic()
            recent = sum(n for t, n in self.recent if t >= now - WINDOW)
            lines = ["# HELP ar2dlm_requests_total Requests by outcome (HTTP status, or cancelled by the client).",
                     "# TYPE ar2dlm_requests_total counter"]
            lines += [f'ar2dlm_requests_total{{status="{s}"}} {n}' for s, n in sorted(self.requests.items())]
            for name, kind, help, value in [
                ("prompt_tokens_total", "counter", "Prompt tokens of admitted requests.", self.prompt_tokens),
                ("generation_tokens_total", "counter", "Tokens generated (committed).", self.completion_tokens),
                ("row_forwards_total", "counter", "Forwards counted once per row they served.", self.row_forwards),
                ("steps_total", "counter", "Forwards of the model (prefills and steps).", self.steps),
                ("tokens_per_forward", "gauge", "Generated tokens per row forward (TPF; AR = 1).",
                 round(self.completion_tokens / self.row_forwards, 4) if self.row_forwards else 0.0),
                ("tokens_per_second", "gauge", f"Generated tokens per second over the last {WINDOW:g} s.",
                 round(recent / WINDOW, 3)),
                ("queue_depth", "gauge", "Requests waiting for a row.", self.queue_depth),
                ("running_batch_size", "gauge", "Rows decoding now.", self.running)]:
                lines += [f"# HELP ar2dlm_{name} {help}", f"# TYPE ar2dlm_{name} {kind}", f"ar2dlm_{name} {value}"]
        return "\n".join(lines) + "\n"
