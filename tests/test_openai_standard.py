"""The HTTP engine against servers without vLLM's extensions (``UFCAL_ENGINE_API``).

In vllm mode the request bodies are pinned here exactly as the engine sent them before
standard-OpenAI support existed: that path must not change."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from service.calibration.baselines import LINGUISTIC_PHRASES
from service.calibration.prompts import Prompt, PromptTemplate, Question, all_options, render
from service.config import Settings
from service.engines import build_engine
from service.engines.base import EngineFeatureMissing, EngineRejected, GenerationParams
from service.engines.openai_http import (
    ABSENT_LETTER_FLOOR,
    OpenAIHTTPEngine,
    letters_from_top_logprobs,
    match_choice,
    strip_echoed_prefix,
)
from service.scoring import ScoreParams, score
from tests.openai_standard_server import CHAT_FIELDS, Script, StandardServer

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


def _vllm_like(seen: list[tuple[str, dict[str, Any]]]) -> Any:
    """The recording handler, plus vLLM's GET /version and /v1/models."""
    post = _recording_vllm(seen)

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            if request.url.path == "/version":
                return httpx.Response(200, json={"version": "0.32.0"})
            return httpx.Response(200, json={"data": [{"id": "m"}]})
        return post(request)

    return handler


@pytest.mark.parametrize("api", ["vllm", "auto"])
async def test_vllm_bodies_are_unchanged_after_start(api: str) -> None:
    """``vllm`` as set, and ``auto`` once the start-up probe found vLLM's /version."""
    seen: list[tuple[str, dict[str, Any]]] = []
    engine = _mock_engine(_vllm_like(seen), api=api)
    await engine.start()
    assert engine.api == "vllm"
    assert engine.supports_letter_logprobs
    assert seen == []  # the probe is a GET; no request body was sent
    await _vllm_bodies(engine, seen)
    await engine.close()


# ---------------------------------------------------------------- the standard test server


@pytest.fixture
def standard() -> Iterator[Callable[..., StandardServer]]:
    """Starts standard-OpenAI test servers with a given ``Script``; stops them after."""
    started: list[StandardServer] = []

    def make(**script: Any) -> StandardServer:
        server = StandardServer(Script(**script)).start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


async def _started(server: StandardServer, api: str = "auto") -> OpenAIHTTPEngine:
    engine = OpenAIHTTPEngine([server.base_url], api=api, retry_s=0.2)  # type: ignore[arg-type]
    await engine.start()
    return engine


