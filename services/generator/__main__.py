"""Generator service: samples rollouts with the current student weights and hot-swaps new ones.

    python -m protege.services.generator --model .protege/up/student --port 50051
    python -m protege.services.generator --model .protege/up/student --host 127.0.0.1 --port 0 \
        --metrics-port 0 --ready-file /tmp/generator.json --device cpu --dtype float32
    python -m protege.services.generator --model /models/student --backend vllm --dtype bfloat16 \
        --gpu-memory-utilization 0.85 --max-model-len 4096
    python -m protege.services.generator --model /models/student --backend vllm --dtype bfloat16 \
        --max-lora-rank 64 --max-loras 2   # serves the adapters of LoRA jobs

`--help` lists every flag; `--config FILE.yaml` takes the same fields.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Sequence

import torch
from protege.configs import parse_config
from protege.services.generator.config import GeneratorConfig
from protege.services.generator.engine import Engine, HFEngine
from protege.services.generator.servicer import SERVICE_NAME, register
from protege.serving import configure_logging, serve_until_signal, server_options, start_server

logger = logging.getLogger(__name__)


def build_engine(config: GeneratorConfig) -> Engine:
    """The configured backend, loaded and ready to sample."""
    if config.backend == "vllm":
        from protege.services.generator.vllm_engine import VLLMEngine

        return VLLMEngine(
            config.model, dtype=config.dtype, max_batch_prompts=config.max_batch_prompts,
            seed=config.seed, gpu_memory_utilization=config.gpu_memory_utilization,
            max_model_len=config.max_model_len, enforce_eager=config.enforce_eager,
            cpu_kvcache_gb=config.vllm_cpu_kvcache_gb, max_lora_rank=config.max_lora_rank,
            max_loras=config.max_loras)
    return HFEngine(config.model, device=config.device, dtype=config.dtype,
                    max_batch_prompts=config.max_batch_prompts)


async def serve(config: GeneratorConfig, engine: Engine) -> None:
    async def release() -> None:
        await asyncio.to_thread(engine.close)

    running = await start_server("generator", server_options(config),
                                 register(engine, config.max_new_tokens_limit, config.max_n,
                                          config.max_request_rows, config.weights_dir or None),
                                 [SERVICE_NAME], on_stop=release)
    await serve_until_signal(running, config.grace_s)


def main(argv: Sequence[str] | None = None) -> None:
    config = parse_config(GeneratorConfig, argv, __doc__.splitlines()[0])
    configure_logging(config.log_level, config.log_format)
    if config.seed:
        random.seed(config.seed)
        torch.manual_seed(config.seed)
    engine = build_engine(config)
    asyncio.run(serve(config, engine))


if __name__ == "__main__":
    main()
