"""`ar2dlm serve`: load the model, run the app under uvicorn, drain on SIGTERM and exit 0.

FastAPI and uvicorn are the `serve` extra: they are imported when the verb runs, so the rest of the CLI
works without them.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import threading

from ..core.errors import ConfigError
from ..core.flags import config_from
from ..core.hardware import describe
from ..model.lm import DiffusionLM
from ..model.settings import LoadConfig
from .config import ServeConfig


def _server(config, engine):
    """uvicorn's server that also tells the engine to stop admitting when a signal asks it to stop, and says
    where it listens (with --port 0 the system chose)."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            engine.stop_admission()
            super().handle_exit(sig, frame)

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started:
                host, port = self.servers[0].sockets[0].getsockname()[:2]
                print(f"ar2dlm serve: listening on http://{host}:{port}", file=sys.stderr, flush=True)

    return Server(config)


def cmd_serve(args) -> int:
    """an OpenAI-compatible HTTP server (completions, chat) with continuous batching

    Serve MODEL on /v1/completions and /v1/chat/completions (streamed or not), /v1/models, /health and /metrics.
    One scheduler decodes every request in one running batch that requests join and leave between steps; greedy
    output equals decoding each request alone. SIGTERM stops admission, lets in-flight requests finish within
    --grace seconds, and exits 0. Binds 127.0.0.1 unless --host says otherwise."""
    cfg = config_from(args, ServeConfig)  # settings fail before the model loads
    try:
        import uvicorn

        from .app import create_app
        from .client import EngineClient
    except ImportError as e:
        raise ConfigError(f"ar2dlm serve needs the serve extra ({e.name} is missing): pip install 'ar2dlm[serve]'") \
            from None
    if cfg.api_key is None and os.environ.get("AR2DLM_API_KEY"):
        cfg = dataclasses.replace(cfg, api_key=os.environ["AR2DLM_API_KEY"])
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
    # refused early, so a client still sending gets its 413)
    server = _server(uvicorn.Config(create_app(engine, cfg, name), host=cfg.host, port=cfg.port, http="h11",
                                    log_level="info", access_log=False, timeout_graceful_shutdown=cfg.grace,
                                    lifespan="on"), engine)
    # The model runs in this (the main) thread and the HTTP server in a thread of its own: torch's OpenMP keeps
    # a team of worker threads per thread that runs parallel work, and loading already made this thread's; a
    # scheduler thread of its own would make a second live team, and every parallel region would then wait on
    # a futex (measured: a decode step 40% slower).
    failed: list[BaseException] = []

    def http() -> None:
        try:
            server.run()
        except BaseException as e:  # noqa: BLE001 -- said in the main thread
            failed.append(e)
        finally:
            engine.scheduler.abandon()

    engine.scheduler.running = True  # the lifespan must not start a scheduler thread: this thread runs it
    for sig in (signal.SIGTERM, signal.SIGINT):  # uvicorn installs its handlers only in the main thread
        signal.signal(sig, server.handle_exit)
    web = threading.Thread(target=http, name="ar2dlm-http", daemon=True)
    web.start()
    engine.scheduler.run()
    web.join()
    if failed and isinstance(failed[0], SystemExit) and failed[0].code:  # uvicorn could not start (it logged why)
        raise ConfigError(f"could not serve on {cfg.host}:{cfg.port} (exit {failed[0].code}; see the log above): "
                          f"is the port in use?", field="port")
    if failed and not isinstance(failed[0], (SystemExit, KeyboardInterrupt)):
        raise failed[0]
    print("serve: stopped", file=sys.stderr, flush=True)
    return 0
