"""Pushing the student's weights to the generators, as a numbered policy version.

Every generator target must end up serving the pushed version; a reply that says otherwise fails
the step (another learner may be pushing to the same generators). Weights travel in the dtype the
generators serve when they all agree on one, else in the training dtype.
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

    def __init__(self, generator: Any, clients: Clients, targets: Sequence[str], chunk_bytes: int):
        self.generator = generator  # the job's GeneratorClient over every target
        self.clients = clients
        self.targets = list(targets)
        self.chunk_bytes = chunk_bytes
        self.dtype: torch.dtype | None = None  # the generators' serving dtype, once known

    async def served_version(self) -> int:
        """Highest policy version any generator target serves now; also picks the dtype weights
        travel in (the generators' parameter dtype when they all agree, else the training dtype)."""
        infos = []
        for target in self.targets:
            client = self.clients.generator([target])
            try:
                infos.append(await client.info())
            finally:
                await client.close()
        dtypes = {info.dtype for info in infos}
        if len(dtypes) == 1 and next(iter(dtypes)) in DTYPES:
            self.dtype = DTYPES[next(iter(dtypes))]
        return max((int(info.policy_version) for info in infos), default=0)

    async def push(self, model: torch.nn.Module, version: int) -> None:
        """Send the model's weights to every generator as policy `version`."""
        state = await asyncio.to_thread(weights_for_generators, model, self.dtype)
        replies = await self.generator.load_weights(state, version, chunk_bytes=self.chunk_bytes)
        for reply in replies:
            if int(reply.policy_version) != version:
                raise errors.FailedPrecondition(
                    f"a generator serves policy version {reply.policy_version} after the push of "
                    f"version {version}")
