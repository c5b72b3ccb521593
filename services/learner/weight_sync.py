"""Pushing the student's weights to the generators, as a numbered policy version.

Every generator target must end up serving the pushed version; a reply that says otherwise fails
the step (another learner may be pushing to the same generators). Weights travel in the dtype the
generators serve when they all agree on one, else in the training dtype. Pushes and Info calls go
through the job's generator `Dependency`, so a generator that restarts mid-push is retried
through the outage, and `restore` gives a generator that came back at version 0 the weights the
learner serves now.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import torch
from protege import errors
from protege.services.common.models import DTYPES
from protege.services.learner.clients import Clients
from protege.services.learner.outages import Dependency

logger = logging.getLogger(__name__)


def weights_for_generators(model: torch.nn.Module,
                           dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """A CPU copy of the model's state dict, floating tensors cast to `dtype` (when given)."""
    out = {}
    for name, t in model.state_dict().items():
        cast = dtype if t.is_floating_point() and dtype else t.dtype
        out[name] = t.detach().to("cpu", dtype=cast, copy=True)
    return out


class WeightSync:
    """Pushes a job's student to its generators and reads the version they serve."""

    def __init__(self, generator: Any, clients: Clients, targets: Sequence[str], chunk_bytes: int,
                 dependency: Dependency):
        self.generator = generator  # the job's GeneratorClient over every target
        self.clients = clients
        self.targets = list(targets)
        self.chunk_bytes = chunk_bytes
        self.dependency = dependency
        self.dtype: torch.dtype | None = None  # the generators' serving dtype, once known

    async def served_versions(self) -> dict[str, int]:
        """The policy version each generator target serves now; also picks the dtype weights
        travel in (the generators' parameter dtype when they all agree, else the training dtype)."""
        infos = await self.dependency.call(self._infos, self.dependency.policy.floor_s)
        dtypes = {info.dtype for info in infos.values()}
        if len(dtypes) == 1 and next(iter(dtypes)) in DTYPES:
            self.dtype = DTYPES[next(iter(dtypes))]
        return {t: int(info.policy_version) for t, info in infos.items()}

    async def served_version(self) -> int:
        """Highest policy version any generator target serves now."""
        return max((await self.served_versions()).values(), default=0)

    async def push(self, model: torch.nn.Module, version: int) -> None:
        """Send the model's weights to every generator as policy `version`."""
        state = await asyncio.to_thread(weights_for_generators, model, self.dtype)
        deadline = self._deadline(state)

        async def send() -> None:
            replies = await self.generator.load_weights(state, version,
                                                        chunk_bytes=self.chunk_bytes)
            self._check(replies, version)

        await self.dependency.call(send, deadline)

    async def restore(self, model: torch.nn.Module, version: int) -> None:
        """Push `version` to every target that serves an older one (a generator that restarted
        and came back at version 0). Only call it while no update is changing the model."""
        infos = await self._infos()  # no retry of its own: it runs inside a retried attempt
        behind = [t for t, info in infos.items() if int(info.policy_version) < version]
        if not behind:
            return
        state = await asyncio.to_thread(weights_for_generators, model, self.dtype)
        for target in behind:
            logger.warning("generator %s lost its weights; pushing policy version %d again",
                           target, version)
            client = self.clients.generator([target])
            try:
                self._check(await client.load_weights(state, version,
                                                      chunk_bytes=self.chunk_bytes), version)
            finally:
                await client.close()

    async def _infos(self) -> dict[str, Any]:
        """Each target's GeneratorInfo, asked of that target alone."""
        out = {}
        for target in self.targets:
            client = self.clients.generator([target])
            try:
                out[target] = await client.info()
            finally:
                await client.close()
        return out

    def _deadline(self, state: dict[str, torch.Tensor]) -> float:
        nbytes = sum(t.numel() * t.element_size() for t in state.values())
        return self.dependency.policy.push_deadline(nbytes)

    @staticmethod
    def _check(replies: Sequence[Any], version: int) -> None:
        for reply in replies:
            if int(reply.policy_version) != version:
                raise errors.FailedPrecondition(
                    f"a generator serves policy version {reply.policy_version} after the push of "
                    f"version {version}")
