"""Request limits: body size (413, without reading an unbounded body), option count, text
lengths and samples (422 naming the field and the limit's setting)."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import httpx
import pytest

from service.api.limits import BodySizeLimit
from tests.servers import fake_server, running
from tests.test_api import GOOD, _settings, serve, white_box


async def test_body_over_the_limit_is_413_naming_the_setting() -> None:
    engine = white_box()
    settings = _settings(max_body_bytes=4096)
    async with serve(engine, settings) as client:
        r = await client.post("/score", json={**GOOD, "question": "x" * 5000})
    assert r.status_code == 413
    assert "UFCAL_MAX_BODY_BYTES=4096" in r.json()["detail"]
    assert engine.calls == []


async def test_body_under_the_limit_passes() -> None:
    async with serve(white_box(), _settings(max_body_bytes=4096)) as client:
        r = await client.post("/score", json={**GOOD, "question": "x" * 3000})
    assert r.status_code == 200, r.text


async def test_chunked_body_is_cut_off_at_the_limit_without_reading_the_rest() -> None:
    """No Content-Length: the middleware counts bytes and stops reading past the limit."""
    reads = 0

    async def endless() -> Any:
        nonlocal reads
        while True:  # an unbounded body: 1 KiB chunks forever
            reads += 1
            yield b"x" * 1024

    async with serve(white_box(), _settings(max_body_bytes=8192)) as client:
        r = await client.post(
            "/score", content=endless(), headers={"content-type": "application/json"}
        )
    assert r.status_code == 413
    assert reads <= 10  # 8 KiB + a chunk or two in flight, never the whole stream


async def test_middleware_refuses_on_content_length_before_reading() -> None:
    received: list[str] = []
    sent: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:  # pragma: no cover
        raise AssertionError("the app must not run")

    async def receive() -> dict[str, Any]:
        received.append("read")
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "headers": [(b"content-length", b"10000000")]}
    await BodySizeLimit(app, max_bytes=1024)(scope, receive, send)
    assert received == []
    assert sent[0]["status"] == 413


def test_real_server_refuses_a_huge_declared_body_at_once(tmp_path: Any) -> None:
    """Over a socket: a client announcing 1 GB gets 413 before sending any of it."""
    with running(fake_server(tmp_path, "limits", {}), "/readyz", 30) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
            s.sendall(
                b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 1000000000\r\n\r\n"
            )
            chunks = []
            while chunk := s.recv(4096):  # the server closes the connection after the 413
                chunks.append(chunk)
            reply = b"".join(chunks).decode()
        assert reply.startswith("HTTP/1.1 413"), reply
        assert "UFCAL_MAX_BODY_BYTES" in reply
        assert httpx.get(server.base_url + "/healthz").status_code == 200


@pytest.mark.parametrize(
    ("change", "settings", "loc", "setting"),
    [
        ({"question": "q" * 101}, {"max_question_chars": 100}, ["body", "question"], "QUESTION"),
        ({"options": ["a", "b", "c"]}, {"max_options": 2}, ["body", "options"], "MAX_OPTIONS"),
        ({"options": ["a", "b" * 51]}, {"max_option_chars": 50}, ["body", "options", 1], "OPTION"),
        ({"samples": 9, "mode": "sampling"}, {"max_samples": 8}, ["body", "samples"], "SAMPLES"),
    ],
    ids=["question", "options", "option-length", "samples"],
)
async def test_question_limits_are_422_naming_field_and_limit(
    change: dict[str, Any], settings: dict[str, Any], loc: list[Any], setting: str
) -> None:
    engine = white_box()
    async with serve(engine, _settings(**settings)) as client:
        r = await client.post("/score", json={**GOOD, **change})
    assert r.status_code == 422, r.text
    issues = r.json()["detail"]
    assert [i["loc"] for i in issues] == [loc]
    assert f"UFCAL_{setting}" in issues[0]["msg"] or setting in issues[0]["msg"]
    assert issues[0]["type"] == "limit_exceeded"
    assert engine.calls == []


async def test_samples_never_above_64() -> None:
    async with serve(white_box()) as client:
        r = await client.post("/score", json={**GOOD, "samples": 65})
    assert r.status_code == 422
    with pytest.raises(ValueError):
        _settings(max_samples=65)


async def test_defaults_accept_a_normal_question() -> None:
    async with serve(white_box()) as client:
        rs = await asyncio.gather(*(client.post("/score", json=GOOD) for _ in range(3)))
    assert [r.status_code for r in rs] == [200, 200, 200]
