"""Byte-level fuzzing of every POST endpoint (hypothesis), where schemathesis cannot reach:
its cases are always well-formed JSON. Bodies are valid payloads mutated at the value level
(non-standard numbers, huge numbers, escapes, deep nesting, duplicate keys) and then at the
byte level (invalid UTF-8, truncation, a BOM, UTF-16), plus random bytes, sent with right and
wrong content types, hostile headers and query strings, to a real uvicorn over the fake
engine. Every reply must be < 500 and valid RFC 8259 JSON; the service must be alive after.

The same run checks that no secret reaches a reply or a log line: the server holds an API
key and an engine key, the fuzzer sends the key (and wrong ones), and the server's log and
every reply body are searched for both."""

from __future__ import annotations

import json
import socket
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote_from_bytes

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.servers import ServerProcess, fake_server, running

API_KEY = "fuzz-api-key-7f3c9a1e5b"
ENGINE_KEY = "fuzz-engine-key-2d8e6b4f0a"
CASES: Counter[str] = Counter()
STATUSES: Counter[int] = Counter()
MIN_CASES = 2000
FUZZ = settings(
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
    database=None,
)

SCORE = {
    "question": "Which gas do plants take in?",
    "options": ["Oxygen", "Carbon dioxide", "Nitrogen"],
    "method": "uf",
    "mode": "logprobs",
    "samples": 3,
    "temperature": 1.0,
    "tau": 2.0,
    "eps": 0.01,
    "id": "fuzz-1",
}
PAYLOADS = {
    "/score": SCORE,
    "/score/batch": {"items": [SCORE, {**SCORE, "id": "fuzz-2", "method": "token"}]},
    "/feedback": {"id": "fuzz-1", "gold_index": 1},
}
HOSTILE_VALUES = [
    "NaN",
    "Infinity",
    "-Infinity",
    "1e400",
    "-1e400",
    "1e-400",
    "-0",
    "0.0",
    "1.5",
    "123456789012345678901234567890",
    "9" * 5000,
    "-" + "9" * 4400,
    "true",
    "null",
    "{}",
    "[]",
    '"\\ud800"',
    '"\\udc00x"',
    '"x\\u0000y"',
    '"\\ud83d\\ude00"',
    '"\\\\"',
    '"\\uD800\\uD800"',
    '"' + "a" * 5_000 + '"',
    '"Paris"',
    '["Paris","Paris "]',
]
BYTE_INSERTS = [
    b"\xff",
    b"\xfe",
    b"\xc0\x80",
    b"\xed\xa0\x80",
    b"\x00",
    b"\x80",
    b"\xf4\x90\x80\x80",
]
CONTENT_TYPES = [
    *["application/json"] * 12,
    "application/json; charset=utf-8",
    "application/problem+json",
    "text/plain",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
    "application/json; charset=utf-16",
    "application/json; charset=\xff",
    "\x01garbage",
    None,
]


def dumps_with(value: Any, path: list[Any], raw: str, duplicate: str | None) -> str:
    """``value`` as JSON text with the value at ``path`` replaced by the raw text ``raw``
    (and, in the object holding it, the key ``duplicate`` repeated)."""
    if not path:
        return raw
    head, rest = path[0], path[1:]
    if isinstance(value, dict):
        parts = []
        for key, item in value.items():
            text = dumps_with(item, rest, raw, duplicate) if key == head else json.dumps(item)
            parts.append(f"{json.dumps(key)}:{text}")
        if head not in value:
            parts.append(f"{json.dumps(head)}:{dumps_with(None, rest, raw, duplicate)}")
        if duplicate is not None and not rest:
            parts.append(f"{json.dumps(duplicate)}:{raw}")
        return "{" + ",".join(parts) + "}"
    if isinstance(value, list):
        items = [
            dumps_with(item, rest, raw, duplicate) if i == head else json.dumps(item)
            for i, item in enumerate(value)
        ]
        return "[" + ",".join(items) + "]"
    return raw


def paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[list[Any]]:
    found = [list(prefix)]
    if isinstance(value, dict):
        for key, item in value.items():
            found += paths(item, (*prefix, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found += paths(item, (*prefix, i))
    return found


@st.composite
def mutated_bodies(draw: st.DrawFn, payload: dict[str, Any]) -> bytes:
    """A valid payload, mutated at the value level, then maybe at the byte level."""
    choices = paths(payload)
    path = draw(st.sampled_from(choices))
    kind = draw(st.sampled_from(["hostile", "nested", "text", "extra-key", "none"]))
    duplicate = None
    if kind == "hostile":
        raw = draw(st.sampled_from(HOSTILE_VALUES))
    elif kind == "nested":
        depth = draw(st.sampled_from([2, 31, 33, 100, 990, 3000]))
        raw = "[" * depth + "1" + "]" * depth
    elif kind == "text":
        raw = json.dumps(draw(st.text(max_size=40)), ensure_ascii=draw(st.booleans()))
    elif kind == "extra-key":  # an unknown, repeated or unencodable key at the top
        key = draw(st.sampled_from(["\\ud800", "question", "id", "x" * 5000, "\\u0000"]))
        return (json.dumps(payload)[:-1] + f',"{key}":1}}').encode()
    else:
        raw = None
    if raw is not None and draw(st.booleans()) and path and isinstance(path[-1], str):
        duplicate = path[-1]
    text = json.dumps(payload) if raw is None else dumps_with(payload, path, raw, duplicate)
    data = text.encode("utf-8", "surrogatepass")
    byte_op = draw(st.sampled_from(["none", "none", "truncate", "insert", "flip", "bom", "utf16"]))
    if byte_op == "truncate" and data:
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif byte_op == "insert":
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.sampled_from(BYTE_INSERTS)) + data[at:]
    elif byte_op == "flip" and data:
        at = draw(st.integers(0, len(data) - 1))
        data = data[:at] + bytes([data[at] ^ (1 << draw(st.integers(0, 7)))]) + data[at + 1 :]
    elif byte_op == "bom":
        data = b"\xef\xbb\xbf" + data
    elif byte_op == "utf16":
        data = data.decode("utf-8", "surrogatepass").encode("utf-16", "surrogatepass")
    return data


def header_values() -> st.SearchStrategy[bytes]:
    """Mostly legal header bytes (visible Latin-1), sometimes any bytes but CR/LF."""
    legal = st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f")
    return st.one_of(
        st.text(legal, max_size=60).map(lambda t: t.encode("latin-1")),
        st.text(legal, max_size=60).map(lambda t: t.encode("latin-1")),
        st.binary(max_size=60).map(lambda b: bytes(c for c in b if c not in b"\r\n\x00")),
        st.sampled_from([b"NaN", b"\xff\xfe", b"9" * 5000, b"x" * 7000]),
    )


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    logs = tmp_path_factory.mktemp("byte-fuzz")
    env = {
        "UFCAL_API_KEYS": f"other-key-unused,{API_KEY}",
        "UFCAL_ENGINE_API_KEY": ENGINE_KEY,
        "UFCAL_LOG_LEVEL": "info",
        "UFCAL_LOG_TEXT": "true",
        "UFCAL_DB_PATH": str(logs / "fuzz.db"),
        "UFCAL_MAX_BATCH_SIZE": "8",
        "UFCAL_MAX_CONCURRENCY": "64",
        "UFCAL_MAX_QUEUE": "64",
    }
    with running(fake_server(logs, "byte-fuzz", env), "/readyz", 30) as server:
        yield server


@pytest.fixture(scope="module")
def http(fuzz_server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fuzz_server.base_url, timeout=30) as client:
        yield client


REPLIES: list[bytes] = []


def check(response: httpx.Response | RawReply, label: str) -> None:
    CASES[label] += 1
    STATUSES[response.status_code] += 1
    REPLIES.append(response.content[:4096])
    assert response.status_code < 500, (response.status_code, response.content[:300])

    def refuse(name: str) -> Any:
        raise ValueError(f"non-standard JSON literal {name}")

    try:
        json.loads(response.content.decode("utf-8"), parse_constant=refuse)
    except ValueError as exc:
        pytest.fail(f"{response.status_code} reply is not JSON ({exc}): {response.content[:200]!r}")


def send(
    http: httpx.Client, path: str, body: bytes, ctype: str | None, extra: dict[str, bytes]
) -> httpx.Response:
    headers: dict[str, Any] = {"authorization": f"Bearer {API_KEY}", **extra}
    if ctype is not None:
        headers["content-type"] = ctype.encode("latin-1")
    return http.post(path, content=body, headers=headers)


@pytest.mark.parametrize(
    ("path", "examples"), [("/score", 700), ("/score/batch", 400), ("/feedback", 400)]
)
def test_mutated_bodies_never_fail_the_error_path(
    http: httpx.Client, path: str, examples: int
) -> None:
    @given(body=mutated_bodies(PAYLOADS[path]), ctype=st.sampled_from(CONTENT_TYPES))
    @settings(FUZZ, max_examples=examples)
    def run(body: bytes, ctype: str | None) -> None:
        check(send(http, path, body, ctype, {}), f"{path} mutated")

    run()


def test_random_bytes_never_fail_the_error_path(http: httpx.Client) -> None:
    @given(
        path=st.sampled_from(sorted(PAYLOADS)),
        body=st.binary(max_size=2000),
        ctype=st.sampled_from(CONTENT_TYPES),
    )
    @settings(FUZZ, max_examples=300)
    def run(path: str, body: bytes, ctype: str | None) -> None:
        check(send(http, path, body, ctype, {}), "random bytes")

    run()


@dataclass
class RawReply:
    status_code: int
    content: bytes


def raw_request(base_url: str, request: bytes) -> RawReply:
    """Send ``request`` as is (httpx refuses illegal header bytes) and read the reply."""
    url = httpx.URL(base_url)
    with socket.create_connection((url.host, url.port or 80), timeout=15) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return RawReply(int(head.split(b" ", 2)[1]), body)


def test_hostile_headers_and_query_strings_never_fail(fuzz_server: ServerProcess) -> None:
    @given(
        path=st.sampled_from([*sorted(PAYLOADS), "/calibration", "/nowhere"]),
        query=st.binary(max_size=80),
        encode_query=st.booleans(),
        request_id=header_values(),
        auth=st.sampled_from(["good", "wrong", "garbage", "none"]),
        garbage=header_values(),
    )
    @settings(FUZZ, max_examples=300)
    def run(
        path: str, query: bytes, encode_query: bool, request_id: bytes, auth: str, garbage: bytes
    ) -> None:
        headers = [b"x-request-id: " + request_id, b"accept: " + garbage]
        if auth == "good":
            headers.append(f"authorization: Bearer {API_KEY}".encode())
        elif auth == "wrong":
            headers.append(f"authorization: Bearer {API_KEY[:-1]}x".encode())
        elif auth == "garbage":
            headers.append(b"authorization: " + garbage)
        if encode_query:
            query = quote_from_bytes(query, safe="=&").encode()
        else:  # raw bytes in the request line (no spaces, which would end it)
            query = bytes(c for c in query if c not in b" \r\n")
        body = json.dumps(PAYLOADS.get(path, {})).encode()
        method = b"GET" if path in ("/calibration", "/nowhere") else b"POST"
        if method == b"GET":
            body = b""
        request = b"\r\n".join(
            [
                method + b" " + path.encode() + b"?" + query + b" HTTP/1.1",
                b"host: fuzz",
                b"content-type: application/json",
                b"content-length: " + str(len(body)).encode(),
                b"connection: close",
                *headers,
                b"",
                b"",
            ]
        )
        check(raw_request(fuzz_server.base_url, request + body), "headers and query")

    run()


def test_enough_cases_ran_and_the_service_is_alive(
    http: httpx.Client, fuzz_server: ServerProcess
) -> None:
    total = sum(CASES.values())
    print(f"\nbyte fuzz: {total} cases {dict(CASES)}; statuses {dict(sorted(STATUSES.items()))}")
    assert total >= MIN_CASES, CASES
    assert http.get("/healthz").status_code == 200
    good = http.post(
        "/score", json={**SCORE, "id": "after-fuzz"}, headers={"authorization": f"Bearer {API_KEY}"}
    )
    assert good.status_code == 200, good.text
    assert fuzz_server.process is not None and fuzz_server.process.poll() is None


def test_no_secret_reaches_a_reply_or_a_log_line(fuzz_server: ServerProcess) -> None:
    """Run after the fuzzer (same module, same server): the keys it held and was sent."""
    assert REPLIES, "the fuzz tests must run first"
    log = Path(fuzz_server.log_path).read_bytes()
    assert log, "the server logged nothing"
    for secret in (API_KEY, ENGINE_KEY):
        needle = secret.encode()
        assert needle not in log, f"{secret} in the server log"
        assert not any(needle in reply for reply in REPLIES), f"{secret} in a reply"
