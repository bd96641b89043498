"""Client for OpenAI-compatible servers, vLLM's first (one or several base URLs).

Routing over several servers (``service/engines/routing.py``): by default every prompt of
one question (the same ``Prompt.prefix_key``) goes to the same server, chosen by rendezvous
hashing, so that its prefix cache serves what the prompts share; ``round_robin`` spreads
the requests evenly instead. Prompts without a key (and /tokenize) go round-robin.

Chat prompts go to ``/v1/chat/completions`` with the assistant turn pre-filled
(``continue_final_message``); plain prompts to ``/v1/completions``. Letter log-probs use
vLLM's ``logprob_token_ids``; restricted choices use ``structured_outputs.choice``. Both are
vLLM extensions.

``api`` (``UFCAL_ENGINE_API``) says whether the servers have them: ``vllm`` uses them,
``openai`` sends only standard OpenAI fields and degrades (docs/engines.md: per feature what
is lost), ``auto`` asks the first server's ``GET /version`` once at start (vLLM answers
``{"version": ...}``; a standard server has no such endpoint). Until ``start`` has probed,
``auto`` behaves as ``vllm``. In standard mode the pre-fill is folded into the user turn,
restricted choices are listed in it and matched in the reply, missing ``n`` samples are
asked for one by one, letter log-probs come from ``top_logprobs`` when the server offers
them (probed at start), and token counting is off (no ``/tokenize``).

Faults: every call is a pure read (idempotent), so a connection error, a dropped connection
or a 502/503/504 is retried with exponential backoff, on the next healthy server when there
are several (the next in the key's rank under affinity), for up to ``retry_s`` seconds;
then ``EngineUnavailable`` (HTTP 503). A server that failed is marked down and skipped
until a probe (``ready``) or a call succeeds again, so the service recovers by itself when
the server comes back. While every server is down, a call makes one attempt and fails
fast instead of waiting out the retry budget. Cancelling a call (the request deadline)
closes its HTTP connection, which makes vLLM's server abort the request."""

from __future__ import annotations

import asyncio
import http.cookiejar
import logging
import math
import random
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, Literal

import httpx

from service.calibration.prompts import Prompt, letter_forms
from service.engines.base import (
    ChatForward,
    ChatReply,
    EngineError,
    EngineFeatureMissing,
    EngineRejected,
    EngineUnavailable,
    Generation,
    GenerationParams,
    LetterRead,
    TokenCounts,
)
from service.engines.letters import combine_letter_logprobs, letter_token_ids
from service.engines.routing import EngineRouter, Routing

EngineAPI = Literal["auto", "vllm", "openai"]

log = logging.getLogger(__name__)
# httpx logs every request at INFO: with health probes every few seconds that is noise.
logging.getLogger("httpx").setLevel(logging.WARNING)

_TOKEN_ID_PREFIX = "token_id:"  # noqa: S105 # a reply format marker, not a password
_RETRY_STATUS = frozenset({502, 503, 504})
# vLLM answers these when the request itself is refused (VLLMClientError: a prompt over the
# context, a value out of range): the client's question is the cause, not the engine.
_REJECTED_STATUS = frozenset({400, 413, 422})
#: Idle connections are dropped before uvicorn's own 5 s keep-alive timeout closes them.
KEEPALIVE_EXPIRY_S = 2.0
# Connection-level failures: the server is gone, restarting or dropped the connection.
_RETRYABLE = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.RemoteProtocolError,
    httpx.ReadError,
    httpx.WriteError,
    httpx.PoolTimeout,
)
#: Standard mode: the top log-probs asked for at a letter read (OpenAI's maximum in chat
#: completions; the legacy completions API allows 5).
STANDARD_TOP_LOGPROBS = 20
STANDARD_COMPLETION_LOGPROBS = 5
#: Standard mode: the probability given to an option letter whose token forms are all
#: missing from the top log-probs when nothing is left to share (the read's floor).
ABSENT_LETTER_FLOOR = 1e-12
STANDARD_LOGPROBS_FEATURE = "letter log-probabilities (top_logprobs in chat completions)"


