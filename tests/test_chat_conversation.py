"""The pure parts of the chat sidecar: the scored turn and its context, reading a reply as
an option, the byte-level stream and JSON handling, and the in-process engine's OpenAI
shapes."""

from __future__ import annotations

import json
from typing import Any

import pytest

from service.api.chat.conversation import (
    CONTEXT_HEADER,
    ChatInputError,
    EventSplitter,
    OptionMatch,
    completion_text,
    conversation_key,
    match_option,
    scored_turn,
    stream_events,
    streamed_reply,
    with_key,
)
from service.engines.chat_openai import ChatRequestError, message_text, read_decoding

OPTIONS = ["Mars", "Jupiter", "Venus"]


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("B", OptionMatch(1, "label")),
        (" B)", OptionMatch(1, "label")),
        ("(B)", OptionMatch(1, "label")),
        ("B. Jupiter", OptionMatch(1, "label")),
        ("Answer: C", OptionMatch(2, "label")),
        ("**A**", OptionMatch(0, "label")),
        ("jupiter", OptionMatch(1, "text")),
        ("  Venus. ", OptionMatch(2, "text")),
        ("D", None),  # no such option
        ("Because Jupiter is big", None),  # a word, not a label; not an option's text
        ("I think it is Jupiter", None),  # no guessing
        ("", None),
    ],
)
def test_a_reply_names_an_option_by_label_or_exact_text(
    reply: str, expected: OptionMatch | None
) -> None:
    assert match_option(reply, OPTIONS) == expected


def test_the_last_user_turn_is_the_question_and_the_rest_its_context() -> None:
    messages = [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": [{"type": "text", "text": " Largest planet? "}]},
        {"role": "assistant", "content": "The answer is"},  # a pre-fill: not context
    ]
    turn = scored_turn(messages, 8000)
    assert turn.index == 3
    assert turn.text == "Largest planet?"
    assert turn.context_turns == 3
    assert turn.question == (
        f"{CONTEXT_HEADER}\nSystem: Be terse.\nUser: Hi\nAssistant: Hello.\n\nLargest planet?"
    )


def test_a_single_turn_has_no_context() -> None:
    turn = scored_turn([{"role": "user", "content": "Largest planet?"}], 8000)
    assert (turn.question, turn.context_turns) == ("Largest planet?", 0)


def test_the_oldest_context_is_left_out_to_fit_the_question_limit() -> None:
    messages = [
        {"role": "user", "content": "old " * 50},
        {"role": "assistant", "content": "recent"},
        {"role": "user", "content": "Q?"},
    ]
    turn = scored_turn(messages, 60)
    assert turn.context_turns == 1
    assert turn.question == f"{CONTEXT_HEADER}\nAssistant: recent\n\nQ?"
    assert len(turn.question) <= 60


@pytest.mark.parametrize(
    ("messages", "loc"),
    [
        ([], ("body", "messages")),
        ("hello", ("body", "messages")),
        ([{"role": "system", "content": "x"}], ("body", "messages")),
        ([{"role": "user", "content": "Q?"}, {"role": "user", "content": " "}], None),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], None),
        ([{"role": "user", "content": 7}], None),
    ],
)
def test_a_chat_without_a_question_is_refused_at_its_field(
    messages: Any, loc: tuple[Any, ...] | None
) -> None:
    with pytest.raises(ChatInputError) as caught:
        scored_turn(messages, 8000)
    last = len(messages) - 1 if isinstance(messages, list) else 0
    assert caught.value.loc == (loc or ("body", "messages", last, "content"))


