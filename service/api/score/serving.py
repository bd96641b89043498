"""``POST /score``: validate, call the scorer, shape the reply, record it."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from service.api.admission import DeadlineExceeded, DeadlineUnreachable, Overloaded
from service.api.common import ERROR_RESPONSES, AppState, app_state, error_response
from service.api.feedback.serving import record_score
from service.api.json_body import StrictJSONRoute
from service.api.limits import check_score_limits, score_limit_issues
from service.api.score.protocol import (
    AnswerOut,
    BatchItem,
    BatchItemError,
    BatchScoreRequest,
    BatchScoreResponse,
    CalibratorOut,
    ScoreRequest,
    ScoreResponse,
    UsageOut,
)
from service.calibration.budget import min_prompts, planned_prompts, prompt_size
from service.calibration.prompts import Question
from service.config import Settings
from service.recalibration import Active
from service.scoring import ScoreParams, ScoreResult, score
from service.telemetry import score_log_fields

log = logging.getLogger("ufcal.score")
router = APIRouter(route_class=StrictJSONRoute)


def score_params(
    body: ScoreRequest, settings: Settings, max_prompts: int | None = None
) -> ScoreParams:
    """Per-request parameters over the configured defaults; ``max_prompts`` replaces the
    default work budget (``fitted_budget``) when the request sets none."""
    if max_prompts is None:
        max_prompts = settings.max_prompts_per_question
    return ScoreParams(
        method=body.method,
        mode=body.mode or settings.mode,
        samples=body.samples or settings.samples,
        temperature=body.temperature or settings.temperature,
        tau=body.tau or settings.tau,
        eps=settings.eps if body.eps is None else body.eps,
        skip_mass=settings.skip_mass,
        max_prompts=max_prompts if body.max_prompts is None else body.max_prompts,
    )


def to_response(
    result: ScoreResult, request_id: str, applied: tuple[float, Active | None] | None = None
) -> ScoreResponse:
    """Shape a scoring result into the wire format (options by label); ``applied`` is the
    returned confidence and the calibrator behind it (default: the raw score, none)."""
    labels = result.question.labels
    confidence, active = applied if applied is not None else (result.confidence, None)
    return ScoreResponse(
        id=request_id,
        answer=AnswerOut(
            index=result.answer,
            label=labels[result.answer],
            text=result.question.options[result.answer],
        ),
        confidence=confidence,
        raw_confidence=result.confidence,
        calibrator=None
        if active is None
        else CalibratorOut(
            version=active.version,
            kind=active.calibrator.kind,
            labels=active.record.labels,
        ),
        uncertainty=result.uncertainty,
        distribution=dict(zip(labels, result.distribution, strict=True)),
        fidelity=dict(zip(labels, result.fidelity, strict=True)),
        chains={labels[s]: [labels[i] for i in chain] for s, chain in result.chains.items()},
        method=result.method,
        mode=result.mode,
        model=result.model,
        usage=UsageOut(**vars(result.usage)),
        latency_ms=round(result.latency_s * 1000.0, 3),
    )


async def score_request(
    state: AppState, body: ScoreRequest, max_prompts: int | None = None
) -> ScoreResponse | JSONResponse:
    """Score one validated request, record its metrics and log line; ``max_prompts``: the
    default work budget fitted to the deadline (``fitted_budget``), None: as configured."""
    started = time.perf_counter()
    request_id = body.id or uuid.uuid4().hex
    params = score_params(body, state.settings, max_prompts)
    question = Question(body.question, tuple(body.options))
    telemetry = state.telemetry
    with telemetry.in_flight():
        try:
            result = await score(question, state.ready_engine(), params, state.template)
        except Exception as exc:
            reply = error_response(exc, params.mode)
            elapsed = time.perf_counter() - started
            telemetry.observe_error(params.method, params.mode, reply.status_code, elapsed)
            log.log(
                logging.ERROR if reply.status_code == 500 else logging.WARNING,
                "score failed",
                exc_info=reply.status_code == 500,
                extra={
                    "fields": score_log_fields(
                        request_id=request_id,
                        model=state.engine.model if state.engine else "",
                        method=params.method,
                        mode=params.mode,
                        answer=None,
                        confidence=None,
                        uncertainty=None,
                        engine_calls=0,
                        latency_ms=elapsed * 1000.0,
                        status=reply.status_code,
                        error=bytes(reply.body).decode(errors="replace"),
                        log_text=state.settings.log_text,
                        question=body.question,
                        options=body.options,
                    )
                },
            )
            return reply
    applied = (
        state.recalibrator.apply((result.model, result.method, result.mode), result.confidence)
        if state.recalibrator is not None
        else None
    )
    response = to_response(result, request_id, applied)
    response.usage.max_prompts = params.max_prompts
    response.usage.budget_fitted = max_prompts is not None and body.max_prompts is None
    if (conflict := await record_score(state, body, response)) is not None:
        return conflict  # 409: this id already has feedback
    usage = result.usage
    telemetry.observe_score(
        result.method,
        result.mode,
        200,
        result.latency_s,
        usage.engine_calls,
        usage.prompts,
        response.confidence,
        result.uncertainty,
        usage.unparsed,
    )
    if log.isEnabledFor(logging.INFO):  # the fields cost more than the check
        log.info(
            "scored",
            extra={
                "fields": score_log_fields(
                    request_id=request_id,
                    model=result.model,
                    method=result.method,
                    mode=result.mode,
                    answer=response.answer.label,
                    confidence=response.confidence,
                    uncertainty=result.uncertainty,
                    engine_calls=usage.engine_calls,
                    latency_ms=response.latency_ms,
                    status=200,
                    log_text=state.settings.log_text,
                    question=body.question,
                    options=body.options,
                )
            },
        )
    return response


@router.post("/score", response_model=ScoreResponse, responses=ERROR_RESPONSES)
async def score_question(
    body: ScoreRequest, state: Annotated[AppState, Depends(app_state)]
) -> ScoreResponse | JSONResponse:
    """Answer a multiple-choice question with a calibrated confidence."""
    check_score_limits(body, state.settings)
    return await admitted_score(state, body)


async def admitted_score(state: AppState, body: ScoreRequest) -> ScoreResponse | JSONResponse:
    """Score a request within its limits as ``POST /score`` does: under admission and the
    deadline, a default budget fitted to it; a refusal (429, 504, 422) is the reply. The
    chat sidecar scores its turns through this too."""
    started = time.perf_counter()
    timeout_s = state.settings.request_timeout_s
    size = prompt_size_of(body)
    budget = fitted_budget(state, body, timeout_s, size)
    try:
        return await state.admission.run(
            lambda: score_request(state, body, budget),
            cost=1,
            planned=planned_work(body, state.settings, budget),
            size=size,
            measure=_prompts_sent,
            timeout_s=timeout_s,
        )
    except (Overloaded, DeadlineExceeded, DeadlineUnreachable) as exc:
        mode = body.mode or state.settings.mode
        reply = error_response(exc, mode)
        state.telemetry.observe_error(
            body.method, mode, reply.status_code, time.perf_counter() - started
        )
        log.warning("score refused", extra={"fields": {"status": reply.status_code}})
        return reply


def planned_work(body: ScoreRequest, settings: Settings, max_prompts: int | None = None) -> int:
    """The prompts a question is planned at (its worst case under its work budget; a
    default budget fitted to the deadline is ``max_prompts``): admission weighs it by this."""
    budget = body.max_prompts or max_prompts or settings.max_prompts_per_question
    return planned_prompts(body.method, len(body.options), budget)


def prompt_size_of(body: ScoreRequest) -> float:
    """The relative engine cost of one of the question's prompts (``budget.prompt_size``)."""
    return prompt_size(len(body.question.encode()), [len(o.encode()) for o in body.options])