class OpenAIHTTPEngine:
    """Sends prompts to the given vLLM servers, a question's prompts to one server
    (``routing="affinity"``) or each request to the next server (``"round_robin"``)."""

    retry_start = True  # the service keeps trying to start while the server is away

    def __init__(
        self,
        base_urls: Sequence[str],
        *,
        model: str | None = None,
        api_key: str | None = None,
        timeout_s: float = 120.0,
        max_connections: int = 256,
        retry_s: float = 5.0,
        backoff_s: float = 0.1,
        max_backoff_s: float = 1.0,
        routing: Routing = "affinity",
        load_guard: float = 0.0,
        api: EngineAPI = "auto",
    ) -> None:
        if not base_urls:
            raise ValueError("at least one engine URL is needed")
        if api not in ("auto", "vllm", "openai"):
            raise ValueError(f"unknown engine API {api!r}; use auto, vllm or openai")
        self._api_setting: EngineAPI = api
        # Until start() has probed, auto behaves as vllm (the engine's behaviour before
        # standard servers were supported).
        self._api: Literal["vllm", "openai"] = "openai" if api == "openai" else "vllm"
        self._urls = [u.rstrip("/") for u in base_urls]
        self._router = EngineRouter(self._urls, routing, load_guard)
        self._model = model
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(
            headers=headers,
            cookies=NoCookies(),
            timeout=httpx.Timeout(timeout_s, connect=5.0),
            limits=httpx.Limits(
                max_connections=max_connections,
                max_keepalive_connections=max_connections,
                # vLLM's uvicorn closes a connection idle for 5 s; reusing one that old
                # races with that close (RemoteProtocolError) and marked the server down.
                keepalive_expiry=KEEPALIVE_EXPIRY_S,
            ),
        )
        self._letter_ids: dict[str, list[int]] = {}
        self._letter_logprobs_ok: bool | None = None
        self._retry_s = retry_s
        self._backoff_s = backoff_s
        self._max_backoff_s = max_backoff_s
        self.retries = 0  # connection-level retries so far (for tests and logs)

    @property
    def model(self) -> str:
        return self._model or "unknown"

    @property
    def supports_letter_logprobs(self) -> bool:
        return self._letter_logprobs_ok is not False

    @property
    def api(self) -> Literal["vllm", "openai"]:
        """The API spoken: ``vllm`` (with its extensions) or ``openai`` (standard only)."""
        return self._api

    @property
    def down(self) -> list[str]:
        """The servers marked down now."""
        return self._router.down

    @property
    def routing(self) -> Routing:
        return self._router.routing

    def _mark(self, base: str, up: bool) -> None:
        if self._router.mark(base, up):
            if up:
                log.info("engine back up", extra={"fields": {"engine": base}})
            else:
                log.warning("engine down", extra={"fields": {"engine": base}})

    async def _send(
        self,
        path: str,
        key: str | None,
        send: Callable[[str], Awaitable[httpx.Response]],
    ) -> tuple[str, httpx.Response]:
        """``send(url)`` to the server for ``key`` with retries of connection-level failures
        and 502/503/504 answers for up to ``retry_s``, each on the server routing names
        then (a failed one is marked down, so the next in rank); a single attempt when
        every server is already known to be down (a fast 503, no pile-up). The URL and
        the first answer that is not retried (a streamed one still open)."""
        give_up = time.monotonic() + (0.0 if self._router.all_down else self._retry_s)
        attempt = 0
        while True:
            server = self._router.choose(key)
            url = server + path
            try:
                with self._router.sending(server):
                    response = await send(url)
            except _RETRYABLE as exc:
                failure = f"engine at {url} is unreachable: {type(exc).__name__}: {exc}"
            except httpx.TimeoutException as exc:
                raise EngineUnavailable(f"engine at {url} timed out") from exc
            except httpx.TransportError as exc:
                raise EngineUnavailable(f"engine at {url} is unreachable: {exc}") from exc
            else:
                if response.status_code not in _RETRY_STATUS:
                    self._mark(server, up=True)
                    return url, response
                await response.aclose()
                failure = f"engine at {url} answered {response.status_code}"
            self._mark(server, up=False)
            delay = min(self._max_backoff_s, self._backoff_s * 2**attempt)
            delay *= random.uniform(0.5, 1.0)  # noqa: S311 # jitter against a thundering herd
            if time.monotonic() + delay > give_up:
                raise EngineUnavailable(failure)
            self.retries += 1
            attempt += 1
            await asyncio.sleep(delay)

    async def _post(self, path: str, body: dict[str, Any], key: str | None = None) -> Any:
        """POST ``body`` as JSON (``_send``: retries, failover) and read the JSON reply;
        an error status becomes the matching ``EngineError``."""
        url, response = await self._send(path, key, lambda url: self._client.post(url, json=body))
        if response.status_code >= 500:
            raise EngineUnavailable(f"engine at {url} answered {response.status_code}")
        if response.status_code == 404:
            raise EngineFeatureMissing(f"the endpoint {path}")
        if response.status_code in _REJECTED_STATUS:
            raise EngineRejected(
                f"the engine refused the request ({response.status_code}): "
                f"{_error_message(response)}"
            )
        if response.status_code >= 400:
            raise EngineError(
                f"engine at {url} refused the request ({response.status_code}): "
                f"{_error_message(response)}"
            )
        try:
            return response.json()
        except ValueError as exc:
            raise EngineError(f"engine at {url} sent a reply that is not JSON") from exc

    # -- chat completions (POST /v1/chat/completions through ufcal) ----------------------

    async def chat_completion(self, request: ChatForward) -> ChatReply:
        """The client's body forwarded unchanged to ``/v1/chat/completions`` of the server
        for its key, the reply returned unchanged (an error status too: it is the server's
        answer to the client's request); a server that fails is ``EngineUnavailable``."""
        url, response = await self._send(
            "/v1/chat/completions",
            request.key,
            lambda url: self._client.post(url, content=request.raw, headers=_JSON),
        )
        if response.status_code >= 500:
            raise EngineUnavailable(f"engine at {url} answered {response.status_code}")
        return ChatReply(
            response.status_code,
            response.content,
            response.headers.get("content-type", "application/json"),
        )

    async def chat_completion_stream(self, request: ChatForward) -> UpstreamStream:
        """As ``chat_completion`` with the reply's body left open: its bytes are read as
        the server sends them."""

        async def send(url: str) -> httpx.Response:
            built = self._client.build_request("POST", url, content=request.raw, headers=_JSON)
            return await self._client.send(built, stream=True)

        url, response = await self._send("/v1/chat/completions", request.key, send)
        if response.status_code >= 500:
            await response.aclose()
            raise EngineUnavailable(f"engine at {url} answered {response.status_code}")
        return UpstreamStream(response, url)

    async def list_models(self) -> ChatReply:
        """The first healthy server's ``GET /v1/models``, unchanged."""
        url, response = await self._send("/v1/models", None, self._client.get)
        if response.status_code >= 500:
            raise EngineUnavailable(f"engine at {url} answered {response.status_code}")
        return ChatReply(
            response.status_code,
            response.content,
            response.headers.get("content-type", "application/json"),
        )

    async def start(self) -> None:
        if self._api_setting == "auto":
            self._api = await self._probe_api()
        if self._model is None:
            try:
                response = await self._client.get(self._urls[0] + "/v1/models")
                response.raise_for_status()
                self._model = str(response.json()["data"][0]["id"])
            except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
                raise EngineUnavailable(
                    f"cannot list the models of {self._urls[0]}: {exc}"
                ) from exc
        if self._api == "openai":
            self._letter_logprobs_ok = await self._probe_top_logprobs()
        log.info(
            "engine API",
            extra={
                "fields": {
                    "api": self._api,
                    "setting": self._api_setting,
                    "letter_logprobs": self.supports_letter_logprobs,
                }
            },
        )

    async def _probe_api(self) -> Literal["vllm", "openai"]:
        """vLLM serves ``GET /version`` as ``{"version": "..."}``; a standard OpenAI server
        does not (404, or something else). Asked once, of the first server: every URL is
        taken to run the same kind of server."""
        url = self._urls[0] + "/version"
        try:
            response = await self._client.get(url, timeout=5.0)
        except httpx.HTTPError as exc:
            raise EngineUnavailable(f"engine at {url} is unreachable: {exc}") from exc
        if response.status_code in _RETRY_STATUS:
            raise EngineUnavailable(f"engine at {url} answered {response.status_code}")
        if response.status_code == 200:
            try:
                body = response.json()
            except ValueError:
                body = None
            if isinstance(body, dict) and isinstance(body.get("version"), str):
                return "vllm"
        return "openai"

    async def _probe_top_logprobs(self) -> bool:
        """Standard mode: does the server give the top log-probs of a generated token? One
        one-token request; a refusal or a reply without them means no."""
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": "Reply with the letter A."}],
            "max_tokens": 1,
            "temperature": 0.0,
            "logprobs": True,
            "top_logprobs": STANDARD_TOP_LOGPROBS,
        }
        try:
            reply = await self._post("/v1/chat/completions", body)
        except EngineRejected:
            return False
        return bool(_standard_top_logprobs(reply, chat=True))

    async def ready(self) -> bool:
        # A standard server need not serve /health (Ollama, hosted APIs): its model list is
        # the one endpoint every OpenAI-compatible server has.
        probe = "/health" if self._api == "vllm" else "/v1/models"

        async def healthy(base: str) -> bool:
            try:
                response = await self._client.get(base + probe, timeout=2.0)
            except httpx.HTTPError:
                self._mark(base, up=False)
                return False
            self._mark(base, up=response.status_code == 200)
            return response.status_code == 200

        results = await asyncio.gather(*(healthy(u) for u in self._urls))
        return any(results)

    async def _ids_for(self, labels: Sequence[str]) -> dict[str, list[int]]:
        missing = [label for label in labels if label not in self._letter_ids]
        if missing:
            encoded: dict[str, list[int]] = {}
            for label in missing:
                for form in letter_forms(label):
                    try:
                        body = await self._post(
                            "/tokenize",
                            {"model": self.model, "prompt": form, "add_special_tokens": False},
                        )
                    except EngineFeatureMissing as exc:
                        self._letter_logprobs_ok = False
                        raise EngineFeatureMissing(
                            "letter log-probabilities (vLLM's /tokenize and logprob_token_ids)"
                        ) from exc
                    encoded[form] = [int(t) for t in body["tokens"]]
            self._letter_ids.update(letter_token_ids(missing, lambda s: encoded[s]))
        return {label: self._letter_ids[label] for label in labels}

    def _body(
        self, prompt: Prompt, extra: dict[str, Any], choices: Sequence[str] | None = None
    ) -> tuple[str, dict[str, Any]]:
        body: dict[str, Any] = {"model": self.model, **extra}
        if prompt.chat:
            if self._api == "vllm":
                body.update(
                    messages=prompt.messages(),
                    add_generation_prompt=False,
                    continue_final_message=True,
                )
            else:
                body["messages"] = standard_messages(prompt, choices)
            return "/v1/chat/completions", body
        if self._api == "openai" and choices:
            body["prompt"] = f"{prompt.user}{_choices_line(choices)}\n{prompt.answer_prefix}"
        else:
            body["prompt"] = prompt.text
        return "/v1/completions", body

    async def _post_standard(self, path: str, body: dict[str, Any], key: str | None) -> Any:
        """``_post`` in standard mode, naming what a missing endpoint costs."""
        try:
            return await self._post(path, body, key)
        except EngineFeatureMissing as exc:
            if path != "/v1/completions":
                raise
            raise EngineFeatureMissing(
                "plain-text prompts (/v1/completions)", hint="set UFCAL_PROMPT_CHAT=true"
            ) from exc

    async def read_letters(
        self, prompts: Sequence[Prompt], labels: Sequence[Sequence[str]]
    ) -> list[LetterRead]:
        if self._api == "openai":
            return await self._read_letters_standard(prompts, labels)

        async def one(prompt: Prompt, wanted: Sequence[str]) -> LetterRead:
            table = await self._ids_for(wanted)
            ids = sorted({t for forms in table.values() for t in forms})
            path, body = self._body(
                prompt,
                {
                    "max_tokens": 1,
                    "temperature": 0.0,
                    "logprobs": True if prompt.chat else 1,
                    "logprob_token_ids": ids,
                    "return_tokens_as_token_ids": True,
                },
            )
            reply = await self._post(path, body, prompt.prefix_key)
            token_logprobs = _read_token_logprobs(reply, chat=prompt.chat)
            try:
                combined = combine_letter_logprobs(table, token_logprobs, wanted)
            except KeyError as exc:
                self._letter_logprobs_ok = False
                raise EngineFeatureMissing("logprob_token_ids (vLLM >= 0.11)") from exc
            self._letter_logprobs_ok = True
            usage = reply.get("usage") or {}
            return LetterRead(
                combined, int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 1))
            )

        return list(
            await asyncio.gather(*(one(p, w) for p, w in zip(prompts, labels, strict=True)))
        )

    async def _read_letters_standard(
        self, prompts: Sequence[Prompt], labels: Sequence[Sequence[str]]
    ) -> list[LetterRead]:
        """The letters' log-probs from the standard top log-probs of the reply's first
        token (``letters_from_top_logprobs``)."""
        if self._letter_logprobs_ok is False:
            raise EngineFeatureMissing(STANDARD_LOGPROBS_FEATURE)

        async def one(prompt: Prompt, wanted: Sequence[str]) -> LetterRead:
            extra: dict[str, Any] = {"max_tokens": 1, "temperature": 0.0}
            if prompt.chat:
                extra.update(logprobs=True, top_logprobs=STANDARD_TOP_LOGPROBS)
            else:
                extra["logprobs"] = STANDARD_COMPLETION_LOGPROBS
            path, body = self._body(prompt, extra)
            reply = await self._post_standard(path, body, prompt.prefix_key)
            top = _standard_top_logprobs(reply, chat=prompt.chat)
            if not top:
                self._letter_logprobs_ok = False
                raise EngineFeatureMissing(STANDARD_LOGPROBS_FEATURE)
            self._letter_logprobs_ok = True
            usage = reply.get("usage") or {}
            return LetterRead(
                letters_from_top_logprobs(top, wanted),
                int(usage.get("prompt_tokens", 0)),
                int(usage.get("completion_tokens", 1)),
            )

        return list(
            await asyncio.gather(*(one(p, w) for p, w in zip(prompts, labels, strict=True)))
        )

    async def _generate_standard(self, prompt: Prompt, p: GenerationParams) -> Generation:
        """One prompt's ``n`` completions with standard fields only: the choices are listed
        in the user turn and matched in the replies (``match_choice``; an unmatched reply
        is ``""``, which the scorer counts as unparsed); a server that returns fewer than
        ``n`` (Ollama ignores ``n``) is asked for the rest one request each."""

        async def ask(n: int) -> tuple[list[str], int, int]:
            extra: dict[str, Any] = {
                "n": n,
                "temperature": p.temperature,
                "top_p": p.top_p,
                "max_tokens": p.max_tokens,
            }
            path, body = self._body(prompt, extra, p.choices)
            reply = await self._post_standard(path, body, prompt.prefix_key)
            texts = _reply_texts(reply, chat=prompt.chat)
            usage = reply.get("usage") or {}
            return (
                texts,
                int(usage.get("prompt_tokens", 0)),
                int(usage.get("completion_tokens", 0)),
            )

        texts, prompt_tokens, completion_tokens = await ask(p.n)
        missing = p.n - len(texts)
        if missing > 0:
            for more, more_prompt, more_completion in await asyncio.gather(
                *(ask(1) for _ in range(missing))
            ):
                texts += more
                prompt_tokens += more_prompt
                completion_tokens += more_completion
            if len(texts) < p.n:
                raise EngineError(f"the engine returned {len(texts)} of {p.n} completions")
        texts = texts[: p.n]
        if prompt.chat:
            texts = [strip_echoed_prefix(t, prompt.answer_prefix) for t in texts]
        if p.choices:
            texts = [match_choice(t, p.choices) or "" for t in texts]
        return Generation(texts, prompt_tokens, completion_tokens)

    async def generate(
        self, prompts: Sequence[Prompt], params: Sequence[GenerationParams]
    ) -> list[Generation]:
        if self._api == "openai":
            return list(
                await asyncio.gather(
                    *(self._generate_standard(p, q) for p, q in zip(prompts, params, strict=True))
                )
            )

        async def one(prompt: Prompt, p: GenerationParams) -> Generation:
            extra: dict[str, Any] = {
                "n": p.n,
                "temperature": p.temperature,
                "top_p": p.top_p,
                "max_tokens": p.max_tokens,
            }
            if p.choices:
                extra["structured_outputs"] = {"choice": list(p.choices)}
            path, body = self._body(prompt, extra)
            reply = await self._post(path, body, prompt.prefix_key)
            texts = _reply_texts(reply, chat=prompt.chat)
            if p.choices and any(t not in p.choices for t in texts):
                raise EngineFeatureMissing(
                    "structured_outputs.choice (vLLM's structured outputs)",
                    hint="use a vLLM server",
                )
            usage = reply.get("usage") or {}
            return Generation(
                texts, int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))
            )

        return list(
            await asyncio.gather(*(one(p, q) for p, q in zip(prompts, params, strict=True)))
        )

    async def count_tokens(self, prompts: Sequence[Prompt]) -> TokenCounts:
        """vLLM's ``/tokenize`` over each prompt as it is sent (chat: the same messages and
        template flags as ``/v1/chat/completions``), and the server's ``max_model_len``.
        Standard mode: ``EngineFeatureMissing`` without asking (no standard endpoint counts
        tokens or gives the context length), so the context-fit check is off."""
        if self._api == "openai":
            raise EngineFeatureMissing(
                "token counts (vLLM's /tokenize)", hint="the server's own refusal applies"
            )

        async def one(prompt: Prompt) -> tuple[int, int]:
            body: dict[str, Any] = {"model": self.model}
            if prompt.chat:
                body.update(
                    messages=prompt.messages(),
                    add_generation_prompt=False,
                    continue_final_message=True,
                )
            else:
                body["prompt"] = prompt.text
            reply = await self._post("/tokenize", body)
            try:
                return int(reply["count"]), int(reply["max_model_len"])
            except (KeyError, TypeError, ValueError) as exc:
                raise EngineFeatureMissing("token counts (vLLM's /tokenize)") from exc

        results = await asyncio.gather(*(one(p) for p in prompts))
        if not results:
            return TokenCounts([], 0)
        return TokenCounts([c for c, _ in results], min(limit for _, limit in results))

    async def reset_prefix_cache(self) -> bool:
        """Empty every server's prefix cache (benchmarks: each variant starts cold). Needs
        the servers' dev endpoints (``VLLM_SERVER_DEV_MODE=1``); False where refused, and
        always on a standard server (there is no such endpoint)."""
        if self._api == "openai":
            return False
        ok = True
        for base in self._urls:
            try:
                response = await self._client.post(base + "/reset_prefix_cache", timeout=30.0)
            except httpx.HTTPError:
                return False
            ok = ok and response.status_code == 200
        return ok

    async def prompt_token_counters(self) -> dict[str, float] | None:
        """vLLM's running totals of prompt tokens by where they came from, summed over the
        servers: ``computed`` (prefilled) and ``cached`` (served by the prefix cache). For
        benchmarks; None when a server does not export them."""
        by_server = await self.server_counters()
        if by_server is None:
            return None
        return {
            name: sum(counters[name] for counters in by_server.values())
            for name in ("computed", "cached")
        }

    async def server_counters(self) -> dict[str, dict[str, float]] | None:
        """Each server's own running totals from its /metrics: ``computed`` and ``cached``
        prompt tokens and ``requests`` finished. For benchmarks and routing tests; None when
        a server does not export them (always on a standard server)."""
        if self._api == "openai":
            return None
        from prometheus_client.parser import text_string_to_metric_families

        sources = {"local_compute": "computed", "local_cache_hit": "cached"}
        out: dict[str, dict[str, float]] = {}
        for base in self._urls:
            try:
                response = await self._client.get(base + "/metrics", timeout=30.0)
            except httpx.HTTPError:
                return None
            if response.status_code != 200:
                return None
            totals = {"computed": 0.0, "cached": 0.0, "requests": 0.0}
            found = False
            for family in text_string_to_metric_families(response.text):
                for sample in family.samples:
                    if not sample.name.endswith("_total"):
                        continue
                    if family.name == "vllm:prompt_tokens_by_source":
                        key = sources.get(sample.labels.get("source", ""))
                        if key:
                            totals[key] += sample.value
                            found = True
                    elif family.name == "vllm:request_success":
                        totals["requests"] += sample.value
            if not found:
                return None
            out[base] = totals
        return out

    async def close(self) -> None:
        await self._client.aclose()


