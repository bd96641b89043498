"""The error path cannot fail: bodies Python's json accepts but strict JSON does not, bad
query strings and headers, and failures inside handlers all answer JSON that names the
field (docs/reliability.md). Over the fake engine, in process."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Annotated, Any

import httpx
import pytest
from fastapi import FastAPI, Header, Query
from fastapi.testclient import TestClient

from service.api.json_body import MAX_DEPTH, StrictJSONRoute, parse_strict
from service.config import Settings
from service.context_fit import ContextOverflow, check_fits
from service.engines.base import EngineRejected, GenerationParams
from service.engines.openai_http import OpenAIHTTPEngine
from tests.fake_app import build_app, fake_engine

Q = '"question":"q","options":["a","b"]'


def strict_loads(data: bytes) -> Any:
    """RFC 8259 JSON only: what any client's parser accepts."""

    def refuse(name: str) -> Any:
        raise ValueError(f"non-standard literal {name}")

    return json.loads(data.decode("utf-8"), parse_constant=refuse)


@pytest.fixture(scope="module")
def app() -> FastAPI:
    application = build_app(Settings(max_batch_size=8))

    @application.get("/probe")  # a route with query and header parameters
    async def probe(
        x: Annotated[float, Query(gt=0, le=10)],
        n: Annotated[int, Query(ge=0)] = 0,
        x_level: Annotated[int | None, Header(ge=0, le=9)] = None,
    ) -> dict[str, Any]:
        return {"x": x, "n": n, "level": x_level}

    @application.get("/boom")
    async def boom() -> dict[str, Any]:
        raise RuntimeError("a bug")

    return application


@pytest.fixture(scope="module")
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def post(client: TestClient, path: str, body: bytes, ctype: str | None = "application/json") -> Any:
    headers = {"content-type": ctype} if ctype else {}
    return client.post(path, content=body, headers=headers)


CASES = {
    "nan": (b"{" + Q.encode() + b',"temperature":NaN}', ["body", "temperature"]),
    "infinity": (b"{" + Q.encode() + b',"tau":Infinity}', ["body", "tau"]),
    "minus-infinity": (b"{" + Q.encode() + b',"eps":-Infinity}', ["body", "eps"]),
    "1e400": (b"{" + Q.encode() + b',"temperature":1e400}', ["body", "temperature"]),
    "huge-int": (b"{" + Q.encode() + b',"samples":' + b"9" * 5000 + b"}", ["body", "samples"]),
    "lone-surrogate": (b'{"question":"\\ud800","options":["a","b"]}', ["body", "question"]),
    "surrogate-option": (b'{"question":"q","options":["a","\\udfff"]}', ["body", "options", 1]),
    "surrogate-key": (b"{" + Q.encode() + b',"\\ud800x":1}', ["body", "\\ud800x"]),
    "nul": (b'{"question":"a\\u0000b","options":["a","b"]}', ["body", "question"]),
    "bad-utf8": (b'{"question":"\xff\xfe","options":["a","b"]}', ["body", "question"]),
    "duplicate-key": (b'{"question":"q",' + Q.encode() + b"}", ["body", "question"]),
    "deep": (b"{" + Q.encode() + b',"id":' + b"[" * 40 + b"]" * 40 + b"}", ["body", "id"]),
    "very-deep": (b"[" * 100_000 + b"]" * 100_000, ["body"]),
    "truncated": (b'{"question":"q","opt', ["body", 16]),
}


