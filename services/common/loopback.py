"""The services in-process on 127.0.0.1, for tests, benchmarks and tools.

`Background` runs an asyncio loop in a daemon thread, so that servers keep answering while the
caller drives its own loop (a learner in `asyncio.run`, a blocking SDK client). The `start_*`
coroutines start a real gRPC server for each service on a loopback port, with the same servicers
the service processes run; `protege up` and the launcher start real processes instead.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from protege.serving import RunningServer, ServerOptions, start_server

logger = logging.getLogger(__name__)


def loopback_options(port: int = 0, **overrides: Any) -> ServerOptions:
    """ServerOptions on 127.0.0.1 (`port` 0 picks a free one), no metrics port, a short grace."""
    return ServerOptions(**{"host": "127.0.0.1", "port": port, "metrics_port": -1,
                            "grace_s": 1.0, **overrides})


async def start_generator(model: str | Path, options: ServerOptions | None = None,
                          max_new_tokens: int = 256) -> RunningServer:
    """A generator serving `model` with the transformers engine."""
    from protege.services.generator.engine import HFEngine
    from protege.services.generator.servicer import SERVICE_NAME, register

    engine = await asyncio.to_thread(HFEngine, str(model))
    return await start_server("generator", options or loopback_options(),
                              register(engine, max_new_tokens), [SERVICE_NAME])


async def start_reference(model: str | Path,
                          options: ServerOptions | None = None) -> RunningServer:
    """A reference (teacher) serving `model`."""
    from protege.services.reference.engine import ReferenceEngine
    from protege.services.reference.servicer import SERVICE_NAME, ReferenceServicer

    engine = await asyncio.to_thread(ReferenceEngine.load, str(model))
    servicer = ReferenceServicer(engine, 256, 64 << 20)
    return await start_server("reference", options or loopback_options(), servicer.register,
                              [SERVICE_NAME])


async def start_reward(score: Callable[[Any], float], name: str,
                       options: ServerOptions | None = None) -> RunningServer:
    """A reward service scoring with the plain function `score` (the reward kit)."""
    from protege import reward

    return await reward.start(score, name=name, options=options or loopback_options())


class Background:
    """An asyncio loop in a daemon thread that hosts servers; `run` waits for a coroutine on it."""

    def __init__(self, name: str = "loopback-servers") -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name=name)
        self.thread.start()
        self.servers: list[RunningServer] = []

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 180.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self, coro: Coroutine[Any, Any, RunningServer]) -> RunningServer:
        """Start a server (a `start_*` coroutine) and keep it for `close`."""
        server = self.run(coro)
        self.servers.append(server)
        return server

    def stop(self, servers: list[RunningServer]) -> None:
        """Stop these servers now (a failure to stop is logged, not raised)."""
        for server in servers:
            try:
                self.run(server.stop(0.5))
            except Exception:  # noqa: BLE001 - one server must not keep the others up
                logger.exception("stopping the server at %s", server.address)
            if server in self.servers:
                self.servers.remove(server)

    def close(self) -> None:
        """Stop every kept server, then the loop."""
        self.stop(list(reversed(self.servers)))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