_JSON = {"content-type": "application/json"}


class NoCookies(http.cookiejar.CookieJar):
    """A cookie jar that keeps none: the engines' APIs are stateless, and reading every
    reply's cookies was a tenth of the chat pass-through's time in the profile."""

    def extract_cookies(self, response: Any, request: Any) -> None:
        return None

    def add_cookie_header(self, request: Any) -> None:
        return None


class UpstreamStream:
    """A server's streamed reply (a ``ChatStream``): its bytes as they arrive, decoded
    from any content encoding but otherwise untouched."""

    def __init__(self, response: httpx.Response, url: str) -> None:
        self._response = response
        self._url = url
        self.status = response.status_code
        self.media_type = response.headers.get("content-type", "text/event-stream")

    async def _chunks(self) -> AsyncIterator[bytes]:
        try:
            async for part in self._response.aiter_bytes():
                yield part
        except httpx.HTTPError as exc:
            raise EngineUnavailable(
                f"engine at {self._url} broke off the stream: {type(exc).__name__}"
            ) from exc
        finally:
            await self._response.aclose()

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def aclose(self) -> None:
        await self._response.aclose()


def _reply_texts(reply: Any, *, chat: bool) -> list[str]:
    """The completions' texts, in the order of their index."""
    try:
        choices = sorted(reply["choices"], key=lambda c: int(c.get("index", 0)))
        return [str(c["message"]["content"] or "") if chat else str(c["text"]) for c in choices]
    except (KeyError, TypeError, ValueError) as exc:
        raise EngineError(f"engine reply lacks choices: {exc}") from exc


