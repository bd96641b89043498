"""Client mistakes are 4xx on both engines, with the real SmolLM2: a question over the
model's context (counted by the engine's own tokenizer before any engine call) and
duplicate options. And the token counts match what vLLM itself reports for a prompt."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from service.calibration.prompts import PromptTemplate, Question, all_options, render
from service.engines.base import EngineRejected, GenerationParams
from service.engines.openai_http import OpenAIHTTPEngine
from tests.servers import EMBEDDED_NAME, ServerProcess

pytestmark = pytest.mark.integration

# The issue's example: 7,980 characters of digits, within UFCAL_MAX_QUESTION_CHARS (8000)
# but about 4,000 tokens of SmolLM2 (whose context here is 4,096).
DIGITS = ("1234567890" * 798)[:7980]
CONTEXT = 4096


@pytest.fixture(params=["ufcal_local", "ufcal_remote"])
def server(request: pytest.FixtureRequest) -> ServerProcess:
    served: ServerProcess = request.getfixturevalue(request.param)
    return served


def post(server: ServerProcess, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(server.base_url + path, json=body, timeout=300)


def test_a_question_over_the_context_is_422_naming_limit_and_count(server: ServerProcess) -> None:
    for method in ("uf", "verbalized"):
        body = {"question": DIGITS, "options": ["yes", "no"], "method": method}
        response = post(server, "/score", body)
        assert response.status_code == 422, response.text
        issue = response.json()["detail"][0]
        assert issue["type"] == "context_length_exceeded"
        assert issue["loc"] == ["body", "question"]
        assert issue["ctx"]["limit"] == CONTEXT
        assert issue["ctx"]["prompt_tokens"] + issue["ctx"]["new_tokens"] > CONTEXT
        assert str(CONTEXT) in issue["msg"] and str(issue["ctx"]["prompt_tokens"]) in issue["msg"]
    batch = post(
        server,
        "/score/batch",
        {"items": [{"question": DIGITS, "options": ["yes", "no"]}]},
    )
    assert batch.status_code == 200
    error = batch.json()["results"][0]["error"]
    assert error["status"] == 422 and str(CONTEXT) in error["detail"]


def test_duplicate_options_are_422_naming_their_indexes(server: ServerProcess) -> None:
    response = post(
        server,
        "/score",
        {"question": "Capital of France?", "options": ["Paris", "Paris ", "London"]},
    )
    assert response.status_code == 422
    issue = response.json()["detail"][0]
    assert issue["loc"] == ["body", "options"] and issue["type"] == "duplicate_options"
    assert "0, 1" in issue["msg"]


async def test_token_counts_match_what_vllm_reports(vllm: ServerProcess) -> None:
    """/tokenize with the chat flags of the completion counts exactly the prompt tokens
    vLLM then reports for that prompt (so the check refuses what vLLM would refuse)."""
    engine = OpenAIHTTPEngine([vllm.base_url], model=EMBEDDED_NAME)
    await engine.start()
    try:
        question = Question("Which gas do plants take in?", ("Oxygen", "Carbon dioxide"))
        prompt = render(question, all_options(question), PromptTemplate())
        counted = await engine.count_tokens([prompt])
        read = (await engine.read_letters([prompt], [["A", "B"]]))[0]
        assert counted.counts == [read.prompt_tokens]
        assert counted.context_length == CONTEXT
    finally:
        await engine.close()


async def test_vllm_refusing_an_over_long_prompt_is_a_client_error(vllm: ServerProcess) -> None:
    """Past the check (e.g. an engine that cannot count), vLLM's own refusal is
    EngineRejected, which the service answers 422, not an engine fault (502)."""
    engine = OpenAIHTTPEngine([vllm.base_url], model=EMBEDDED_NAME)
    await engine.start()
    try:
        question = Question(DIGITS + DIGITS, ("yes", "no"))
        prompt = render(question, all_options(question), PromptTemplate())
        with pytest.raises(EngineRejected, match="context length"):
            await engine.generate([prompt], [GenerationParams(max_tokens=4)])
    finally:
        await engine.close()