def test_the_conversation_key_follows_the_conversation() -> None:
    first = [{"role": "system", "content": "s"}, {"role": "user", "content": "a"}]
    later = [*first, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    assert conversation_key(first) == conversation_key(later) is not None
    assert conversation_key([{"role": "user", "content": "other"}]) != conversation_key(first)
    assert conversation_key(None) is None


def test_ufcal_is_added_to_the_reply_without_re_encoding_it() -> None:
    reply = b'{"id": "x",  "choices": [{"text": "\\u00e9"}]}\n'
    added = with_key(reply, "ufcal", b'{"confidence":0.5}')
    assert added.startswith(b'{"id": "x",  "choices": [{"text": "\\u00e9"}]')
    assert json.loads(added) == {**json.loads(reply), "ufcal": {"confidence": 0.5}}
    assert json.loads(with_key(b"{ }", "k", b"1")) == {"k": 1}
    with pytest.raises(ValueError, match="object"):
        with_key(b"[1]", "k", b"1")


def _event(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data).encode() + b"\n\n"


def test_events_pass_whole_and_unchanged_and_done_is_held_back() -> None:
    one = _event({"choices": [{"index": 0, "delta": {"role": "assistant", "content": "Ju"}}]})
    two = _event({"choices": [{"index": 0, "delta": {"content": "piter"}}]})
    stream = one + two + b"data: [DONE]\n\n"
    for size in (1, 3, 7, len(stream)):  # however the bytes are cut
        splitter = EventSplitter()
        out = b"".join(splitter.feed(stream[i : i + size]) for i in range(0, len(stream), size))
        assert out == one + two
        assert splitter.done and splitter.rest() == b""
    crlf = EventSplitter()
    assert crlf.feed(b"data: {}\r\n\r\ndata: [DONE]\r\n\r\n") == b"data: {}\r\n\r\n"
    assert crlf.done


def test_a_stream_is_read_back_after_its_last_event() -> None:
    events = [
        _event({"id": "c1", "created": 5, "model": "m", "choices": [{"index": 0, "delta": {}}]}),
        _event({"choices": [{"index": 0, "delta": {"content": "B"}}]}),
        _event({"choices": [{"index": 1, "delta": {"content": "other choice"}}]}),
        _event({"choices": [], "usage": {"prompt_tokens": 1}}),
        b": a comment\n\n",
    ]
    said = streamed_reply(stream_events(events))
    assert (said.text, said.id, said.created, said.model, said.error) == ("B", "c1", 5, "m", False)
    assert streamed_reply(stream_events([_event({"error": {"message": "x"}})])).error


def test_the_reply_text_of_a_completion() -> None:
    assert completion_text({"choices": [{"message": {"content": "B"}}]}) == "B"
    assert completion_text({"choices": [{"message": {"content": None}}]}) is None
    assert completion_text({"choices": []}) is None


# -- the in-process engine's reading of a chat request -----------------------------------------


def test_a_chat_request_reads_into_decoding_settings() -> None:
    decoding = read_decoding(
        {
            "model": "m",
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                {"role": "assistant", "content": None},
            ],
            "max_completion_tokens": 5,
            "max_tokens": 9,
            "temperature": 0,
            "stop": "\n",
            "n": 2,
            "stream": True,
            "stream_options": {"include_usage": True},
            "user": "someone",
        },
        "m",
    )
    assert decoding.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": ""},
    ]
    assert (decoding.max_tokens, decoding.temperature, decoding.stop, decoding.n) == (
        5,
        0.0,
        ("\n",),
        2,
    )
    assert decoding.stream and decoding.include_usage


@pytest.mark.parametrize(
    ("change", "status", "param"),
    [
        ({"model": "other"}, 404, "model"),
        ({"tools": []}, 400, "tools"),
        ({"temperature": "hot"}, 400, "temperature"),
        ({"temperature": 3}, 400, "temperature"),
        ({"max_tokens": 0}, 400, "max_tokens"),
        ({"n": True}, 400, "n"),
        ({"stop": [1]}, 400, "stop"),
        ({"messages": []}, 400, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages"),
    ],
)
def test_what_the_in_process_engine_cannot_serve_is_an_openai_error(
    change: dict[str, Any], status: int, param: str
) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], **change}
    with pytest.raises(ChatRequestError) as caught:
        read_decoding(body, "m")
    reply = caught.value.reply()
    assert reply.status == status
    error = json.loads(reply.body)["error"]
    assert error["param"] == param and error["message"]


def test_message_text_keeps_only_text_parts() -> None:
    parts = [{"type": "text", "text": "a"}, {"type": "image_url"}, {"type": "text", "text": "b"}]
    assert message_text(parts) == "a\nb"
    assert message_text(None) is None
