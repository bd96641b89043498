"""Engine adapters behind one async protocol (``base.Engine``)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from service.config import Settings
from service.engines.base import Engine


async def build_engine(settings: Settings) -> Engine:
    """The engine the settings select: remote OpenAI-compatible servers (vLLM's, or
    standard ones per ``UFCAL_ENGINE_API``) when ``UFCAL_ENGINE_URL`` is set, else
    in-process vLLM on ``UFCAL_MODEL`` (default: the embedded model, converted on first
    use). The engine is not started."""
    if settings.engine_urls:
        from service.engines.openai_http import OpenAIHTTPEngine

        return OpenAIHTTPEngine(
            settings.engine_urls,
            model=settings.served_model,
            api_key=(
                settings.engine_api_key.get_secret_value() if settings.engine_api_key else None
            ),
            timeout_s=settings.engine_timeout_s,
            retry_s=settings.engine_retry_s,
            routing=settings.engine_routing,
            load_guard=settings.engine_load_guard,
            api=settings.engine_api,
        )
    from service.engines.embedded import EMBEDDED_MODEL_ID, prepare_embedded_model
    from service.engines.vllm_local import LocalEngineConfig, LocalVLLMEngine

    if settings.model:
        model_path = settings.model
        name = settings.served_model or Path(settings.model.rstrip("/")).name
    else:
        model_path = str(await asyncio.to_thread(prepare_embedded_model, settings.model_cache))
        name = settings.served_model or EMBEDDED_MODEL_ID
    return LocalVLLMEngine(
        LocalEngineConfig(
            model_path=model_path,
            model_name=name,
            dtype=settings.vllm_dtype,
            max_model_len=settings.vllm_max_model_len,
            block_size=settings.vllm_block_size,
            enforce_eager=settings.vllm_enforce_eager,
            gpu_memory_utilization=settings.vllm_gpu_memory_utilization,
            cpu_kvcache_space_gib=settings.vllm_cpu_kvcache_space_gib,
            cpu_threads_bind=settings.cpu_threads_bind(),
            tensor_parallel_size=settings.vllm_tensor_parallel_size,
            max_options=settings.max_options,
        )
    )
