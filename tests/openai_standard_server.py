"""A tiny OpenAI-compatible server with only the standard API, as Ollama, llama.cpp's
server, TGI or a hosted API offer it: ``GET /v1/models`` and ``POST /v1/chat/completions``
(``n``, ``temperature``, ``top_p``, ``max_tokens``, ``stream`` with SSE chunks and
``data: [DONE]``, optional ``logprobs``/``top_logprobs``). Everything else is 404
(``/v1/completions``, ``/tokenize``, ``/version``, ``/health``, ``/metrics``, ...), and a
field it does not know (vLLM's ``continue_final_message``, ``add_generation_prompt``,
``structured_outputs``, ``logprob_token_ids``, ...) is a 400, as strict servers answer.

Replies are scripted and deterministic (``Script``): to a prompt ending in "Reply with one
of: X, Y, Z." it names one of those; to a request for a number ("a number between 0 and
1") it says ``number``; to a prompt with option lines ("B. Jupiter") it names a letter, the
``favourite`` option's text weighted ``weight`` times the others; else ``fallback``. Each
choice draws from ``random.Random(f"{seed}|{prompt}|{index}")`` (temperature 0: index 0), so
the same request always gets the same replies. ``echo_prefix`` makes it start every reply
with the user turn's last line when that ends in ":" ("Answer: B"), as chat models often do.

``StandardServer`` runs it in-process (uvicorn in a thread on a free port) and records
every request it got (``requests``: method, path, JSON body)."""

from __future__ import annotations

import json
import math
import random
import re
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.servers import free_port

CHAT_FIELDS = frozenset(
    {
        "model",
        "messages",
        "n",
        "temperature",
        "top_p",
        "max_tokens",
        "max_completion_tokens",
        "stream",
        "stream_options",
        "logprobs",
        "top_logprobs",
        "stop",
        "seed",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "user",
        "response_format",
    }
)
_OPTION_LINE = re.compile(r"^([A-Z])\. (.*)$", re.M)
_ONE_OF = re.compile(r"Reply with one of: (.+?)\.?$", re.M)


@dataclass
class Script:
    """How the server behaves; see the module docstring."""

    model: str = "standard-model"
    seed: int = 0
    favourite: str | None = None
    weight: float = 8.0
    number: str = "0.7"
    fallback: str = "I am not sure."
    fixed: str | None = None  # every reply is this text
    echo_prefix: bool = False
    honour_n: bool = True  # False: one choice whatever n asks (Ollama)
    logprobs: Literal["offered", "ignored", "rejected"] = "offered"
    max_top_logprobs: int = 20  # the server's cap on top_logprobs


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str
    body: Any


def _user_text(messages: list[dict[str, Any]]) -> str:
    users = [m for m in messages if m.get("role") == "user"]
    return str(users[-1].get("content", "")) if users else ""


def _letter_weights(script: Script, text: str) -> dict[str, float] | None:
    options = _OPTION_LINE.findall(text)
    if not options:
        return None
    weights = {
        label: (script.weight if option.strip() == script.favourite else 1.0)
        for label, option in options
    }
    total = sum(weights.values())
    return {label: w / total for label, w in weights.items()}


def reply_for(script: Script, messages: list[dict[str, Any]], index: int) -> str:
    """The scripted reply of choice ``index``."""
    if script.fixed is not None:
        return script.fixed
    text = _user_text(messages)
    rng = random.Random(f"{script.seed}|{text}|{index}")
    one_of = _ONE_OF.findall(text)
    if one_of:
        reply = rng.choice([c.strip() for c in one_of[-1].split(",") if c.strip()])
    elif "number between 0 and 1" in text:
        reply = script.number
    elif (weights := _letter_weights(script, text)) is not None:
        reply = rng.choices(list(weights), weights=list(weights.values()))[0]
    else:
        reply = script.fallback
    last = text.rstrip().splitlines()[-1] if text.strip() else ""
    if script.echo_prefix and last.endswith(":"):
        reply = f"{last} {reply}"
    return reply


def top_logprobs_for(script: Script, messages: list[dict[str, Any]], k: int) -> list[Any]:
    """The first token's top-k: 90% on the option letters (as weighted for the reply), each
    split 3:1 between "A" and " A", and 10% on two words."""
    weights = _letter_weights(script, _user_text(messages)) or {"A": 1.0}
    probs: dict[str, float] = {"The": 0.06, "Sure": 0.04}
    for label, p in weights.items():
        probs[label] = 0.9 * p * 0.75
        probs[f" {label}"] = 0.9 * p * 0.25
    ranked = sorted(probs.items(), key=lambda item: -item[1])[:k]
    return [{"token": t, "logprob": math.log(p), "bytes": list(t.encode())} for t, p in ranked]


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": "invalid_request_error"}}, status_code=status
    )