def standard_messages(prompt: Prompt, choices: Sequence[str] | None = None) -> list[dict[str, str]]:
    """A chat prompt for a server that cannot continue a pre-filled assistant turn: the
    choices (when restricted) are listed and the pre-fill becomes the user turn's last line,
    as in the plain-text form; the reply then starts a fresh assistant turn. The format is
    asked for, not forced."""
    user = prompt.user + _choices_line(choices)
    if prompt.answer_prefix:
        user += f"\n{prompt.answer_prefix}"
    msgs: list[dict[str, str]] = []
    if prompt.system_prompt:
        msgs.append({"role": "system", "content": prompt.system_prompt})
    msgs.append({"role": "user", "content": user})
    return msgs


def _choices_line(choices: Sequence[str] | None) -> str:
    """Standard mode: the line that lists the allowed replies (none when unrestricted)."""
    listed = list(dict.fromkeys(c.strip() for c in choices or () if c.strip()))
    return f"\nReply with one of: {', '.join(listed)}." if listed else ""


def strip_echoed_prefix(reply: str, answer_prefix: str) -> str:
    """A reply that repeats the pre-fill ("Answer: B") without it (" B"), as a continuation
    of the pre-filled turn would read."""
    stripped = reply.lstrip()
    prefix = answer_prefix.strip()
    if prefix and stripped[: len(prefix)].lower() == prefix.lower():
        return stripped[len(prefix) :]
    return reply


