"""`ar2dlm serve`: bind, load the model, run the app under uvicorn, drain on SIGTERM or SIGINT and exit 0.

FastAPI and uvicorn are the `serve` extra: they are imported when the verb runs, so the rest of the CLI
works without them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import logging
import os
import signal
import socket
import sys
import threading

from ..core.errors import ConfigError
from ..core.flags import config_from
from ..core.hardware import describe
from ..model.lm import DiffusionLM
from ..model.settings import LoadConfig
from .config import ServeConfig


def _server(config, engine):
    """uvicorn's server, with the shutdown of `ar2dlm serve`: a signal starts the drain and leaves the listening
    socket open (/health says draining, new requests get 503); uvicorn is told to exit once every admitted
    request has finished or the grace period is about to end (the rest get 503 first). It also says where it
    listens (with --port 0 the system chose)."""
    import uvicorn

    class Server(uvicorn.Server):
        drain: asyncio.Task | None = None

        def handle_exit(self, sig, frame) -> None:
            engine.stop_admission()  # plain writes: a second signal ends the grace period at once

        async def on_tick(self, counter: int) -> bool:
            if engine.deadline is not None and self.drain is None:
                # the margin: the last of the grace period is uvicorn's, to send the answers and close
                self.drain = asyncio.ensure_future(engine.drain(margin=config.timeout_graceful_shutdown + 0.2))
            if self.drain is not None and self.drain.done():
                self.should_exit = True
            return await super().on_tick(counter)

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started:
                host, port = self.servers[0].sockets[0].getsockname()[:2]
                print(f"ar2dlm serve: listening on http://{host}:{port}", file=sys.stderr, flush=True)

    return Server(config)


def _protocol(timeout: float):
    """uvicorn's h11 protocol with a deadline on a request's head: a connection that sends no complete request
    line and headers within `timeout` s (from its opening, or from the first byte of a kept-alive one's next
    request) gets a 408 and is closed. uvicorn has none (the body's deadline is the app's: app.Boundary)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._await_head()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._await_head()

        def connection_lost(self, exc) -> None:
            if self.head_timer is not None:
                self.head_timer.cancel()
            super().connection_lost(exc)

        def _await_head(self) -> None:
            waiting = self.conn.their_state is h11.IDLE and not self.transport.is_closing()
            if waiting and self.head_timer is None:
                self.head_timer = self.loop.call_later(timeout, self._too_slow)
            elif not waiting and self.head_timer is not None:
                self.head_timer.cancel()
                self.head_timer = None

        def _too_slow(self) -> None:
            self.head_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                body = b'{"error": {"message": "the request did not arrive within the server\'s --upload-timeout", ' \
                       b'"type": "invalid_request_error", "param": null, "code": null}}'
                self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                                     b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
                self.transport.close()

    return Protocol


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads: what is wrong with --host or --port is said at once,
    each in its own words."""
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as e:
        raise ConfigError(f"--host {host!r} is not an address or a name that resolves to one "
                          f"({getattr(e, 'strerror', None) or e}): give an address of this machine (127.0.0.1 = "
                          f"this machine only, 0.0.0.0 = every interface)", field="host") from None
    # one address (IPv4 first: `localhost` is 127.0.0.1, where clients that do not resolve it look)
    family, kind, proto, _, address = min(found, key=lambda a: a[0] != socket.AF_INET)
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a restart need not wait
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
    except OSError as e:
        sock.close()
        named = host + (f" ({address[0]})" if address[0] != host else "")
        where = f"{named}, port {port}"
        if e.errno == errno.EADDRINUSE:
            raise ConfigError(f"port {port} on {named} is already in use (another server?): stop it, or choose "
                              f"another --port (0 = any free port)", field="port") from None
        if e.errno == errno.EADDRNOTAVAIL:
            raise ConfigError(f"--host {named} is not an address of this machine: give one of its "
                              f"own (127.0.0.1 = this machine only, 0.0.0.0 = every interface)", field="host") \
                from None
        if e.errno == errno.EACCES:
            raise ConfigError(f"listening on port {port} needs privileges this process does not have: choose a "
                              f"--port of 1024 or more", field="port") from None
        raise ConfigError(f"cannot listen on {where}: {e.strerror}", field="host") from None
    return sock


class Stopped(BaseException):
    """A signal before the server was up (while the model loads): stop there, as a drained server does."""


def _stop_early(sig, frame) -> None:
    raise Stopped()


def cmd_serve(args) -> int:
    """an OpenAI-compatible HTTP server (completions, chat) with continuous batching

    Serve MODEL on /v1/completions and /v1/chat/completions (streamed or not), /v1/models, /health and /metrics.
    One scheduler decodes every request in one running batch that requests join and leave between steps; greedy
    output equals decoding each request alone. SIGTERM (or Ctrl-C) stops admission, lets in-flight requests
    finish within --grace seconds (the rest get 503), and exits 0. Binds 127.0.0.1 unless --host says
    otherwise."""
    cfg = config_from(args, ServeConfig)  # settings fail before the model loads
    try:
        import uvicorn

        from .app import create_app
        from .client import EngineClient
    except ImportError as e:
        raise ConfigError(f"ar2dlm serve needs the serve extra ({e.name} is missing): pip install 'ar2dlm[serve]'") \
            from None
    if cfg.api_key is None and os.environ.get("AR2DLM_API_KEY"):
        try:
            cfg = dataclasses.replace(cfg, api_key=os.environ["AR2DLM_API_KEY"])
        except ConfigError as e:
            raise ConfigError(f"$AR2DLM_API_KEY: {e}", field="api_key") from None
    sock = _bind(cfg.host, cfg.port)  # and so does the address
    before = {sig: signal.signal(sig, _stop_early) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        with sock:
            return _serve(args, cfg, sock, uvicorn, create_app, EngineClient)
    except Stopped:
        print("serve: stopped before it was up", file=sys.stderr, flush=True)
        return 0
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def _serve(args, cfg: ServeConfig, sock: socket.socket, uvicorn, create_app, EngineClient) -> int:
    # the setting as given: from_pretrained resolves auto as every verb does ($AR2DLM_DTYPE, then the checkpoint's own
    # dtype, then the hardware), so the server answers as the library does in the same environment
    lm = DiffusionLM.from_pretrained(args.model, dtype=config_from(args, LoadConfig).dtype, allow_ar=cfg.ar)
    if lm.mask_token_id is None and not cfg.ar:
        raise ConfigError(f"{args.model} is not converted: serve it with --ar, or convert it first", field="ar")
    name = cfg.served_name or args.model
    print(f"serve: {args.model} as {name!r}, {describe(lm.model.dtype)}"
          f"{', batch-invariant' * lm.batch_invariant}{', AR' * cfg.ar}", file=sys.stderr, flush=True)
    print(f"serve: {lm.paths()}", file=sys.stderr, flush=True)
    verdict = lm.exactness()
    if verdict is not None:
        print(f"serve: {verdict.line()}", file=sys.stderr, flush=True)
    if cfg.api_key is None and cfg.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"serve: warning: listening on {cfg.host} without an API key: anyone who reaches this port can use "
              f"the model (set --api-key or $AR2DLM_API_KEY)", file=sys.stderr, flush=True)
    engine = EngineClient(lm, cfg)
    # h11, whatever else is installed: the HTTP parser the tests run (it reads and drops the rest of a body
    # refused early, so a client still sending gets its 413).
    server = _server(uvicorn.Config(create_app(engine, cfg, name), http=_protocol(cfg.upload_timeout),
                                    log_level="info", access_log=False,
                                    timeout_graceful_shutdown=max(0.3, min(1.0, cfg.grace / 4)), lifespan="on"),
                     engine)
    # The model runs in this (the main) thread and the HTTP server in a thread of its own: torch's OpenMP keeps
    # a team of worker threads per thread that runs parallel work, and loading already made this thread's; a
    # scheduler thread of its own would make a second live team, and every parallel region would then wait on
    # a futex (measured: a decode step 40% slower).
    failed: list[BaseException] = []

    def http() -> None:
        try:
            server.run(sockets=[sock])
        except BaseException as e:  # noqa: BLE001 -- said in the main thread
            failed.append(e)
        finally:
            engine.scheduler.abandon()
            # every client has its answer; a step that outlasts the grace period is not waited for: exit without
            # unwinding the main thread (which is inside torch) -- os._exit runs no C++ destructor under it
            if not engine.scheduler.finished.wait(max(engine.remaining(), 0.1)):
                print("serve: stopped (a step outlasted the grace period: not waited for)", file=sys.stderr,
                      flush=True)
                logging.shutdown()
                os._exit(0)

    engine.scheduler.running = True  # the lifespan must not start a scheduler thread: this thread runs it
    for sig in (signal.SIGTERM, signal.SIGINT):  # uvicorn installs its handlers only in the main thread
        signal.signal(sig, server.handle_exit)
    web = threading.Thread(target=http, name="ar2dlm-http", daemon=True)
    web.start()
    engine.scheduler.run()
    web.join()
    if failed and isinstance(failed[0], SystemExit) and failed[0].code:  # uvicorn could not start (it logged why)
        raise ConfigError(f"the server could not start on {cfg.host}:{cfg.port} (exit {failed[0].code}; see the "
                          f"log above)")
    if failed and not isinstance(failed[0], (SystemExit, KeyboardInterrupt)):
        raise failed[0]
    print("serve: stopped", file=sys.stderr, flush=True)
    return 0
