"""The clients a job uses to reach the other services, built with the learner's credentials.

The learner talks to generators, the reference and the reward service only through their
clients of the `protege.v1` contracts; `Clients` builds them with the learner's outgoing bearer
token and TLS settings (tests substitute a subclass that wraps them).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from protege.reward import RewardClient
from protege.services.generator.client import GeneratorClient
from protege.services.reference.client import ReferenceClient


class Clients:
    """Builds the clients a job uses, with the learner's outgoing token and TLS settings."""

    def __init__(self, token: str | None = None, tls: Any = None):
        self.token, self.tls = token, tls

    def generator(self, targets: Sequence[str]) -> GeneratorClient:
        return GeneratorClient(list(targets), token=self.token, tls=self.tls)

    def reference(self, target: str) -> ReferenceClient:
        return ReferenceClient(target, token=self.token, tls=self.tls)

    def reward(self, target: str) -> RewardClient:
        return RewardClient(target, token=self.token, tls=self.tls)
