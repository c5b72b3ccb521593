"""Learner service: owns training jobs, runs the hybrid objective, pushes weights, checkpoints.

    python -m protege.services.learner --db-path .protege/learner/jobs.sqlite \\
        --checkpoint-root .protege/learner/checkpoints --device cpu --port 50051

Under torchrun (`python -m torch.distributed.run --nproc-per-node N -m protege.services.learner
...`, or `protege up --learner-procs N`) rank 0 is this learner and the other ranks follow it
(distributed.py): they hold shards of the student and open no port.

Every ServerOptions flag works too (`--host 127.0.0.1 --port 0 --metrics-port 0 --ready-file F`);
`--help` lists them all. On start, jobs left RUNNING by an earlier learner resume from their
latest checkpoint. On SIGTERM the learner stops accepting calls, lets running jobs finish their
current step and checkpoint (within `grace_s`), and exits; those jobs stay RUNNING and resume on
the next start.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging

from protege.configs import parse_config
from protege.services.learner.config import LearnerConfig
from protege.services.learner.jobs import JobManager
from protege.services.learner.servicer import SERVICE_NAME, JobsServicer
from protege.serving import (
    RunningServer,
    configure_logging,
    serve_until_signal,
    server_options,
    start_server,
)

logger = logging.getLogger(__name__)


async def start(config: LearnerConfig) -> tuple[RunningServer, JobManager]:
    """Start the Jobs server and the job manager (which resumes unfinished jobs)."""
    manager = JobManager(config)

    async def release() -> None:
        await manager.shutdown(config.grace_s)

    running = await start_server("learner", server_options(config),
                                 JobsServicer(manager).register, [SERVICE_NAME], on_stop=release)
    await manager.start()
    return running, manager


async def serve(config: LearnerConfig) -> None:
    """Serve until SIGTERM/SIGINT; then refuse new calls, stop jobs at a step boundary, exit."""
    running, manager = await start(config)
    # shutdown() finishes running steps, checkpoints, and ends watch streams so the stop is quick.
    await serve_until_signal(running, config.grace_s,
                             before_stop=lambda: manager.shutdown(config.grace_s))
    manager.store.close()


def main(argv: list[str] | None = None) -> None:
    config = parse_config(LearnerConfig, argv, "Protégé learner (Jobs service).")
    configure_logging(config.log_level, config.log_format)
    if config.torch_threads:
        import torch

        torch.set_num_threads(config.torch_threads)
    from protege.services.learner import distributed

    world = distributed.init_world(config.device, config.world_timeout_s)
    if world is None:
        asyncio.run(serve(config))
        return
    try:
        if not world.leader:
            from protege.services.learner.follower import follow

            follow(world, config)
            return
        if config.max_concurrent_jobs != 1:  # followers hold one job's student at a time
            logger.warning("a learner world trains one job at a time; max_concurrent_jobs %d "
                           "is taken as 1", config.max_concurrent_jobs)
            config = dataclasses.replace(config, max_concurrent_jobs=1)
        try:
            asyncio.run(serve(config))
        finally:
            world.command("shutdown")
    finally:
        distributed.close_world()


if __name__ == "__main__":
    main()
