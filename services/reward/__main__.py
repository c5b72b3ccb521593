"""Reward service: the built-in scorers (exact match, regex, length, classifier) via the reward kit.

    python -m protege.services.reward --scorers '[{"kind": "exact_match"}]' --port 50053

A weighted sum: `--scorers '[{"kind": "numeric", "weight": 1}, {"kind": "length", "target": 200,
"coef": 0.001, "weight": 0.5}]'`. Every ServerOptions flag works too; `--help` lists them all.
"""

from __future__ import annotations

import asyncio
import logging

from protege import reward
from protege.configs import parse_config
from protege.services.reward.config import RewardConfig
from protege.services.reward.scorers import WeightedSum, build_scorer
from protege.serving import configure_logging, serve_until_signal, server_options

logger = logging.getLogger(__name__)


async def serve(config: RewardConfig, scorer: WeightedSum) -> None:
    """Serve `scorer` through the kit until SIGTERM/SIGINT."""
    running = await reward.start(
        scorer.score_batch, batched=True, name=config.name or scorer.name,
        description=scorer.description, max_concurrency=config.max_concurrency,
        item_timeout_s=config.item_timeout_s, max_batch_size=config.max_batch_size,
        options=server_options(config))
    await serve_until_signal(running, config.grace_s)


def main(argv: list[str] | None = None) -> None:
    config = parse_config(RewardConfig, argv, "Protégé built-in reward service.")
    configure_logging(config.log_level, config.log_format)
    scorer = build_scorer(config.scorers, device=config.device, dtype=config.dtype)
    logger.info("reward %s: %s", scorer.name, scorer.description)
    asyncio.run(serve(config, scorer))


if __name__ == "__main__":
    main()
