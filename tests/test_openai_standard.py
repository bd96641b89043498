"""The HTTP engine against servers without vLLM's extensions (``UFCAL_ENGINE_API``).

In vllm mode the request bodies are pinned here exactly as the engine sent them before
standard-OpenAI support existed: that path must not change."""

from __future__ import annotations

import json
from typing import Any

import httpx

from service.calibration.prompts import Prompt, PromptTemplate, Question, all_options, render
from service.engines.base import GenerationParams
from service.engines.openai_http import OpenAIHTTPEngine

QUESTION = Question("Which planet is the largest?", ("Mars", "Jupiter", "Venus"))
CHAT = render(QUESTION, all_options(QUESTION), PromptTemplate())
PLAIN = render(QUESTION, all_options(QUESTION), PromptTemplate(chat=False))

# ---------------------------------------------------------------- vllm mode: bodies pinned


def _recording_vllm(seen: list[tuple[str, dict[str, Any]]]) -> Any:
    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else {}
        seen.append((request.url.path, body))
        if request.url.path == "/tokenize":
            text = body.get("prompt", "?")
            return httpx.Response(
                200, json={"tokens": [ord(text[-1])], "count": 7, "max_model_len": 4096}
            )
        logprobs = {
            "content": [
                {
                    "token": "x",
                    "logprob": -0.1,
                    "top_logprobs": [
                        {"token": f"token_id:{t}", "logprob": -1.0}
                        for t in body.get("logprob_token_ids", [])
                    ],
                }
            ]
        }
        choice: dict[str, Any] = {"index": 0, "message": {"content": "A"}, "text": "A"}
        if body.get("logprob_token_ids"):
            choice["logprobs"] = logprobs
        return httpx.Response(200, json={"choices": [choice], "usage": {"prompt_tokens": 3}})

    return handler


def _mock_engine(handler: Any, **kwargs: Any) -> OpenAIHTTPEngine:
    engine = OpenAIHTTPEngine(["http://e1"], model="m", backoff_s=0.01, **kwargs)
    engine._client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return engine


def _vllm_chat(prompt: Prompt) -> dict[str, Any]:
    return {
        "messages": prompt.messages(),
        "add_generation_prompt": False,
        "continue_final_message": True,
    }


async def _vllm_bodies(engine: OpenAIHTTPEngine, seen: list[tuple[str, dict[str, Any]]]) -> None:
    await engine.generate(
        [CHAT, PLAIN],
        [
            GenerationParams(n=3, temperature=1.0, max_tokens=4),
            GenerationParams(max_tokens=4, choices=("A", " A")),
        ],
    )
    await engine.read_letters([CHAT], [["A", "B"]])
    await engine.count_tokens([CHAT])
    gen_chat = {"model": "m", "n": 3, "temperature": 1.0, "top_p": 1.0, "max_tokens": 4}
    gen_plain = {
        "model": "m",
        "n": 1,
        "temperature": 0.0,
        "top_p": 1.0,
        "max_tokens": 4,
        "structured_outputs": {"choice": ["A", " A"]},
        "prompt": PLAIN.text,
    }
    tokenize = [
        ("/tokenize", {"model": "m", "prompt": form, "add_special_tokens": False})
        for form in ("A", " A", "B", " B")
    ]
    read = {
        "model": "m",
        "max_tokens": 1,
        "temperature": 0.0,
        "logprobs": True,
        "logprob_token_ids": sorted({ord("A"), ord("B")}),
        "return_tokens_as_token_ids": True,
        **_vllm_chat(CHAT),
    }
    expected = [
        ("/v1/chat/completions", {**gen_chat, **_vllm_chat(CHAT)}),
        ("/v1/completions", gen_plain),
        *tokenize,
        ("/v1/chat/completions", read),
        ("/tokenize", {"model": "m", **_vllm_chat(CHAT)}),
    ]
    assert sorted(seen[:2], key=lambda s: s[0]) == expected[:2]
    assert seen[2:] == expected[2:]
    for (_, sent), (_, wanted) in zip(sorted(seen[:2]), expected[:2], strict=True):
        assert list(sent) == list(wanted)  # the same keys in the same order
    for (_, sent), (_, wanted) in zip(seen[2:], expected[2:], strict=True):
        assert list(sent) == list(wanted)


async def test_vllm_request_bodies_are_unchanged() -> None:
    seen: list[tuple[str, dict[str, Any]]] = []
    engine = _mock_engine(_recording_vllm(seen))
    await _vllm_bodies(engine, seen)
    await engine.close()