def match_choice(reply: str, choices: Sequence[str]) -> str | None:
    """The choice a free reply names: the one found first in the reply as a whole word
    (case-insensitive; a one-character choice such as a letter must match its case, so that
    "a" or "I" in a sentence is not read as an option), the longer one at the same place.
    Returned as given in ``choices`` (its first spelling when several strip alike); None
    when the reply names none."""
    best: tuple[int, int, str] | None = None
    for choice in choices:
        wanted = choice.strip()
        if not wanted:
            continue
        flags = 0 if len(wanted) == 1 else re.IGNORECASE
        found = re.search(rf"(?<!\w){re.escape(wanted)}(?!\w)", reply, flags)
        if found is None:
            continue
        key = (found.start(), -len(wanted), choice)
        if best is None or key[:2] < best[:2]:
            best = key
    return None if best is None else best[2]


def _standard_top_logprobs(reply: Any, *, chat: bool) -> dict[str, float]:
    """The first generated token's top log-probs by token text (empty when the reply has
    none: the server does not offer them)."""
    try:
        logprobs = reply["choices"][0]["logprobs"]
        if chat:
            entries = logprobs["content"][0]["top_logprobs"]
            pairs = [(str(e["token"]), float(e["logprob"])) for e in entries]
        else:
            pairs = [(str(t), float(v)) for t, v in logprobs["top_logprobs"][0].items()]
    except (KeyError, IndexError, TypeError, ValueError, AttributeError):
        return {}
    top: dict[str, float] = {}
    for token, logprob in pairs:
        if token not in top or logprob > top[token]:
            top[token] = logprob
    return top


