"""``POST /v1/chat/completions`` and ``GET /v1/models`` driven by the official ``openai``
client, unmodified, against a ufcal app over a standard OpenAI server
(``tests/openai_standard_server.py``, which refuses any field it does not know: a ``ufcal``
key left in the forwarded body would be a 400)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from service.api.app import create_app
from service.api.chat.protocol import CONFIDENCE_HEADER
from service.config import Settings
from service.engines.openai_http import OpenAIHTTPEngine
from tests.openai_standard_server import Script, StandardServer
from tests.servers import ThreadedApp

KEY = "chat-test-key-0123456789"
MODEL = "standard-model"
OPTIONS = ["Mars", "Jupiter", "Venus"]
QUESTION = "Which planet is the largest?\nA. Mars\nB. Jupiter\nC. Venus"
MESSAGES: list[Any] = [
    {"role": "system", "content": "You are a terse astronomy tutor."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": QUESTION},
]
UFCAL_FIELDS = {
    "id",
    "task",
    "confidence",
    "raw_confidence",
    "calibrator",
    "uncertainty",
    "given",
    "answer",
    "options",
    "groups",
    "context_turns",
    "method",
    "mode",
    "model",
    "usage",
    "latency_ms",
}


def _settings(**overrides: Any) -> Settings:
    base: dict[str, Any] = {"api_keys": KEY, "engine_api": "openai", "engine_retry_s": 0.2}
    return Settings(**(base | overrides))


@pytest.fixture(scope="module")
def upstream() -> Iterator[StandardServer]:
    with StandardServer(Script(favourite="Jupiter", weight=6.0)) as server:
        yield server


@pytest.fixture(scope="module")
def ufcal(upstream: StandardServer) -> Iterator[ThreadedApp]:
    app = create_app(_settings(engine_url=upstream.base_url))
    with ThreadedApp(app) as served:
        yield served


@pytest.fixture
def client(ufcal: ThreadedApp) -> openai.OpenAI:
    return openai.OpenAI(base_url=ufcal.base_url + "/v1", api_key=KEY, max_retries=0)


def _forwarded(upstream: StandardServer) -> dict[str, Any]:
    """The last chat request the proxy forwarded (the scoring prompts are others)."""
    return [b for b in upstream.posted() if b["messages"] == MESSAGES][-1]


def _ufcal(obj: Any) -> Any:
    return (obj.model_extra or {}).get("ufcal")


def _check_ufcal(ufcal: dict[str, Any]) -> None:
    assert set(ufcal) == UFCAL_FIELDS
    assert ufcal["task"] == "multiple_choice"
    assert 0.0 <= ufcal["confidence"] <= 1.0
    assert ufcal["mode"] == "logprobs"
    assert ufcal["model"] == MODEL
    assert [o["label"] for o in ufcal["options"]] == ["A", "B", "C"]
    assert [o["text"] for o in ufcal["options"]] == OPTIONS
    assert ufcal["context_turns"] == 3
    assert ufcal["groups"] is None
    given = ufcal["given"]
    assert given is not None and given["match"] == "label"
    assert given["label"] == "ABC"[given["index"]]
    if given["confidence"] is not None:  # the given answer was rated: it is the confidence
        assert ufcal["confidence"] == given["confidence"]


def test_plain_completion_is_the_engine_reply_plus_ufcal(
    client: openai.OpenAI, upstream: StandardServer
) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=MESSAGES, temperature=0, extra_body={"ufcal": {"options": OPTIONS}}
    )
    completion = raw.parse()
    ufcal = _ufcal(completion)
    _check_ufcal(ufcal)
    assert float(raw.headers[CONFIDENCE_HEADER]) == pytest.approx(ufcal["confidence"], abs=1e-6)
    # The engine's reply, unchanged: the same as asking the engine directly.
    forwarded = _forwarded(upstream)
    assert "ufcal" not in forwarded
    direct = httpx.post(upstream.base_url + "/v1/chat/completions", json=forwarded).json()
    mine = json.loads(raw.content)
    del mine["ufcal"]
    for reply in (mine, direct):
        reply.pop("created")
    assert mine == direct
    assert ufcal["given"]["text"] == completion.choices[0].message.content


def test_streamed_chunks_pass_through_then_one_ufcal_chunk(
    client: openai.OpenAI, upstream: StandardServer
) -> None:
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            temperature=0,
            stream=True,
            extra_body={"ufcal": {"options": OPTIONS}},
        )
    )
    assert len(chunks) >= 3
    *tokens, last = chunks
    assert all(_ufcal(c) is None for c in tokens)
    assert last.choices == []
    _check_ufcal(_ufcal(last))
    text = "".join(c.choices[0].delta.content or "" for c in tokens if c.choices)
    assert text == _ufcal(last)["given"]["text"]
    assert _forwarded(upstream)["stream"] is True
    assert "ufcal" not in _forwarded(upstream)


def test_score_false_passes_through_unscored(
    client: openai.OpenAI, upstream: StandardServer
) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=MESSAGES, extra_body={"ufcal": {"score": False}}
    )
    assert CONFIDENCE_HEADER not in raw.headers
    assert "ufcal" not in json.loads(raw.content)
    assert _forwarded(upstream) == {"model": MODEL, "messages": MESSAGES}
    streamed = list(
        client.chat.completions.create(
            model=MODEL, messages=MESSAGES, stream=True, extra_body={"ufcal": {"score": False}}
        )
    )
    assert streamed and all(_ufcal(c) is None for c in streamed)


def test_chat_requests_are_counted(client: openai.OpenAI, ufcal: ThreadedApp) -> None:
    client.chat.completions.create(
        model=MODEL, messages=MESSAGES, extra_body={"ufcal": {"score": False}}
    )
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(
            model=MODEL, messages=MESSAGES, extra_body={"ufcal": {"samples": "x"}}
        )
    metrics = httpx.get(ufcal.base_url + "/metrics").text
    assert 'ufcal_chat_requests_total{scored="false",status="200",stream="false"}' in metrics
    assert 'ufcal_chat_requests_total{scored="true",status="422",stream="false"}' in metrics


def test_models_pass_through(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == [MODEL]


def test_the_ufcal_id_takes_feedback(client: openai.OpenAI, ufcal: ThreadedApp) -> None:
    completion = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        extra_body={"ufcal": {"options": OPTIONS, "id": "chat-feedback-1"}},
    )
    assert _ufcal(completion)["id"] == "chat-feedback-1"
    reply = httpx.post(
        ufcal.base_url + "/feedback",
        json={"id": "chat-feedback-1", "correct": True},
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert reply.status_code == 201, reply.text
    assert reply.json()["confidence"] == _ufcal(completion)["confidence"]


def test_a_key_is_needed(ufcal: ThreadedApp) -> None:
    anonymous = openai.OpenAI(base_url=ufcal.base_url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        anonymous.chat.completions.create(model=MODEL, messages=MESSAGES)
    with pytest.raises(openai.AuthenticationError):
        anonymous.models.list()


@pytest.mark.parametrize(
    ("messages", "controls", "loc"),
    [
        ([{"role": "system", "content": "Be brief."}], {"options": OPTIONS}, ["body", "messages"]),
        (
            [{"role": "user", "content": QUESTION}, {"role": "user", "content": "  "}],
            {"options": OPTIONS},
            ["body", "messages", 1, "content"],
        ),
        (MESSAGES, {"options": OPTIONS, "samples": "many"}, ["body", "ufcal", "samples"]),
        (MESSAGES, {"options": OPTIONS, "samples": 0}, ["body", "ufcal", "samples"]),
        (MESSAGES, {"options": OPTIONS, "mode": "psychic"}, ["body", "ufcal", "mode"]),
        (MESSAGES, {"options": OPTIONS, "max_prompts": 1}, ["body", "ufcal", "max_prompts"]),
        (MESSAGES, {"options": ["Mars"]}, ["body", "ufcal", "options"]),
        (MESSAGES, {"options": "Mars, Venus"}, ["body", "ufcal", "options"]),
        (MESSAGES, {"options": OPTIONS, "score": "yes please"}, ["body", "ufcal", "score"]),
        (MESSAGES, {"options": OPTIONS, "bogus": 1}, ["body", "ufcal", "bogus"]),
        (MESSAGES, ["not", "an", "object"], ["body", "ufcal"]),
    ],
)
def test_bad_input_is_a_422_naming_the_field(
    client: openai.OpenAI,
    upstream: StandardServer,
    messages: list[Any],
    controls: Any,
    loc: list[Any],
) -> None:
    before = len(upstream.posted())
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        client.chat.completions.create(
            model=MODEL, messages=messages, extra_body={"ufcal": controls}
        )
    detail = caught.value.response.json()["detail"]
    assert loc in [issue["loc"] for issue in detail], detail
    assert all({"loc", "msg", "type"} <= set(issue) for issue in detail)
    assert len(upstream.posted()) == before  # refused before anything was forwarded


def test_a_body_that_is_not_an_object_is_a_422(ufcal: ThreadedApp) -> None:
    reply = httpx.post(
        ufcal.base_url + "/v1/chat/completions",
        content=b"[1, 2]",
        headers={"Authorization": f"Bearer {KEY}", "content-type": "application/json"},
    )
    assert reply.status_code == 422
    assert reply.json()["detail"][0]["loc"] == ["body"]


def test_the_engine_refusal_of_a_chat_request_passes_through(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            extra_body={"ufcal": {"options": OPTIONS}, "no_such_field": 1},
        )
    assert "no_such_field" in caught.value.response.json()["error"]["message"]


def test_a_free_form_turn_is_scored_with_groups(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Name the largest planet."}]
    )
    ufcal = _ufcal(completion)
    assert ufcal["task"] == "free_form"
    assert ufcal["options"] is None and ufcal["answer"] is None
    assert isinstance(ufcal["groups"], list) and ufcal["groups"]
    assert ufcal["given"]["match"] == "free_form"
    assert ufcal["given"]["text"] == completion.choices[0].message.content
    assert ufcal["confidence"] == ufcal["given"]["confidence"]


def test_a_free_form_turn_streams_with_groups(client: openai.OpenAI) -> None:
    *_, last = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Name the largest planet."}], stream=True
    )
    assert _ufcal(last)["task"] == "free_form"
    assert _ufcal(last)["groups"]


# -- the engine fails -------------------------------------------------------------------------


def _scripted_engine(chat: Any) -> OpenAIHTTPEngine:
    """An HTTP engine whose server is healthy but answers chat requests with ``chat``."""

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/health":
            return httpx.Response(200)
        return chat(request)  # type: ignore[no-any-return]

    engine = OpenAIHTTPEngine(
        ["http://engine"], model=MODEL, retry_s=0.1, backoff_s=0.01, api="vllm"
    )
    engine._client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return engine


def _unreachable(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("connection refused", request=request)


@pytest.mark.parametrize(
    ("chat", "expected"),
    [
        (_unreachable, 503),
        (lambda _: httpx.Response(500, json={"error": "boom"}), 503),
        (lambda _: httpx.Response(503), 503),
        (lambda _: httpx.Response(200, content=b"<html>oops</html>"), 502),
    ],
)
def test_an_engine_that_fails_is_a_502_or_503(chat: Any, expected: int) -> None:
    app = create_app(_settings(), engine=_scripted_engine(chat))
    with ThreadedApp(app) as served:
        served_client = openai.OpenAI(base_url=served.base_url + "/v1", api_key=KEY, max_retries=0)
        for stream in (False, True):
            if stream and expected == 502:
                continue  # a stream's bytes are passed on as they come: nothing to refuse
            with pytest.raises(openai.APIStatusError) as caught:
                served_client.chat.completions.create(
                    model=MODEL,
                    messages=MESSAGES,
                    stream=stream,
                    extra_body={"ufcal": {"options": OPTIONS}},
                )
            assert caught.value.status_code == expected
            assert isinstance(caught.value.response.json()["detail"], str)
        if chat is _unreachable:
            with pytest.raises(openai.APIStatusError) as caught:
                served_client.models.list()
            assert caught.value.status_code == 503


def test_a_body_over_the_limit_is_a_413(client: openai.OpenAI) -> None:
    huge = [{"role": "user", "content": "x" * 1_100_000}]
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model=MODEL, messages=huge)
    assert caught.value.status_code == 413


def _completion_or_slow_scoring(request: httpx.Request) -> Any:
    """The chat turn is answered at once (whole or streamed); scoring's requests are slow."""

    async def handle() -> httpx.Response:
        body = json.loads(request.content) if request.content else {}
        if body.get("messages") != MESSAGES:
            await asyncio.sleep(2.0)
            return httpx.Response(503)
        reply = {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 1,
            "model": MODEL,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "B"},
                    "finish_reason": "stop",
                }
            ],
        }
        if not body.get("stream"):
            return httpx.Response(200, json=reply)
        event = {**reply, "object": "chat.completion.chunk"}
        event["choices"] = [{"index": 0, "delta": {"role": "assistant", "content": "B"}}]
        sse = b"data: " + json.dumps(event).encode() + b"\n\ndata: [DONE]\n\n"
        return httpx.Response(200, content=sse, headers={"content-type": "text/event-stream"})

    return handle()


def test_scoring_past_the_deadline_is_a_504_or_an_error_in_the_last_chunk() -> None:
    app = create_app(
        _settings(request_timeout_s=0.3), engine=_scripted_engine(_completion_or_slow_scoring)
    )
    with ThreadedApp(app) as served:
        served_client = openai.OpenAI(base_url=served.base_url + "/v1", api_key=KEY, max_retries=0)
        controls = {"ufcal": {"options": OPTIONS}}
        with pytest.raises(openai.APIStatusError) as caught:
            served_client.chat.completions.create(
                model=MODEL, messages=MESSAGES, extra_body=controls
            )
        assert caught.value.status_code == 504
        *tokens, last = served_client.chat.completions.create(
            model=MODEL, messages=MESSAGES, stream=True, extra_body=controls
        )
        assert [c.choices[0].delta.content for c in tokens] == ["B"]
        assert _ufcal(last)["error"]["status"] == 504
        assert isinstance(_ufcal(last)["error"]["detail"], str)
