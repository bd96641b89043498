"""The OpenAI sidecar on the real SmolLM2, driven by the official ``openai`` client: a plain
and a streamed completion of a multiple-choice turn, each scored, on the in-process vLLM
engine (``ufcal serve`` with no engine URL, as ``make serve`` runs it) and on vLLM's own
OpenAI server behind ``UFCAL_ENGINE_URL`` (its chunks passed through)."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from tests.servers import EMBEDDED_NAME, ServerProcess

pytestmark = pytest.mark.integration

OPTIONS = ["Mars", "Jupiter", "Venus", "Mercury"]
MESSAGES: list[Any] = [
    {"role": "user", "content": "Hello!"},
    {"role": "assistant", "content": "Hi, how can I help?"},
    {
        "role": "user",
        "content": "Which planet is the largest?\nA. Mars\nB. Jupiter\nC. Venus\nD. Mercury\n"
        "Answer with the letter only.",
    },
]


def _client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0)


def _check(ufcal: dict[str, Any], reply: str) -> None:
    assert ufcal["task"] == "multiple_choice"
    assert ufcal["model"] == EMBEDDED_NAME
    assert ufcal["mode"] == "logprobs"
    assert ufcal["context_turns"] == 2
    assert ufcal["answer"] is not None
    assert 0.0 <= ufcal["confidence"] <= 1.0
    assert [o["text"] for o in ufcal["options"]] == OPTIONS
    assert sum(o["probability"] for o in ufcal["options"]) == pytest.approx(1.0, abs=1e-6)
    assert ufcal["answer"]["text"] == OPTIONS[ufcal["answer"]["index"]]
    # UF: (1 - U) x F(answer) <= 1 - U, whichever answer is rated
    assert ufcal["raw_confidence"] <= 1.0 - ufcal["uncertainty"] + 1e-9
    given = ufcal["given"]  # None: the reply names no option (a chance-level model may not)
    if given is not None:
        assert given["text"] == reply
        assert OPTIONS[given["index"]] == ufcal["options"][given["index"]]["text"]


@pytest.mark.parametrize("server", ["ufcal_local", "ufcal_remote"])
def test_chat_completion_plain_and_streamed(server: str, request: pytest.FixtureRequest) -> None:
    client = _client(request.getfixturevalue(server))
    assert [m.id for m in client.models.list()] == [EMBEDDED_NAME]
    raw = client.chat.completions.with_raw_response.create(
        model=EMBEDDED_NAME,
        messages=MESSAGES,
        max_tokens=8,
        temperature=0,
        extra_body={"ufcal": {"options": OPTIONS}},
    )
    completion = raw.parse()
    assert completion.object == "chat.completion"
    assert completion.usage is not None and completion.usage.completion_tokens <= 8
    reply = completion.choices[0].message.content or ""
    ufcal = (completion.model_extra or {})["ufcal"]
    _check(ufcal, reply)
    assert float(raw.headers["x-ufcal-confidence"]) == pytest.approx(ufcal["confidence"], abs=1e-6)

    chunks = list(
        client.chat.completions.create(
            model=EMBEDDED_NAME,
            messages=MESSAGES,
            max_tokens=8,
            temperature=0,
            stream=True,
            extra_body={"ufcal": {"options": OPTIONS}},
        )
    )
    *tokens, last = chunks
    assert tokens and all("ufcal" not in (c.model_extra or {}) for c in tokens)
    streamed = "".join(c.choices[0].delta.content or "" for c in tokens if c.choices)
    assert streamed == reply  # greedy: the same text as the plain completion
    _check((last.model_extra or {})["ufcal"], streamed)


def test_unscored_and_refused_chat_on_the_in_process_engine(ufcal_local: ServerProcess) -> None:
    client = _client(ufcal_local)
    raw = client.chat.completions.with_raw_response.create(
        model=EMBEDDED_NAME,
        messages=MESSAGES,
        max_tokens=4,
        n=2,
        temperature=1.0,
        extra_body={"ufcal": {"score": False}},
    )
    completion = raw.parse()
    assert "x-ufcal-confidence" not in raw.headers
    assert "ufcal" not in (completion.model_extra or {})
    assert len(completion.choices) == 2
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(
            model="no-such-model", messages=MESSAGES, extra_body={"ufcal": {"score": False}}
        )
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model=EMBEDDED_NAME,
            messages=MESSAGES,
            tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
            extra_body={"ufcal": {"score": False}},
        )
