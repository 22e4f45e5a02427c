"""`ServeConfig`: the `serve` verb's settings (its flags map 1:1 onto the fields)."""

from __future__ import annotations

from dataclasses import dataclass

from ..core.validation import check, check_types, finite


@dataclass(frozen=True)
class ServeConfig:
    """How `ar2dlm serve` listens, admits and batches. The CLI flags have the same names."""

    host: str = "127.0.0.1"
    """Address to bind (the loopback by default: set 0.0.0.0 only behind an API key or a firewall)."""
    port: int = 8000
    """TCP port (0 = any free port; the line `listening on http://HOST:PORT` on stderr names it)."""
    max_batch: int = 16
    """Most rows (one per choice of a request) decoding together; more requests wait in the queue."""
    max_queue: int = 64
    """Most requests waiting for a row; one more gets 429 with Retry-After."""
    draft_max_batch: int = 8
    """Draft only while at most this many rows run (0 = never): in a larger batch a forward's extra draft and
    proposal rows are no longer free, so the steps are plain AR steps."""
    api_key: str | None = None
    """Bearer key every /v1 request must carry (default: $AR2DLM_API_KEY if set, else none)."""
    served_name: str | None = None
    """The model id clients send and /v1/models lists (default: MODEL as given)."""
    default_max_tokens: int = 256
    """max_tokens of a request that gives none (cut to the room left in the model's context)."""
    max_request_bytes: int = 4_000_000
    """Largest request body accepted (413 above)."""
    upload_timeout: float = 30.0
    """Seconds a client has to send a request's head, and then its body (408 after, and the connection closed: a
    slow upload would hold it)."""
    max_output_tokens: int = 4096
    """Largest max_tokens a request may ask for (422 above)."""
    max_prompt_tokens: int = 4096
    """Most prompt tokens a request may bring, once per choice (413 above): newcomers are prefilled between two
    steps, so every running stream waits for them."""
    max_draft_len: int = 0
    """Largest draft_len a request may ask for (422 above; 0 = the model's block size, or its default draft_len
    if larger): a row's forward grows with draft_len x (1 + proposals)."""
    max_proposals: int = 4
    """Largest proposals a request may ask for (422 above; at least the model's default)."""
    allowed_hosts: tuple[str, ...] = ()
    """Host names (the `Host` header) the server answers besides IP addresses, localhost and --host (403 for
    another: a web page whose name resolves to this machine, DNS rebinding, must not reach it); * = any."""
    allowed_origins: tuple[str, ...] = ()
    """Web origins (http://host:port) whose pages may call the server from a browser, with CORS (403 for another
    `Origin`; the server's own pages, /docs, always may); * = any."""
    grace: float = 30.0
    """Seconds SIGTERM waits for in-flight requests to finish before the server exits."""
    ar: bool = False
    """Serve plain AR decoding (one token per forward, no drafts): the baseline drafting is measured against;
    also serves a model that is not converted."""

    def __post_init__(self):
        check_types(self)
        check(self.host != "", "host must not be empty (127.0.0.1 = this machine only)", "host")
        check(0 <= self.port <= 65535, f"port must be in 0..65535, got {self.port}", "port")
        check(self.max_batch >= 1, f"max_batch must be >= 1, got {self.max_batch}", "max_batch")
        check(self.max_queue >= 1, f"max_queue must be >= 1, got {self.max_queue}", "max_queue")
        check(self.draft_max_batch >= 0, f"draft_max_batch must be >= 0, got {self.draft_max_batch}",
              "draft_max_batch")
        check(self.api_key is None or len(self.api_key) >= 8,
              "api_key must have at least 8 characters (a short key is guessed)", "api_key")
        check(self.api_key is None or (self.api_key.isascii() and self.api_key.isprintable()
                                       and " " not in self.api_key),
              "api_key must be printable ASCII without spaces (a header cannot carry another key whole: no request "
              "could match it)", "api_key")
        check(self.served_name is None or self.served_name.strip() != "", "served_name must not be empty",
              "served_name")
        check(self.default_max_tokens >= 1, f"default_max_tokens must be >= 1, got {self.default_max_tokens}",
              "default_max_tokens")
        check(self.max_request_bytes >= 1024, f"max_request_bytes must be >= 1024, got {self.max_request_bytes}",
              "max_request_bytes")
        check(finite(self.upload_timeout) and self.upload_timeout > 0,
              f"upload_timeout must be a number of seconds > 0, got {self.upload_timeout}", "upload_timeout")
        for name in ("max_output_tokens", "max_prompt_tokens", "max_proposals"):
            check(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}", name)
        check(self.max_draft_len >= 0, f"max_draft_len must be >= 0 (0 = the model's block size), got "
                                       f"{self.max_draft_len}", "max_draft_len")
        check(self.default_max_tokens <= self.max_output_tokens,
              f"default_max_tokens ({self.default_max_tokens}) must be at most max_output_tokens "
              f"({self.max_output_tokens})", "default_max_tokens")
        bad = [h for h in self.allowed_hosts if not h or any(c.isspace() or c in "/:@" for c in h)]
        check(not bad, f"allowed_hosts must be host names (no scheme, port or path), got {bad[:1]}", "allowed_hosts")
        bad = [o for o in self.allowed_origins if o != "*" and not o.startswith(("http://", "https://"))]
        check(not bad, f"allowed_origins must be origins such as http://localhost:3000 (or *), got {bad[:1]}",
              "allowed_origins")
        check(finite(self.grace) and self.grace >= 0, f"grace must be a number of seconds >= 0, got {self.grace}",
              "grace")