def fitted_budget(
    state: AppState, body: ScoreRequest, timeout_s: float, size: float, share: float = 1.0
) -> int | None:
    """The default work budget lowered so that the question, alone on the engine, is
    predicted to finish within its deadline at the measured rate (with ``share`` of the
    engine), or None when it fits as it is, the rate is not measured yet or the request
    sets ``max_prompts`` itself (a budget the client chose stands: if it cannot fit, the
    reply is 422 ``deadline_unreachable``). Never below the method's minimum: a question
    that cannot fit even so is refused by admission with that 422."""
    if body.max_prompts is not None:
        return None
    within = state.admission.prompts_within(timeout_s * share, size)
    planned = planned_work(body, state.settings)
    if within is None or within >= planned:
        return None
    return max(within, min_prompts(body.method))


def _fitted_batch(
    state: AppState, items: list[ScoreRequest], timeout_s: float
) -> tuple[list[int | None], int, float]:
    """The items' work budgets fitted to the batch's one deadline (each default budget to
    its share of the planned work, ``fitted_budget``), the batch's planned prompts under
    them and their mean size per prompt."""
    sizes = [prompt_size_of(item) for item in items]
    units = [planned_work(item, state.settings) * s for item, s in zip(items, sizes, strict=True)]
    total = sum(units) or 1.0
    budgets = [
        fitted_budget(state, item, timeout_s, s, share=u / total)
        for item, s, u in zip(items, sizes, units, strict=True)
    ]
    planned = [
        planned_work(item, state.settings, b) for item, b in zip(items, budgets, strict=True)
    ]
    size = sum(p * s for p, s in zip(planned, sizes, strict=True)) / max(1, sum(planned))
    return budgets, sum(planned), size