def make_app(script: Script, requests: list[Recorded]) -> Starlette:
    """The ASGI app; every request is appended to ``requests``."""

    async def handle(request: Request) -> Response:
        raw = await request.body()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode(errors="replace")
        path = request.url.path
        requests.append(Recorded(request.method, path, body))
        if path == "/v1/models" and request.method == "GET":
            return JSONResponse(
                {"object": "list", "data": [{"id": script.model, "object": "model"}]}
            )
        if path == "/v1/chat/completions" and request.method == "POST":
            return chat(body)
        return _error(404, f"{request.method} {path} not found")

    def chat(body: Any) -> Response:
        if not isinstance(body, dict):
            return _error(400, "the body must be a JSON object")
        unknown = sorted(set(body) - CHAT_FIELDS)
        if unknown:
            return _error(400, f"Unrecognized request argument supplied: {', '.join(unknown)}")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return _error(400, "messages must be a non-empty list")
        n = body.get("n", 1)
        if not isinstance(n, int) or not 1 <= n <= 128:
            return _error(400, "n must be an integer from 1 to 128")
        wants_logprobs = bool(body.get("logprobs"))
        if wants_logprobs and script.logprobs == "rejected":
            return _error(400, "logprobs are not supported by this server")
        k = min(int(body.get("top_logprobs") or 0), script.max_top_logprobs)
        greedy = float(body.get("temperature", 1.0)) == 0.0
        count = n if script.honour_n else 1
        texts = [reply_for(script, messages, 0 if greedy else i) for i in range(count)]
        choices: list[dict[str, Any]] = []
        for index, text in enumerate(texts):
            choice: dict[str, Any] = {
                "index": index,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
                "logprobs": None,
            }
            if wants_logprobs and script.logprobs == "offered":
                top = top_logprobs_for(script, messages, k)
                choice["logprobs"] = {
                    "content": [{"token": text, "logprob": -0.1, "top_logprobs": top}]
                }
            choices.append(choice)
        prompt_chars = sum(len(str(m.get("content", ""))) for m in messages)
        usage = {
            "prompt_tokens": max(1, prompt_chars // 4),
            "completion_tokens": sum(max(1, len(t.split())) for t in texts),
        }
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        reply = {
            "id": "chatcmpl-standard",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": script.model,
            "choices": choices,
            "usage": usage,
        }
        if body.get("stream"):
            return StreamingResponse(_sse(reply), media_type="text/event-stream")
        return JSONResponse(reply)

    return Starlette(
        routes=[Route("/{path:path}", handle, methods=["GET", "POST", "PUT", "DELETE"])]
    )


async def _sse(reply: dict[str, Any]) -> AsyncIterator[bytes]:
    """The reply as chat.completion.chunk events, one per choice, then [DONE]."""
    for choice in reply["choices"]:
        delta = {"index": choice["index"], "delta": dict(choice["message"]), "logprobs": None}
        done = {"index": choice["index"], "delta": {}, "finish_reason": "stop"}
        for part in (delta, done):
            chunk = {
                "id": reply["id"],
                "object": "chat.completion.chunk",
                "created": reply["created"],
                "model": reply["model"],
                "choices": [part],
            }
            yield f"data: {json.dumps(chunk)}\n\n".encode()
    yield b"data: [DONE]\n\n"


class StandardServer:
    """The app served by uvicorn in a daemon thread on a free port of 127.0.0.1."""

    def __init__(self, script: Script | None = None) -> None:
        self.script = script or Script()
        self.requests: list[Recorded] = []
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            make_app(self.script, self.requests),
            host="127.0.0.1",
            port=self.port,
            log_level=None,
            log_config=None,  # uvicorn's own config would rewire the test process's loggers
            access_log=False,
            lifespan="off",
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def start(self, timeout_s: float = 10.0) -> StandardServer:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the standard OpenAI test server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)

    def posted(self, path: str = "/v1/chat/completions") -> list[dict[str, Any]]:
        """The JSON bodies POSTed to ``path``, in order."""
        return [r.body for r in self.requests if r.method == "POST" and r.path == path]

    def __enter__(self) -> StandardServer:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()
