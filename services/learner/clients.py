"""The clients a job uses to reach the other services, built with the learner's credentials.

The learner talks to generators, the reference and the reward service only through their
clients of the `protege.v1` contracts. `Clients` builds them, and it is the one place where the
learner's credentials meet a target: a client is made only for a target on the learner's
allow-list (`targets.py`), and it carries the token of its own kind of service, so that the
generators' `weights` token never reaches the reward service or a host a job chose. Tests
substitute a subclass that wraps the clients.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from protege.reward import RewardClient
from protege.services.generator.client import GeneratorClient
from protege.services.learner.config import LearnerConfig
from protege.services.learner.targets import TargetAllowList
from protege.services.reference.client import ReferenceClient
from protege.serving import read_token_file


class Clients:
    """Builds the clients a job uses: only for allowed targets, each with its service's token.

    A service's token is read from `token_files[role]` if given, else from `token_file`, else it
    is `token` (the shared client token of local runs). Files are re-read for every client, so a
    rotated Secret is picked up by the next job or weight push.
    """

    def __init__(self, token: str | None = None, tls: Any = None, *,
                 token_file: str | None = None, token_files: Mapping[str, str] | None = None,
                 allowed: TargetAllowList | None = None):
        self.token, self.tls, self.token_file = token, tls, token_file
        self.token_files = dict(token_files or {})
        self.allowed = allowed or TargetAllowList()

    @classmethod
    def from_config(cls, config: LearnerConfig) -> Clients:
        return cls(config.client_token, config.client_tls(), token_file=config.client_token_file,
                   token_files=config.client_token_files(), allowed=config.target_allow_list())

    def token_for(self, role: str) -> str | None:
        """The bearer token sent to `role`'s targets ('generator', 'reference' or 'reward')."""
        path = self.token_files.get(role) or self.token_file
        return read_token_file(path, f"{role} token file") if path else self.token

    def check_target(self, role: str, target: str) -> None:
        """Raise InvalidJobSpec unless `target` is on the allow-list."""
        self.allowed.check(role, target)

    def generator(self, targets: Sequence[str]) -> GeneratorClient:
        for target in targets:
            self.check_target("generator", target)
        return GeneratorClient(list(targets), token=self.token_for("generator"), tls=self.tls)

    def reference(self, target: str) -> ReferenceClient:
        self.check_target("reference", target)
        return ReferenceClient(target, token=self.token_for("reference"), tls=self.tls)

    def reward(self, target: str) -> RewardClient:
        self.check_target("reward", target)
        return RewardClient(target, token=self.token_for("reward"), tls=self.tls)