@pytest.mark.parametrize("path", ["/score", "/score/batch", "/feedback"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_non_standard_json_is_a_422_naming_the_field(
    client: TestClient, path: str, case: str
) -> None:
    body, loc = CASES[case]
    if path == "/score/batch" and body.startswith(b"{"):
        body, loc = b'{"items":[' + body + b"]}", [*loc[:1], "items", 0, *loc[1:]]
        if case == "truncated":
            loc = ["body", 26]
    response = post(client, path, body)
    assert response.status_code == 422, response.text
    detail = strict_loads(response.content)["detail"]
    assert detail[0]["loc"][: len(loc)] == loc, detail  # parsed before any model validates
    assert len(response.content) < 2048


def test_a_bom_is_ignored(client: TestClient) -> None:
    assert post(client, "/score", b"\xef\xbb\xbf{" + Q.encode() + b"}").status_code == 200


@pytest.mark.parametrize(
    "ctype",
    ["text/plain", "application/x-www-form-urlencoded", None, "application/json; charset=utf-16"],
)
def test_a_body_that_is_not_json_is_415(client: TestClient, ctype: str | None) -> None:
    response = post(client, "/score", b"{" + Q.encode() + b"}", ctype)
    assert response.status_code == 415
    assert strict_loads(response.content)["detail"][0]["loc"] == ["header", "content-type"]


def test_json_subtypes_and_charset_are_accepted(client: TestClient) -> None:
    for ctype in ["application/json; charset=UTF-8", "application/merge-patch+json"]:
        assert post(client, "/score", b"{" + Q.encode() + b"}", ctype).status_code == 200


def test_a_1_mib_invalid_field_is_quoted_not_echoed(client: TestClient) -> None:
    size = (1 << 20) - 200  # the body stays within UFCAL_MAX_BODY_BYTES (1 MiB)
    base = '{"question":"q","options":["a","b"],'
    for field in ['"method":"{}"', '"id":"{}"', '"question2":"{}"', '"temperature":{}']:
        value = "9" * size if "temperature" in field else "x" * size
        raw = (base + field.format(value) + "}").encode()
        response = post(client, "/score", raw)
        assert response.status_code == 422
        assert len(response.content) < 2048
    many = {"question": "q", "options": ["a", "b"], **{f"k{i}": "v" * 500 for i in range(1000)}}
    response = client.post("/score", json=many)
    assert response.status_code == 422
    detail = strict_loads(response.content)["detail"]
    assert len(detail) <= 21 and detail[-1]["type"] == "too_many_errors"
    assert len(response.content) < 8192


def test_duplicate_options_are_a_422_naming_their_indexes(client: TestClient) -> None:
    response = client.post(
        "/score", json={"question": "Capital?", "options": ["Paris", " Paris ", "London", "London"]}
    )
    assert response.status_code == 422
    issue = strict_loads(response.content)["detail"][0]
    assert issue["loc"] == ["body", "options"]
    assert issue["type"] == "duplicate_options"
    assert "0, 1" in issue["msg"] and "2, 3" in issue["msg"]
    batch = client.post("/score/batch", json={"items": [{"question": "q", "options": ["x", "x"]}]})
    assert batch.status_code == 422
    assert strict_loads(batch.content)["detail"][0]["loc"] == ["body", "items", 0, "options"]


@pytest.mark.parametrize(
    "query",
    [
        "x=NaN",
        "x=inf",
        "x=-Infinity",
        "x=1e400",
        "x=" + "9" * 5000,
        "x=%ff%fe",
        "x=%ED%A0%80",
        "x=1&n=" + "9" * 5000,
        "x=" + "y" * 60_000,
    ],
)
def test_query_strings_never_break_the_reply(client: TestClient, query: str) -> None:
    response = client.get("/probe?" + query)
    assert response.status_code == 422, response.text
    issue = strict_loads(response.content)["detail"][0]
    assert issue["loc"][0] == "query"
    assert len(response.content) < 2048


@pytest.mark.parametrize("value", ["NaN", "inf", "9" * 5000, "\xff\xfe", "é" * 3000])
def test_headers_never_break_the_reply(client: TestClient, value: str) -> None:
    response = client.get("/probe?x=1", headers={"x-level": value.encode("latin-1")})
    assert response.status_code == 422
    assert strict_loads(response.content)["detail"][0]["loc"] == ["header", "x-level"]
    assert len(response.content) < 2048


def test_an_unhandled_exception_is_a_json_500_with_a_request_id(client: TestClient) -> None:
    response = client.get("/boom")
    assert response.status_code == 500
    body = strict_loads(response.content)
    assert body["detail"] == "internal error"
    assert body["request_id"] == response.headers["x-request-id"]
    given = client.get("/boom", headers={"x-request-id": "abc-123"})
    assert strict_loads(given.content)["request_id"] == "abc-123"
    hostile = client.get("/boom", headers={"x-request-id": 'a"b' * 50})
    assert strict_loads(hostile.content)["request_id"] != 'a"b' * 50


def test_every_route_with_a_body_parses_strictly(app: FastAPI) -> None:
    from fastapi.routing import APIRoute

    for route in app.routes:
        if isinstance(route, APIRoute) and route.body_field is not None:
            assert isinstance(route, StrictJSONRoute), route.path


def test_parse_strict_accepts_standard_json() -> None:
    text = '{"a":[1,-2,3.5e10,"\\ud83d\\ude00",true,null,{"b":"é"}]}'
    assert parse_strict(text.encode()) == json.loads(text)
    nested = "[" * MAX_DEPTH + "]" * MAX_DEPTH
    assert parse_strict(nested.encode()) == json.loads(nested)


# -- the question must fit the model's context -----------------------------------------------


def test_a_question_over_the_context_is_a_422_naming_limit_and_count() -> None:
    engine = fake_engine()
    engine.context_length = 300
    settings = Settings()
    with TestClient(build_app_with(engine, settings), raise_server_exceptions=False) as c:
        ok = c.post("/score", json={"question": "short " * 10, "options": ["a", "b"]})
        assert ok.status_code == 200
        calls = len(engine.calls)
        long_q = {"question": "word " * 290, "options": ["a", "b"]}
        response = c.post("/score", json=long_q)
        assert response.status_code == 422
        issue = strict_loads(response.content)["detail"][0]
        assert issue["type"] == "context_length_exceeded"
        assert issue["ctx"]["limit"] == 300 and issue["ctx"]["prompt_tokens"] > 290
        assert "300" in issue["msg"]
        assert len(engine.calls) == calls  # refused before any engine call
        batch = c.post(
            "/score/batch", json={"items": [long_q, {"question": "q", "options": ["a", "b"]}]}
        )
        items = batch.json()["results"]
        assert items[0]["error"]["status"] == 422 and "300" in items[0]["error"]["detail"]
        assert items[1]["result"] is not None


def build_app_with(engine: Any, settings: Settings) -> FastAPI:
    from service.api.app import create_app

    return create_app(settings, engine=engine)


async def test_the_chain_prompts_count_not_only_the_first() -> None:
    """A short option replaced by the longer substitute text makes a chain prompt longer
    than step 1: a question that fits at step 1 but not in its chains is refused."""
    from service.calibration.prompts import PromptTemplate, Question
    from service.scoring import prompts_sent, question_size

    engine = fake_engine()
    template = PromptTemplate()
    question = Question("w " * 100, ("a", "b"))
    sent = prompts_sent(question, "uf", "logprobs", template)
    step1 = engine._prompt_tokens(sent[0][0])
    longest = max(engine._prompt_tokens(p) for p, _ in sent)
    assert longest > step1
    engine.context_length = longest  # step 1 fits, a chain prompt + 1 token does not
    size = question_size(question, template)
    with pytest.raises(ContextOverflow) as raised:
        await check_fits(engine, size, lambda: sent)
    assert raised.value.prompt_tokens == longest and raised.value.limit == longest
    engine.context_length = longest + 1
    await check_fits(engine, size, lambda: sent)


async def test_ordinary_questions_are_not_tokenized() -> None:
    from service.calibration.prompts import PromptTemplate, Question
    from service.scoring import question_size

    engine = fake_engine()
    engine.context_length = 4096
    question = Question("Which one?", ("a", "b", "c"))
    size = question_size(question, PromptTemplate())

    def render_all() -> list[Any]:
        raise AssertionError("an ordinary question needs no prompt rendered")

    await check_fits(engine, size, render_all)
    await check_fits(engine, size, render_all)
    assert len(engine.counted) == 1  # the one-off probe of the template, nothing per question


async def test_vllm_refusing_a_request_is_engine_rejected_not_a_fault() -> None:
    from service.calibration.prompts import Prompt

    def handler(request: httpx.Request) -> httpx.Response:
        message = "This model's maximum context length is 4096 tokens. However, ..."
        return httpx.Response(400, json={"error": {"message": message, "type": "BadRequestError"}})

    engine = OpenAIHTTPEngine(["http://e1"], model="m", retry_s=0.1)
    engine._client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    prompt = Prompt(user="q", answer_prefix="Answer:", chat=False)
    with pytest.raises(EngineRejected, match="maximum context length"):
        await engine.generate([prompt], [GenerationParams()])
    await engine.close()


def test_a_failure_while_shaping_a_422_still_answers_json(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    import service.api.errors as errors

    def broken(_: Any) -> Any:
        raise RuntimeError("the shaper broke")

    monkeypatch.setattr(errors, "validation_reply", broken)
    response = client.post("/score", json={"question": "q", "options": ["a"]})
    assert response.status_code == 422
    assert strict_loads(response.content)["detail"][0]["loc"] == ["body"]
