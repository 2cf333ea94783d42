"""Serving the API with uvicorn, with graceful shutdown on SIGTERM/SIGINT (``conveyor api``).

Start-up opens the store (refusing an out-of-date schema with one line telling to run
``conveyor migrate``, exit 1) and the queue factory, then serves on ``API_HOST:API_PORT``.
A signal stops accepting connections, lets in-flight requests finish within
``SHUTDOWN_GRACE_MS``, closes the pools and exits 0. Redis being down does not stop the API
from starting: it answers ``/api/health`` and reports not-ready until Redis is back. Tracing
(:mod:`conveyor.tracing`, ``OTEL_*``) is configured before start-up and flushed on exit.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator

import uvicorn

from conveyor import tracing
from conveyor.api.app import create_app
from conveyor.api.context import open_context
from conveyor.errors import ConfigError, ConveyorError
from conveyor.runtime import Supervisor, freeze_startup_heap, run_loop
from conveyor.settings import Settings

log = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the process runtime's :class:`Supervisor`
    handles signals (uvicorn would re-raise the captured SIGTERM after shutting down: exit -15
    instead of 0)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def uvicorn_config(app: object, settings: Settings) -> uvicorn.Config:
    return uvicorn.Config(
        app,  # type: ignore[arg-type]
        host=settings.api_host,
        port=settings.api_port,
        lifespan="on",
        log_config=None,
        access_log=False,
        server_header=False,
        timeout_graceful_shutdown=max(1, round(settings.shutdown_grace_s)),
        backlog=4096,
    )


async def _stop_on(supervisor: Supervisor, server: uvicorn.Server) -> None:
    """When the process is asked to stop: stop accepting, drain in-flight requests (bounded by
    uvicorn's graceful-shutdown timeout), then let :func:`serve` return."""
    await supervisor.wait()
    server.should_exit = True


async def serve(settings: Settings) -> int:
    """Run the API until a signal; the process exit code."""
    supervisor = Supervisor("api")
    supervisor.install_signal_handlers()
    tracing.configure("api")
    try:
        async with open_context(settings) as ctx:
            server = _Server(uvicorn_config(create_app(settings, context=ctx), settings))
            freeze_startup_heap()
            supervisor.spawn("stop", _stop_on(supervisor, server))
            try:
                await server.serve()
            except SystemExit as exc:  # uvicorn exits on bind errors
                log.error("api.serve_failed", extra={"exit": exc.code})
                return 1
            finally:
                await supervisor.cancel_all()
            if not server.started:
                return 1
    except ConfigError as exc:  # SECRETS_KEY cannot decrypt the stored secrets
        print(f"conveyor api: {exc.message}", file=sys.stderr, flush=True)
        return 2
    except ConveyorError as exc:
        log.error("api.startup_failed: %s", exc.message, extra={"error": type(exc).__name__})
        return 1
    finally:
        supervisor.remove_signal_handlers()
        tracing.shutdown()  # bounded: the spans still buffered, then the exporter
    log.info("api.stopped")
    return 0


def main(settings: Settings) -> int:
    """Serve until a signal; the process exit code."""
    return run_loop(serve(settings))
