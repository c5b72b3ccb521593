"""A follower rank of the learner's world (distributed.py): runs the leader's commands on its
own shard of the job's student until the leader shuts down. It serves nothing and talks to no
service; everything it needs (the job, its share of each step, the teacher's head) comes over
the world's control group."""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Any

from protege.services.learner import distributed
from protege.services.learner.config import LearnerConfig
from protege.services.learner.trainer import Trainer

logger = logging.getLogger(__name__)


def follow(world: distributed.World, config: LearnerConfig) -> None:
    """Run commands until `shutdown`. A command that fails here is logged; the leader's side of
    the same collective then fails or times out (`world_timeout_s`), which fails the world, and
    torchrun restarts it so the job resumes from its last checkpoint."""
    # torchrun passes SIGTERM to every rank; a follower leaves on the leader's `shutdown`, after
    # the leader has drained (finished its step, checkpointed: collectives this rank is part of).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    trainer: Trainer | None = None
    while True:
        name, payload = world.receive()
        if name == "shutdown":
            return
        try:
            trainer = _run(world, config, trainer, name, payload)
        except Exception:
            logger.exception("rank %d: command %r failed", world.rank, name)


def _run(world: distributed.World, config: LearnerConfig, trainer: Trainer | None, name: str,
         payload: Any) -> Trainer | None:
    if name == "setup":
        job_id, spec, job_dir, ckpt = payload
        trainer = Trainer.replica(job_id, spec, job_dir, config)
        trainer._load_student(ckpt)
        return trainer
    if name == "close":
        if trainer is not None and trainer.writing is not None:
            trainer.writing.result()  # the job's last background checkpoint write
        return None
    if trainer is None:
        raise RuntimeError(f"command {name!r} arrived before any job's setup")
    if name == "teacher_head":
        weight, bias = payload
        trainer.lm_head = (weight.to(world.device),
                           None if bias is None else bias.to(world.device))
    elif name == "update":
        trainer.update_share(world.scatter(None), {})
    elif name == "eval":
        trainer.eval_kl(*payload)
    elif name == "gather":
        trainer._gather()
    elif name == "checkpoint":
        path, background = payload
        if trainer.writing is not None:  # the previous one has finished on the leader too
            trainer.writing.result()
        trainer.writing = distributed.save_shards(Path(path), trainer.root, trainer.optimizer,
                                                  world, background)
    else:
        raise RuntimeError(f"unknown command {name!r} (a leader of another Protégé version?)")
    return trainer
