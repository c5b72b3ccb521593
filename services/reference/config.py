"""Configuration of the Reference service (teacher forward passes)."""

from __future__ import annotations

import dataclasses

from protege.configs import field
from protege.errors import InvalidArgument
from protege.serving import ServerOptions


@dataclasses.dataclass(frozen=True)
class ReferenceConfig(ServerOptions):
    """The teacher model, where it runs, and how large its batches and streamed chunks may be."""

    port: int = field(50052, help="gRPC port; 0 picks a free one (see ready_file)")
    model: str = field("", help="teacher checkpoint directory (a save_pretrained output)")
    device: str = field("cpu", help="cpu, cuda or cuda:N")
    dtype: str = field("float32", help="parameter dtype: float32, bfloat16 or float16")
    max_batch_positions: int = field(
        16384, help="most padded token positions in one forward pass (bounds activation memory)")
    chunk_positions: int = field(
        256, help="default positions per streamed chunk; always capped to fit max_message_mb")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.model:
            raise InvalidArgument(
                "model is required: pass --model PATH (a save_pretrained directory)")
        if self.max_batch_positions < 1:
            raise InvalidArgument(
                f"max_batch_positions must be >= 1, got {self.max_batch_positions}")
        if self.chunk_positions < 1:
            raise InvalidArgument(f"chunk_positions must be >= 1, got {self.chunk_positions}")