def letters_from_top_logprobs(top: Mapping[str, float], labels: Sequence[str]) -> dict[str, float]:
    """Each label's log-probability from the top-k of one token: its forms ("A", " A")
    found there summed; a label with no form there gets what the top-k leaves, shared
    evenly among such labels but never more than the least likely token shown (it was not
    shown, so it is no likelier), and ``ABSENT_LETTER_FLOOR`` when nothing is left."""
    found: dict[str, float] = {}
    absent: list[str] = []
    for label in labels:
        values = [top[form] for form in letter_forms(label) if form in top]
        if values:
            peak = max(values)
            found[label] = peak + math.log(sum(math.exp(v - peak) for v in values))
        else:
            absent.append(label)
    if absent:
        shown = [math.exp(v) for v in top.values()]
        rest = max(0.0, 1.0 - sum(shown))
        share = min(min(shown, default=1.0), rest / len(absent))
        value = math.log(max(share, ABSENT_LETTER_FLOOR))
        found.update(dict.fromkeys(absent, value))
    return {label: found[label] for label in labels}


def _read_token_logprobs(reply: Any, *, chat: bool) -> dict[int, float]:
    """The first generated position's logprobs, keyed by token id."""
    try:
        logprobs = reply["choices"][0]["logprobs"]
        if chat:
            entries = logprobs["content"][0]["top_logprobs"]
            pairs = [(e["token"], e["logprob"]) for e in entries]
        else:
            pairs = list(logprobs["top_logprobs"][0].items())
    except (KeyError, IndexError, TypeError) as exc:
        raise EngineFeatureMissing("logprob_token_ids (vLLM >= 0.11)") from exc
    result: dict[int, float] = {}
    for token, logprob in pairs:
        if isinstance(token, str) and token.startswith(_TOKEN_ID_PREFIX):
            result[int(token[len(_TOKEN_ID_PREFIX) :])] = float(logprob)
    return result


def _error_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200]
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict):
            return str(error.get("message", error))[:200]
        return str(error)[:200]
    return str(body)[:200]