def test_the_server_speaks_only_the_standard_api(
    standard: Callable[..., StandardServer],
) -> None:
    server = standard(favourite="Jupiter")
    url = server.base_url
    messages = CHAT.messages()[:-1]
    with httpx.Client(base_url=url) as client:
        assert client.get("/v1/models").json()["data"][0]["id"] == "standard-model"
        for path in ("/v1/completions", "/tokenize", "/reset_prefix_cache"):
            assert client.post(path, json={"model": "m"}).status_code == 404
        for path in ("/version", "/health", "/metrics"):
            assert client.get(path).status_code == 404
        for extra in (
            {"continue_final_message": True},
            {"add_generation_prompt": False},
            {"structured_outputs": {"choice": ["A"]}},
            {"logprob_token_ids": [1]},
        ):
            refused = client.post(
                "/v1/chat/completions", json={"model": "m", "messages": messages, **extra}
            )
            assert refused.status_code == 400
            assert next(iter(extra)) in refused.json()["error"]["message"]
        body = {"model": "m", "messages": messages, "n": 3, "temperature": 1.0}
        plain = client.post("/v1/chat/completions", json=body).json()
        again = client.post("/v1/chat/completions", json=body).json()
        texts = [c["message"]["content"] for c in plain["choices"]]
        assert texts == [c["message"]["content"] for c in again["choices"]]  # deterministic
        assert set(texts) <= {"A", "B", "C"}
        with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        streamed = [c["choices"][0]["delta"].get("content") for c in chunks]
        assert [t for t in streamed if t] == texts
        read = client.post(
            "/v1/chat/completions",
            json={**body, "n": 1, "logprobs": True, "top_logprobs": 2},
        ).json()
        top = read["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
        assert [e["token"] for e in top] == ["B", " B"]


async def test_auto_finds_a_standard_server_and_its_top_logprobs(
    standard: Callable[..., StandardServer],
) -> None:
    server = standard()
    engine = await _started(server)
    assert engine.api == "openai"
    assert engine.model == "standard-model"
    assert engine.supports_letter_logprobs
    assert [(r.method, r.path) for r in server.requests] == [
        ("GET", "/version"),
        ("GET", "/v1/models"),
        ("POST", "/v1/chat/completions"),  # the top_logprobs probe
    ]
    assert await engine.ready()  # over /v1/models: there is no /health
    await engine.close()


async def test_standard_bodies_carry_no_vllm_field_and_fold_the_prefill(
    standard: Callable[..., StandardServer],
) -> None:
    server = standard(fixed="B")
    engine = await _started(server)
    out = await engine.generate([CHAT], [GenerationParams(max_tokens=4, choices=("A", " A"))])
    assert out[0].texts == [""]  # "B" is not among the choices: unparsed
    body = server.posted()[-1]
    assert set(body) <= CHAT_FIELDS
    assert [m["role"] for m in body["messages"]] == ["user"]  # no pre-filled assistant turn
    assert body["messages"][0]["content"] == f"{CHAT.user}\nReply with one of: A.\nAnswer:"
    await engine.close()


async def test_vllm_mode_against_a_standard_server_is_refused_naming_the_field(
    standard: Callable[..., StandardServer],
) -> None:
    engine = await _started(standard(), api="vllm")
    with pytest.raises(EngineRejected, match="continue_final_message"):
        await engine.generate([CHAT], [GenerationParams()])
    with pytest.raises(EngineFeatureMissing, match="/tokenize"):
        await engine.read_letters([CHAT], [["A", "B"]])
    assert not await engine.ready()  # no /health
    await engine.close()


@pytest.mark.parametrize("echo", [False, True], ids=["letter", "echoes-prefix"])
async def test_sampling_mode_end_to_end(
    standard: Callable[..., StandardServer], echo: bool
) -> None:
    server = standard(favourite="Jupiter", echo_prefix=echo)
    engine = await _started(server)
    params = ScoreParams(method="uf", mode="sampling", samples=10)
    result = await score(QUESTION, engine, params, PromptTemplate())
    assert result.mode == "sampling"
    assert result.answer == 1  # Jupiter, the server's favourite
    assert 0.0 <= result.confidence <= 1.0
    assert result.chains  # the chain steps' choices parsed without structured outputs
    assert result.usage.unparsed == 0
    assert len(result.samples) == 10
    bodies = server.posted()[1:]  # after the start-up probe
    assert all(set(b) <= CHAT_FIELDS for b in bodies)
    assert bodies[0]["n"] == 10
    assert any("Reply with one of: " in b["messages"][-1]["content"] for b in bodies[1:])
    await engine.close()


async def test_stated_confidence_baselines_end_to_end(
    standard: Callable[..., StandardServer],
) -> None:
    engine = await _started(standard(favourite="Jupiter"))
    params = ScoreParams(method="verbalized", mode="sampling")
    verbalized = await score(QUESTION, engine, params, PromptTemplate())
    assert verbalized.confidence == pytest.approx(0.7)
    params = ScoreParams(method="linguistic", mode="sampling")
    linguistic = await score(QUESTION, engine, params, PromptTemplate())
    assert linguistic.confidence in {value for _, value in LINGUISTIC_PHRASES}
    await engine.close()


async def test_choices_are_matched_in_free_replies(
    standard: Callable[..., StandardServer],
) -> None:
    letters = ("A", " A", "B", " B", "C", " C")
    for reply, wanted in [
        ("Option B it is.", "B"),
        ("**(C)**", "C"),
        ("I cannot tell.", ""),
        ("b", ""),  # a letter matches its case only
    ]:
        server = standard(fixed=reply)
        engine = await _started(server)
        out = await engine.generate([CHAT], [GenerationParams(max_tokens=4, choices=letters)])
        assert out[0].texts == [wanted], reply
        await engine.close()


def test_match_choice() -> None:
    phrases = tuple(phrase for phrase, _ in LINGUISTIC_PHRASES)
    assert match_choice("highly unlikely, I'd say", phrases) == "Highly unlikely"
    assert match_choice("It is very likely.", phrases) == "Very likely"
    assert match_choice("unlikely", phrases) == "Unlikely"  # not "Likely" inside it
    assert match_choice("A or B? B.", ("B", "A")) == "A"  # the first in the reply
    assert match_choice(" A", (" A", "A")) == " A"  # the first spelling given
    assert match_choice("none", ("A", "B")) is None
    assert strip_echoed_prefix("answer: B", "Answer:") == " B"
    assert strip_echoed_prefix(" B", "Answer:") == " B"


@pytest.mark.parametrize("honour_n", [True, False], ids=["n-honoured", "n-ignored"])
async def test_n_samples_honoured_or_topped_up(
    standard: Callable[..., StandardServer], honour_n: bool
) -> None:
    server = standard(favourite="Jupiter", honour_n=honour_n)
    engine = await _started(server)
    params = GenerationParams(n=5, temperature=1.0, max_tokens=4)
    out = (await engine.generate([CHAT], [params]))[0]
    assert len(out.texts) == 5
    sent = [b["n"] for b in server.posted()[1:]]
    assert sent == ([5] if honour_n else [5, 1, 1, 1, 1])
    assert out.completion_tokens == 5  # one word each, summed over the requests
    await engine.close()


async def test_logprobs_mode_from_top_logprobs(standard: Callable[..., StandardServer]) -> None:
    server = standard(favourite="Jupiter")
    engine = await _started(server)
    read = (await engine.read_letters([CHAT], [["A", "B", "C"]]))[0]
    # 90% on the letters, 8:1:1, both forms summed.
    assert read.logprobs["B"] == pytest.approx(math.log(0.9 * 0.8))
    assert read.logprobs["A"] == pytest.approx(math.log(0.9 * 0.1))
    body = server.posted()[-1]
    assert set(body) <= CHAT_FIELDS
    assert body["logprobs"] is True
    assert body["top_logprobs"] == 20
    result = await score(QUESTION, engine, ScoreParams(method="uf"), PromptTemplate())
    assert result.mode == "logprobs"  # auto: the server offers them
    assert result.answer == 1
    token = await score(QUESTION, engine, ScoreParams(method="token"), PromptTemplate())
    assert token.confidence == pytest.approx(0.72)
    await engine.close()


async def test_letters_missing_from_a_short_top_k_get_a_bounded_share(
    standard: Callable[..., StandardServer],
) -> None:
    server = standard(favourite="Jupiter", max_top_logprobs=3)
    engine = await _started(server)
    read = (await engine.read_letters([CHAT], [["A", "B", "C"]]))[0]
    # Shown: "B" 0.54, " B" 0.18, "A" 0.0675; C is absent: the 0.2125 left, but no more
    # than the least likely token shown.
    assert read.logprobs["B"] == pytest.approx(math.log(0.72))
    assert read.logprobs["A"] == pytest.approx(math.log(0.0675))
    assert read.logprobs["C"] == pytest.approx(math.log(0.0675))
    assert letters_from_top_logprobs({"A": 0.0}, ["A", "B"])["B"] == pytest.approx(
        math.log(ABSENT_LETTER_FLOOR)
    )
    await engine.close()


@pytest.mark.parametrize("offered", ["ignored", "rejected"])
async def test_without_top_logprobs_logprobs_mode_is_refused(
    standard: Callable[..., StandardServer], offered: str
) -> None:
    engine = await _started(standard(favourite="Jupiter", logprobs=offered))
    assert not engine.supports_letter_logprobs
    with pytest.raises(EngineFeatureMissing, match="top_logprobs") as caught:
        await engine.read_letters([CHAT], [["A", "B"]])
    assert "use mode=sampling" in str(caught.value)
    with pytest.raises(EngineFeatureMissing, match="letter log-probabilities"):
        await score(QUESTION, engine, ScoreParams(mode="logprobs"), PromptTemplate())
    with pytest.raises(EngineFeatureMissing, match="white-box only"):
        await score(QUESTION, engine, ScoreParams(method="token"), PromptTemplate())
    result = await score(QUESTION, engine, ScoreParams(method="uf"), PromptTemplate())
    assert result.mode == "sampling"  # auto resolves to sampling
    await engine.close()


async def test_what_a_standard_server_cannot_do_is_refused_or_off(
    standard: Callable[..., StandardServer],
) -> None:
    server = standard()
    engine = await _started(server, api="openai")
    assert engine.api == "openai"
    with pytest.raises(EngineFeatureMissing, match=r"/v1/completions.*UFCAL_PROMPT_CHAT"):
        await engine.generate([PLAIN], [GenerationParams()])
    with pytest.raises(EngineFeatureMissing, match="/tokenize"):
        await engine.count_tokens([CHAT])
    assert await engine.reset_prefix_cache() is False
    assert await engine.prompt_token_counters() is None
    assert await engine.server_counters() is None
    paths = {r.path for r in server.requests}
    assert not paths & {"/tokenize", "/reset_prefix_cache", "/metrics", "/version"}
    await engine.close()


async def test_the_setting_selects_the_api(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UFCAL_ENGINE_API", "openai")
    engine = await build_engine(Settings(engine_url="http://e1"))
    assert isinstance(engine, OpenAIHTTPEngine)
    assert engine.api == "openai"
    await engine.close()
    assert Settings().engine_api == "openai"
    monkeypatch.delenv("UFCAL_ENGINE_API")
    assert Settings().engine_api == "auto"
    with pytest.raises(ValidationError):
        Settings(engine_api="ollama")  # type: ignore[arg-type]


async def test_auto_reads_anything_but_vllms_version_as_standard() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/version":
            return httpx.Response(200, text="<html>llama.cpp</html>")
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "local"}]})
        return httpx.Response(400, json={"error": {"message": "logprobs unsupported"}})

    engine = _mock_engine(handler)
    engine._model = None
    await engine.start()
    assert engine.api == "openai"
    assert engine.model == "local"
    assert not engine.supports_letter_logprobs  # the probe was refused
    await engine.close()


async def test_plain_prompts_on_a_standard_completions_endpoint() -> None:
    seen: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append(body)
        top = [{"B": math.log(0.6), " A": math.log(0.3), "The": math.log(0.1)}]
        return httpx.Response(
            200,
            json={
                "choices": [{"index": 0, "text": " B", "logprobs": {"top_logprobs": top}}],
                "usage": {"prompt_tokens": 9, "completion_tokens": 1},
            },
        )

    engine = _mock_engine(handler, api="openai")
    read = (await engine.read_letters([PLAIN], [["A", "B"]]))[0]
    assert read.logprobs == pytest.approx({"A": math.log(0.3), "B": math.log(0.6)})
    assert read.prompt_tokens == 9
    assert seen[-1] == {
        "model": "m",
        "max_tokens": 1,
        "temperature": 0.0,
        "logprobs": 5,
        "prompt": PLAIN.text,
    }
    out = await engine.generate([PLAIN], [GenerationParams(choices=("A", "B"))])
    assert out[0].texts == ["B"]
    assert "structured_outputs" not in seen[-1]
    assert seen[-1]["prompt"] == f"{PLAIN.user}\nReply with one of: A, B.\n{PLAIN.answer_prefix}"
    await engine.close()
