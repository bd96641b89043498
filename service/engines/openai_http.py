"""Client for vLLM's OpenAI-compatible server (one or several base URLs).

Routing over several servers (``service/engines/routing.py``): by default every prompt of
one question (the same ``Prompt.prefix_key``) goes to the same server, chosen by rendezvous
hashing, so that its prefix cache serves what the prompts share; ``round_robin`` spreads
the requests evenly instead. Prompts without a key (and /tokenize) go round-robin.

Chat prompts go to ``/v1/chat/completions`` with the assistant turn pre-filled
(``continue_final_message``); plain prompts to ``/v1/completions``. Letter log-probs use
vLLM's ``logprob_token_ids``; restricted choices use ``structured_outputs.choice``. Both are
vLLM extensions: another OpenAI-compatible server gets a clear error naming the feature.

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
import logging
import random
import time
from collections.abc import Sequence
from typing import Any

import httpx

from service.calibration.prompts import Prompt, letter_forms
from service.engines.base import (
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
    ) -> None:
        if not base_urls:
            raise ValueError("at least one engine URL is needed")
        self._urls = [u.rstrip("/") for u in base_urls]
        self._router = EngineRouter(self._urls, routing, load_guard)
        self._model = model
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(
            headers=headers,
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

    async def _post(self, path: str, body: dict[str, Any], key: str | None = None) -> Any:
        """POST to the server for ``key`` with retries of connection-level failures for up
        to ``retry_s``, each on the server routing names then (a failed one is marked down,
        so the next in rank); a single attempt when every server is already known to be
        down (a fast 503, no pile-up)."""
        give_up = time.monotonic() + (0.0 if self._router.all_down else self._retry_s)
        attempt = 0
        while True:
            server = self._router.choose(key)
            url = server + path
            try:
                with self._router.sending(server):
                    response = await self._client.post(url, json=body)
            except _RETRYABLE as exc:
                failure = f"engine at {url} is unreachable: {type(exc).__name__}: {exc}"
            except httpx.TimeoutException as exc:
                raise EngineUnavailable(f"engine at {url} timed out") from exc
            except httpx.TransportError as exc:
                raise EngineUnavailable(f"engine at {url} is unreachable: {exc}") from exc
            else:
                if response.status_code not in _RETRY_STATUS:
                    break
                failure = f"engine at {url} answered {response.status_code}"
            self._mark(server, up=False)
            delay = min(self._max_backoff_s, self._backoff_s * 2**attempt)
            delay *= random.uniform(0.5, 1.0)  # noqa: S311 # jitter against a thundering herd
            if time.monotonic() + delay > give_up:
                raise EngineUnavailable(failure)
            self.retries += 1
            attempt += 1
            await asyncio.sleep(delay)
        self._mark(server, up=True)
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

    async def start(self) -> None:
        if self._model is None:
            try:
                response = await self._client.get(self._urls[0] + "/v1/models")
                response.raise_for_status()
                self._model = str(response.json()["data"][0]["id"])
            except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
                raise EngineUnavailable(
                    f"cannot list the models of {self._urls[0]}: {exc}"
                ) from exc

    async def ready(self) -> bool:
        async def healthy(base: str) -> bool:
            try:
                response = await self._client.get(base + "/health", timeout=2.0)
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
            try:
                self._letter_ids.update(letter_token_ids(missing, lambda s: encoded[s]))
            except ValueError as exc:
                raise EngineError(str(exc)) from exc
        return {label: self._letter_ids[label] for label in labels}

    def _body(self, prompt: Prompt, extra: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        body: dict[str, Any] = {"model": self.model, **extra}
        if prompt.chat:
            body.update(
                messages=prompt.messages(),
                add_generation_prompt=False,
                continue_final_message=True,
            )
            return "/v1/chat/completions", body
        body["prompt"] = prompt.text
        return "/v1/completions", body

    async def read_letters(
        self, prompts: Sequence[Prompt], labels: Sequence[Sequence[str]]
    ) -> list[LetterRead]:
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

    async def generate(
        self, prompts: Sequence[Prompt], params: Sequence[GenerationParams]
    ) -> list[Generation]:
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
            try:
                choices = sorted(reply["choices"], key=lambda c: int(c.get("index", 0)))
                texts = [
                    str(c["message"]["content"] or "") if prompt.chat else str(c["text"])
                    for c in choices
                ]
            except (KeyError, TypeError, ValueError) as exc:
                raise EngineError(f"engine reply lacks choices: {exc}") from exc
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
        template flags as ``/v1/chat/completions``), and the server's ``max_model_len``."""

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
        the servers' dev endpoints (``VLLM_SERVER_DEV_MODE=1``); False where refused."""
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
        a server does not export them."""
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
