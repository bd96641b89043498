"""``ufcal serve`` with a scripted fake engine instead of vLLM, for tests that need a real
HTTP server (Prometheus scraping, restarts, kill -9):

    python -m tests.fake_app --port 8400      # settings from UFCAL_* as usual

The fake model reads ``p=0.83`` from the question text: option A gets probability p, option
B the rest (other options nothing), and every fidelity chain stays with its start. Without a
``p=`` it uses 0.6. So a test picks each answer's confidence through the question. A
question containing ``engine-error`` makes the engine call fail (an HTTP 502).

Free-form questions (no options): the model's K short answers are ``answers=[a|b|c]`` from
the question, repeated in order up to K (without it every sample is "42"); the judge says
two answers mean the same when one's normalised words contain the other's ("Canberra" and
"the city of Canberra"). UF then runs over the groups as above: the largest group (A) gets
p, the next (B) the rest. Other generation (sampling mode, the verbalized baselines) is
missing, as on an engine without it.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Mapping, Sequence

from fastapi import FastAPI

from service.api.app import create_app
from service.calibration import freeform
from service.calibration.prompts import Prompt
from service.config import Settings
from service.engines.base import EngineError, EngineFeatureMissing, GenerationParams
from tests.fakes import FakeCall, FakeEngine, parse_prompt

_P = re.compile(r"p=([0-9]*\.?[0-9]+)")
_ANSWERS = re.compile(r"answers=\[([^\]]*)\]")
_JUDGE_LINES = re.compile(r"Answer 1: (.*)\nAnswer 2: (.*)\n")


def _log(p: float) -> float:
    return math.log(p) if p > 0 else -math.inf


def letters(prompt: Prompt, labels: Sequence[str]) -> Mapping[str, float]:
    """Step 1: A with p, B with 1 - p; a chain step: stay with the substituted start."""
    view = parse_prompt(prompt)
    if view.substituted is not None:
        return {lab: (0.0 if lab == view.substituted else -10.0) for lab in labels}
    found = _P.search(view.question)
    p = float(found.group(1)) if found else 0.6
    return {"A": _log(p), "B": _log(1.0 - p)}


def _contains(outer: str, inner: str) -> bool:
    """``inner``'s normalised words appear, in order and whole, in ``outer``'s."""
    a, b = freeform.normalize_answer(outer), freeform.normalize_answer(inner)
    return bool(b) and f" {b} " in f" {a} "


def generate(prompt: Prompt, params: GenerationParams) -> Sequence[str]:
    """Free-form samples and judge verdicts as described above; nothing else."""
    if prompt.answer_prefix == freeform.SAMPLE_PREFIX:
        found = _ANSWERS.search(prompt.user)
        answers = [a.strip() for a in found.group(1).split("|")] if found else ["42"]
        return [f" {answers[i % len(answers)]}." for i in range(params.n)]
    if prompt.answer_prefix == freeform.JUDGE_PREFIX:
        pair = _JUDGE_LINES.search(prompt.user)
        first, second = pair.groups() if pair else ("", "")
        return ["yes" if _contains(first, second) or _contains(second, first) else "no"]
    raise EngineFeatureMissing("text generation")


def failure(call: FakeCall) -> BaseException | None:
    """An engine error for a question that asks for one."""
    if any("engine-error" in view.question for view in call.views):
        return EngineError("the fake engine failed: the question asked for an engine error")
    return None


def fake_engine() -> FakeEngine:
    """The scripted white-box engine described above."""
    return FakeEngine(letters=letters, generate=generate, model="fake-model", fail=failure)


def build_app(settings: Settings | None = None) -> FastAPI:
    """The real app over the fake engine."""
    return create_app(settings or Settings(), engine=fake_engine())


def main() -> None:
    import uvicorn

    from service.logs import configure_logging

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    settings = Settings()
    configure_logging(settings.log_level)
    uvicorn.run(
        build_app(settings), host=args.host, port=args.port, log_config=None, log_level="info"
    )


if __name__ == "__main__":
    main()
