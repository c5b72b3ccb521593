"""Reference service: the teacher's next-token distributions as FULL, TOPK or HIDDEN.

    python -m protege.services.reference --model PATH --device cpu --dtype float32 --port 50052

Every ServerOptions flag works too (`--host 127.0.0.1 --port 0 --metrics-port 0 --ready-file F`);
`--help` lists them all.
"""

from __future__ import annotations

import asyncio
import logging

from protege.configs import parse_config
from protege.services.reference.config import ReferenceConfig
from protege.services.reference.engine import ReferenceEngine
from protege.services.reference.servicer import SERVICE_NAME, ReferenceServicer
from protege.serving import configure_logging, serve_until_signal, server_options, start_server

logger = logging.getLogger(__name__)


async def serve(config: ReferenceConfig, engine: ReferenceEngine) -> None:
    """Serve `engine` until SIGTERM/SIGINT, then drain and release it."""
    servicer = ReferenceServicer(engine, config.chunk_positions, config.max_message_mb << 20)

    async def release() -> None:
        await asyncio.to_thread(engine.close)

    running = await start_server("reference", server_options(config), servicer.register,
                                 [SERVICE_NAME], on_stop=release)
    await serve_until_signal(running, config.grace_s)


def main(argv: list[str] | None = None) -> None:
    config = parse_config(ReferenceConfig, argv, "Protégé reference (teacher) service.")
    configure_logging(config.log_level, config.log_format)
    engine = ReferenceEngine.load(config.model, config.device, config.dtype,
                                  config.max_batch_positions)
    asyncio.run(serve(config, engine))


if __name__ == "__main__":
    main()
