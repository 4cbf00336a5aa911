"""Running the app: the listening socket bound before the model loads, and a shutdown that ends every
request well when its time runs out."""

from __future__ import annotations

import asyncio
import socket

import uvicorn
from fastapi import FastAPI

from kvloom.async_engine import AsyncEngine
from kvloom.logger import init_logger

logger = init_logger(__name__)

# NOTE: uvicorn's own deadline comes this long after ours; by then every request has been ended by
# AsyncEngine.fail_all, so its cancellation of the connections is only a last resort.
_UVICORN_GRACE_S = 10.0


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind ``host:port`` now, so that a port in use is reported before the model loads (seconds to
    minutes), not after. Raises ValueError naming ``--port``."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise ValueError(f"--host: cannot resolve {host!r}: {e.strerror}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart reuses a port in TIME_WAIT
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise ValueError(f"--port: cannot listen on {host}:{port}: {e.strerror}") from None
    sock.set_inheritable(True)
    return sock


class _Server(uvicorn.Server):
    """uvicorn's server, whose graceful shutdown ends the requests still running at the deadline through
    the engine: each client then gets a well-formed end (an SSE error event and ``[DONE]``, or a JSON 503)
    instead of a cut connection, and no handler is cancelled."""

    def __init__(self, config: uvicorn.Config, engine: AsyncEngine, drain_timeout: float) -> None:
        super().__init__(config)
        self.engine, self.drain_timeout = engine, drain_timeout

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.call_later(self.drain_timeout, self._time_up)
        try:
            await super().shutdown(sockets)
        finally:
            deadline.cancel()

    def _time_up(self) -> None:
        logger.warning(
            "Shutdown timeout (%.1fs) reached: ending the requests still in flight", self.drain_timeout
        )
        self.engine.fail_all()


def serve_app(
    app: FastAPI, sock: socket.socket, engine: AsyncEngine, shutdown_timeout: float, log_level: str
) -> int:
    """Serve ``app`` on the bound ``sock`` until SIGTERM/SIGINT, or until the engine stops for good
    (``AsyncEngine.fatal``); requests in flight get ``shutdown_timeout`` seconds to finish. Returns the
    exit status: 0, or 1 after a fatal engine error."""
    config = uvicorn.Config(
        app, log_level=log_level, timeout_graceful_shutdown=shutdown_timeout + _UVICORN_GRACE_S
    )
    server = _Server(config, engine, shutdown_timeout)

    def stop(_: BaseException) -> None:
        server.should_exit = True  # uvicorn's main loop reads it every 0.1 s

    engine.on_fatal = stop
    if engine.fatal is not None:
        return 1
    server.run(sockets=[sock])
    return 0 if engine.fatal is None else 1
