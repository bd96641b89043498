"""Prefix-affine engine routing: the hashing (stable, balanced, minimal movement), the
router's state, and the HTTP engine sending each question's prompts to one server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from typing import Any

import httpx
import pytest

from service.calibration.baselines import verbalized_prompt
from service.calibration.prompts import (
    PromptTemplate,
    Question,
    all_options,
    chain_options,
    prefix_key,
    render,
)
from service.config import Settings
from service.engines.base import GenerationParams
from service.engines.openai_http import OpenAIHTTPEngine
from service.engines.routing import EngineRouter, pick, rank

ENGINES = ["http://vllm-0:8000", "http://vllm-1:8000", "http://vllm-2:8000", "http://vllm-3:8000"]
KEYS = [f"question-{i}" for i in range(4000)]


def _owners(engines: list[str], down: frozenset[str] = frozenset()) -> dict[str, str]:
    return {key: pick(engines, key, down=down) for key in KEYS}


def test_rank_is_the_same_in_every_process() -> None:
    """Replicas must agree: another interpreter with another hash seed ranks alike (the
    salted hash() would not), and the ranking of a pinned key never changes between
    versions (a rolling upgrade would otherwise split the cache)."""
    code = (
        "import json, sys\n"
        "from service.engines.routing import rank\n"
        "engines, keys = json.loads(sys.stdin.read())\n"
        "print(json.dumps([rank(engines, k) for k in keys]))\n"
    )
    keys = KEYS[:200]
    here = [rank(ENGINES, key) for key in keys]
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", code],
            input=json.dumps([ENGINES, keys]),
            capture_output=True,
            text=True,
            env=env,
            check=True,
        )
        assert json.loads(out.stdout) == here
    assert rank(["a", "b", "c"], "pinned") == ["b", "c", "a"]


@pytest.mark.parametrize("count", [2, 3, 4])
def test_keys_spread_evenly(count: int) -> None:
    owners = Counter(_owners(ENGINES[:count]).values())
    for engine in ENGINES[:count]:
        assert abs(owners[engine] / len(KEYS) - 1 / count) < 0.03, owners


def test_a_server_down_moves_only_its_own_keys_to_their_next_in_rank() -> None:
    before = _owners(ENGINES)
    gone = ENGINES[1]
    after = _owners(ENGINES, down=frozenset({gone}))
    moved = {key for key in KEYS if before[key] != after[key]}
    assert moved == {key for key in KEYS if before[key] == gone}
    for key in moved:
        assert after[key] == rank(ENGINES, key)[1]
    # its keys spread over the others, not onto one neighbour
    assert len(Counter(after[key] for key in moved)) == len(ENGINES) - 1
    # and come back when it does
    assert _owners(ENGINES) == before


def test_adding_a_server_takes_only_its_share() -> None:
    before = _owners(ENGINES[:3])
    after = _owners(ENGINES)
    moved = [key for key in KEYS if before[key] != after[key]]
    assert all(after[key] == ENGINES[3] for key in moved)
    assert abs(len(moved) / len(KEYS) - 1 / 4) < 0.03


def test_every_server_down_still_names_the_first_in_rank() -> None:
    assert pick(ENGINES, "k", down=frozenset(ENGINES)) == rank(ENGINES, "k")[0]


def test_load_guard_takes_the_second_choice_only_when_the_first_is_far_busier() -> None:
    first, second = rank(ENGINES, "hot")[:2]
    busy = {first: 7, second: 1}
    assert pick(ENGINES, "hot", in_flight=busy) == first  # guard off
    assert pick(ENGINES, "hot", in_flight=busy, load_guard=4.0) == first  # 7 < 4 x 2
    busy[first] = 8
    assert pick(ENGINES, "hot", in_flight=busy, load_guard=4.0) == second  # 8 >= 4 x 2
    # the second choice must be healthy too
    third = rank(ENGINES, "hot")[2]
    got = pick(ENGINES, "hot", down=frozenset({second}), in_flight=busy, load_guard=4.0)
    assert got == third


def test_router_round_robin_ignores_keys_and_skips_servers_down() -> None:
    router = EngineRouter(ENGINES[:3], "round_robin")
    assert [router.choose("same") for _ in range(6)] == ENGINES[:3] * 2
    router.mark(ENGINES[0], up=False)
    assert {router.choose("same") for _ in range(4)} == set(ENGINES[1:3])
    affine = EngineRouter(ENGINES[:3], "affinity")
    assert len({affine.choose("same") for _ in range(6)}) == 1
    assert len({affine.choose(None) for _ in range(3)}) == 3  # no key: round-robin


def test_router_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="routing"):
        EngineRouter(ENGINES, "random")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="load guard"):
        EngineRouter(ENGINES, load_guard=-1)
    with pytest.raises(ValueError):
        Settings(engine_routing="random")  # type: ignore[arg-type]


# ------------------------------------------------------------------ the question's key

Q = Question("Which gas do plants take in?", ("Oxygen", "Carbon dioxide", "Helium", "Neon"))


def test_every_prompt_of_a_question_carries_one_key() -> None:
    template = PromptTemplate()
    prompts = [
        render(Q, all_options(Q), template),
        render(Q, chain_options(Q, 1), template),
        render(Q, chain_options(Q, 2, frozenset({0, 1})), template),
        verbalized_prompt(Q, 1, template),
    ]
    assert len({p.prefix_key for p in prompts}) == 1
    assert prompts[0].prefix_key == prefix_key(Q, template)
    other = Question(Q.text, ("Oxygen", "Carbon dioxide", "Helium", "Argon"))
    assert prefix_key(other, template) != prefix_key(Q, template)
    system = PromptTemplate(system_prompt="You are a botanist.")
    assert prefix_key(Q, system) != prefix_key(Q, template)


# ---------------------------------------------------------------- the HTTP engine routing

URLS = ["http://e1", "http://e2", "http://e3"]
QUESTIONS = [Question(f"Question number {i}?", ("yes", "no", "maybe")) for i in range(30)]


def _prompts(question: Question) -> list[Any]:
    template = PromptTemplate()
    return [render(question, chain_options(question, i), template) for i in range(3)]


def _engine(handler: Any, routing: str = "affinity") -> OpenAIHTTPEngine:
    engine = OpenAIHTTPEngine(URLS, model="m", backoff_s=0.01, routing=routing)  # type: ignore[arg-type]
    engine._client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return engine


async def _hosts_by_question(
    engine: OpenAIHTTPEngine, seen: list[tuple[str, str]]
) -> dict[int, set[str]]:
    hosts: dict[int, set[str]] = {}
    for index, question in enumerate(QUESTIONS):
        seen.clear()
        prompts = _prompts(question)
        await engine.generate(prompts, [GenerationParams()] * len(prompts))
        hosts[index] = {host for host, _ in seen}
    return hosts


def _recording(seen: list[tuple[str, str]], dead: set[str]) -> Any:
    def handler(request: httpx.Request) -> httpx.Response:
        host = request.url.host
        if host in dead:
            raise httpx.ConnectError("refused", request=request)
        seen.append((host, request.url.path))
        return httpx.Response(
            200,
            json={
                "choices": [{"index": 0, "message": {"content": "A"}}],
                "usage": {"prompt_tokens": 3},
            },
        )

    return handler


async def test_http_engine_sends_a_questions_prompts_to_one_server() -> None:
    seen: list[tuple[str, str]] = []
    engine = _engine(_recording(seen, set()))
    hosts = await _hosts_by_question(engine, seen)
    assert all(len(h) == 1 for h in hosts.values())
    assert {h for s in hosts.values() for h in s} == {"e1", "e2", "e3"}
    await engine.close()

    spread = _engine(_recording(seen, set()), routing="round_robin")
    assert all(len(h) == 3 for h in (await _hosts_by_question(spread, seen)).values())
    await spread.close()


async def test_http_engine_fails_over_only_the_dead_servers_questions() -> None:
    seen: list[tuple[str, str]] = []
    dead: set[str] = set()
    engine = _engine(_recording(seen, dead))
    before = await _hosts_by_question(engine, seen)
    dead.add("e2")
    after = await _hosts_by_question(engine, seen)
    assert engine.down == ["http://e2"]
    for index, question in enumerate(QUESTIONS):
        if before[index] == {"e2"}:
            second = rank(URLS, _prompts(question)[0].prefix_key)[1]
            assert after[index] == {httpx.URL(second).host}
        else:
            assert after[index] == before[index]
    assert any(h == {"e2"} for h in before.values())
    await engine.close()
