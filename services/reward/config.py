"""Configuration of the built-in Reward service."""

from __future__ import annotations

import dataclasses
from typing import Any

from protege.configs import field
from protege.errors import InvalidArgument
from protege.services.reward.scorers import parse_specs
from protege.serving import ServerOptions


@dataclasses.dataclass(frozen=True)
class RewardConfig(ServerOptions):
    """Which built-in scorers to serve, and the kit's limits."""

    port: int = field(50053, help="gRPC port; 0 picks a free one (see ready_file)")
    scorers: list[dict[str, Any]] = field(
        [{"kind": "exact_match"}],
        help="JSON list of {kind, weight, name, ...options}; kinds: exact_match, numeric, regex, "
             "length, classifier")
    name: str = field("", help="reward name reported by Info (default: the scorer names)")
    max_batch_size: int = field(1024, help="largest batch accepted; larger is INVALID_ARGUMENT")
    item_timeout_s: float = field(30.0, help="deadline per batch call of the scorers (0 = none)")
    max_concurrency: int = field(4, help="batches scored at the same time")
    device: str = field("cpu", help="device for classifier scorers: cpu, cuda or cuda:N")
    dtype: str = field("float32", help="dtype for classifier scorers: float32, bfloat16, float16")

    def __post_init__(self) -> None:
        super().__post_init__()
        parse_specs(self.scorers)  # unknown kinds/options fail here, before any model loads
        if self.max_batch_size < 1:
            raise InvalidArgument(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.item_timeout_s < 0:
            raise InvalidArgument(f"item_timeout_s must be >= 0, got {self.item_timeout_s}")
        if self.max_concurrency < 1:
            raise InvalidArgument(f"max_concurrency must be >= 1, got {self.max_concurrency}")