def _prompts_sent(outcome: ScoreResponse | JSONResponse | None) -> int | None:
    return outcome.usage.prompts if isinstance(outcome, ScoreResponse) else None


def _batch_item(index: int, outcome: ScoreResponse | JSONResponse) -> BatchItem:
    if isinstance(outcome, ScoreResponse):
        return BatchItem(index=index, result=outcome)
    detail = json.loads(bytes(outcome.body)).get("detail", "")
    if isinstance(detail, list):  # validation issues: "loc: msg; ..."
        detail = "; ".join(
            ".".join(str(p) for p in issue.get("loc", [])[1:]) + ": " + str(issue.get("msg", ""))
            for issue in detail
        )
    return BatchItem(
        index=index, error=BatchItemError(status=outcome.status_code, detail=str(detail))
    )


@router.post("/score/batch", response_model=BatchScoreResponse, responses=ERROR_RESPONSES)
async def score_batch(
    body: BatchScoreRequest, state: Annotated[AppState, Depends(app_state)]
) -> BatchScoreResponse | JSONResponse:
    """Score many questions at once; results come back in order, each with its own status.

    All items are in flight together, so the engine batches their prompts. The batch takes
    one admission slot per item (at most all of them) and the request deadline covers it:
    items still running at the deadline come back as 504, the finished ones as usual."""
    settings = state.settings
    if len(body.items) > settings.max_batch_size:
        raise RequestValidationError(
            [
                {
                    "loc": ("body", "items"),
                    "msg": f"at most {settings.max_batch_size} items per batch "
                    "(UFCAL_MAX_BATCH_SIZE)",
                    "type": "too_long",
                    "input": len(body.items),
                }
            ]
        )
    issues = [
        issue
        for i, item in enumerate(body.items)
        for issue in score_limit_issues(item, settings, ("body", "items", i))
    ]
    if issues:
        raise RequestValidationError(issues)

    mode = settings.mode
    tasks: list[asyncio.Task[ScoreResponse | JSONResponse]] = []
    timeout_s = settings.request_timeout_s
    budgets, planned, size = _fitted_batch(state, body.items, timeout_s)

    async def run_items() -> int:
        tasks.extend(
            asyncio.create_task(score_request(state, item, budget))
            for item, budget in zip(body.items, budgets, strict=True)
        )
        await asyncio.wait(tasks)
        return sum(_prompts_sent(t.result()) or 0 for t in tasks)

    try:
        await state.admission.run(
            run_items,
            cost=len(body.items),
            planned=planned,
            size=size,
            measure=lambda sent: sent,
            timeout_s=timeout_s,
        )
    except (Overloaded, DeadlineUnreachable) as exc:
        return error_response(exc, mode)
    except DeadlineExceeded as exc:
        if not tasks:  # the deadline passed while the batch was queued
            return error_response(exc, mode)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        late = error_response(exc, mode)
        outcomes = [
            task.result() if task.done() and not task.cancelled() else late for task in tasks
        ]
    else:
        outcomes = [task.result() for task in tasks]
    results = [_batch_item(i, outcome) for i, outcome in enumerate(outcomes)]
    failed = sum(1 for r in results if r.error is not None)
    return BatchScoreResponse(results=results, succeeded=len(results) - failed, failed=failed)
