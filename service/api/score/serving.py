"""``POST /score``: validate, call the scorer, shape the reply, record it.

Both tasks go through ``score_request``: a multiple-choice question to ``scoring.score``,
a free-form one (no options) to ``scoring_freeform.score_freeform``; the reply has the
same shape, with ``given``, ``groups`` and ``free_form`` filled where they apply."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from service.api.admission import DeadlineExceeded, DeadlineUnreachable, Overloaded
from service.api.common import ERROR_RESPONSES, AppState, app_state, error_response
from service.api.errors import validation_reply
from service.api.feedback.serving import record_score
from service.api.json_body import StrictJSONRoute
from service.api.limits import score_limit_issues
from service.api.score.protocol import (
    AnswerOut,
    BatchItem,
    BatchItemError,
    BatchScoreRequest,
    BatchScoreResponse,
    CalibratorOut,
    FreeformUsageOut,
    GivenOut,
    GroupOut,
    ScoreRequest,
    ScoreResponse,
    UsageOut,
    freeform_options,
    option_index,
    request_issues,
)
from service.calibration import recalibrate
from service.calibration.budget import (
    freeform_min_prompts,
    freeform_planned_prompts,
    freeform_prompt_size,
    min_prompts,
    planned_prompts,
    prompt_size,
)
from service.calibration.prompts import Question
from service.config import Settings
from service.recalibration import Active
from service.scoring import ScoreParams, ScoreResult, score
from service.scoring_freeform import FreeformContext, FreeformResult, score_freeform
from service.store import CalibratorKey, Task
from service.telemetry import score_log_fields

log = logging.getLogger("ufcal.score")
router = APIRouter(route_class=StrictJSONRoute)

Calibrate = Callable[[float], float]


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


def _calibrator_out(active: Active | None) -> CalibratorOut | None:
    if active is None:
        return None
    return CalibratorOut(
        version=active.version, kind=active.calibrator.kind, labels=active.record.labels
    )


def to_response(
    result: ScoreResult,
    request_id: str,
    applied: tuple[float, Active | None] | None = None,
    given: GivenOut | None = None,
) -> ScoreResponse:
    """Shape a scoring result into the wire format (options by label); ``applied`` is the
    returned confidence and the calibrator behind it (default: the raw score, none)."""
    labels = result.question.labels
    confidence, active = applied if applied is not None else (result.confidence, None)
    return ScoreResponse(
        id=request_id,
        task="multiple_choice",
        answer=AnswerOut(
            index=result.answer,
            label=labels[result.answer],
            text=result.question.options[result.answer],
        ),
        confidence=confidence,
        raw_confidence=result.confidence,
        calibrator=_calibrator_out(active),
        uncertainty=result.uncertainty,
        distribution=dict(zip(labels, result.distribution, strict=True)),
        fidelity=dict(zip(labels, result.fidelity, strict=True)),
        chains={labels[s]: [labels[i] for i in chain] for s, chain in result.chains.items()},
        method=result.method,
        mode=result.mode,
        model=result.model,
        usage=UsageOut(**vars(result.usage)),
        latency_ms=round(result.latency_s * 1000.0, 3),
        given=given,
    )


def given_option(result: ScoreResult, index: int, calibrate: Calibrate) -> GivenOut:
    """A given option's confidence: the method's score of that option, calibrated as the
    answer's is. Raises ``ValueError`` for a method that scores its own answer only
    (``request_issues`` refuses those before any engine call)."""
    confidences = result.option_confidences
    if confidences is None:
        raise ValueError(f"method {result.method} gives no confidence to a given option")
    raw = confidences[index]
    return GivenOut(
        answer=result.question.options[index],
        index=index,
        match="option",
        confidence=calibrate(raw),
        raw_confidence=raw,
    )


def freeform_response(
    result: FreeformResult, request_id: str, calibrate: Calibrate, active: Active | None
) -> ScoreResponse:
    """Shape a free-form result: the UF part over the groups as the multiple-choice reply,
    with the groups, the given answer and the grouping's counts; ``calibrate`` maps every
    raw confidence (answer, groups, given) with the same calibrator ``active``."""
    mcq = result.uf
    labels = mcq.question.labels
    given = None
    if result.given_group is not None and result.given_confidence is not None:
        given = GivenOut(
            answer=result.given_answer or "",
            index=result.given_group,
            match=result.given_match or "absent",
            confidence=calibrate(result.given_confidence),
            raw_confidence=result.given_confidence,
        )
    groups = [
        GroupOut(
            label=labels[i],
            representative=g.representative,
            members=list(g.members),
            count=g.count,
            confidence=calibrate(g.confidence),
            raw_confidence=g.confidence,
            given=g.given,
        )
        for i, g in enumerate(result.groups)
    ]
    usage = UsageOut(**{**vars(result.usage), "budget_hit": result.budget_hit})
    grouping = FreeformUsageOut(
        samples_taken=result.samples_taken,
        samples_usable=result.samples_usable,
        judge_prompts=result.judge_prompts,
        judge_rounds=result.judge_rounds,
        judge_skipped=result.judge_skipped,
        dropped_groups=result.dropped_groups,
        dropped_samples=result.dropped_samples,
        largest_group_share=result.largest_group_share,
        semantic_entropy=result.semantic_entropy,
        semantic_entropy_normalized=result.semantic_entropy_normalized,
        abstention=result.extra_option,
    )
    base = to_response(mcq, request_id, (calibrate(result.confidence), active))
    return base.model_copy(
        update={
            "task": "free_form",
            "given": given,
            "groups": groups,
            "free_form": grouping,
            "usage": usage,
            "latency_ms": round(result.latency_s * 1000.0, 3),
        }
    )


def _calibration(
    state: AppState, result: ScoreResult, task: Task
) -> tuple[Calibrate, Active | None]:
    """The calibrator of the result's (model, method, mode) for its task, taken once so that
    every confidence of one reply goes through the same version; identity when none is
    active. A free-form score is only ever recalibrated by a free-form calibrator."""
    recalibrator = state.recalibrator
    active = None if recalibrator is None else recalibrator.active(result_key(result, task))
    if active is None:
        return (lambda raw: raw), None
    calibrator = active.calibrator
    return (lambda raw: recalibrate.apply(calibrator, raw)), active


def result_key(result: ScoreResult, task: Task) -> CalibratorKey:
    """The calibrator key of a result: (model, method, mode, task)."""
    return (result.model, result.method, result.mode, task)


async def _score(
    state: AppState, body: ScoreRequest, params: ScoreParams, request_id: str
) -> ScoreResponse:
    """Run the task's scorer and shape its reply (every confidence calibrated)."""
    engine = state.ready_engine()
    if body.options is None:
        context = FreeformContext(template=state.template, judge=state.freeform_judge)
        answer = body.answer if isinstance(body.answer, str) else None
        freeform = await score_freeform(body.question, engine, params, answer, context)
        calibrate, active = _calibration(state, freeform.uf, "free_form")
        return freeform_response(freeform, request_id, calibrate, active)
    result = await score(
        Question(body.question, tuple(body.options)), engine, params, state.template
    )
    calibrate, active = _calibration(state, result, "multiple_choice")
    given = None
    if body.answer is not None:
        given = given_option(result, option_index(body.options, body.answer), calibrate)
    return to_response(result, request_id, (calibrate(result.confidence), active), given)


def _log_options(body: ScoreRequest, response: ScoreResponse | None) -> list[str] | None:
    """The option texts the log line shows: the request's, or a free-form question's UF
    options (the groups, then the abstention)."""
    if body.options is not None:
        return body.options
    return None if response is None else freeform_options(response)


async def score_request(
    state: AppState, body: ScoreRequest, max_prompts: int | None = None
) -> ScoreResponse | JSONResponse:
    """Score one validated request (either task), record its metrics and log line;
    ``max_prompts``: the default work budget fitted to the deadline (``fitted_budget``),
    None: as configured.

    The fields' joint rules (``request_issues``) are checked here too, so a caller that
    builds a ``ScoreRequest`` itself gets the same 422 as ``POST /score`` would send."""
    started = time.perf_counter()
    request_id = body.id or uuid.uuid4().hex
    params = score_params(body, state.settings, max_prompts)
    if issues := request_issues(body):
        return validation_reply(issues)
    telemetry = state.telemetry
    with telemetry.in_flight():
        try:
            response = await _score(state, body, params, request_id)
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
                        task=body.task,
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
    response.usage.max_prompts = params.max_prompts
    response.usage.budget_fitted = max_prompts is not None and body.max_prompts is None
    if (conflict := await record_score(state, body, response)) is not None:
        return conflict  # 409: this id already has feedback
    usage = response.usage
    telemetry.observe_score(
        response.method,
        response.mode,
        200,
        response.latency_ms / 1000.0,
        usage.engine_calls,
        usage.prompts,
        response.confidence,
        response.uncertainty,
        usage.unparsed,
    )
    if log.isEnabledFor(logging.INFO):  # the fields cost more than the check
        log.info(
            "scored",
            extra={
                "fields": score_log_fields(
                    request_id=request_id,
                    model=response.model,
                    method=response.method,
                    mode=response.mode,
                    task=response.task,
                    answer=response.answer.label,
                    confidence=response.confidence,
                    uncertainty=response.uncertainty,
                    engine_calls=usage.engine_calls,
                    latency_ms=response.latency_ms,
                    status=200,
                    log_text=state.settings.log_text,
                    question=body.question,
                    options=_log_options(body, response),
                    given=None
                    if response.given is None
                    else {
                        "index": response.given.index,
                        "match": response.given.match,
                        "confidence": response.given.confidence,
                    },
                )
            },
        )
    return response


def score_issues(
    body: ScoreRequest, settings: Settings, prefix: tuple[str | int, ...] = ("body",)
) -> list[dict[str, object]]:
    """Everything wrong with one question before it is admitted: the fields' joint rules
    (``request_issues``) and the configured limits (``score_limit_issues``)."""
    return [*request_issues(body, prefix), *score_limit_issues(body, settings, prefix)]


@router.post("/score", response_model=ScoreResponse, responses=ERROR_RESPONSES)
async def score_question(
    body: ScoreRequest, state: Annotated[AppState, Depends(app_state)]
) -> ScoreResponse | JSONResponse:
    """Answer a question, multiple choice or free-form, with a calibrated confidence (and
    score a given answer)."""
    if issues := score_issues(body, state.settings):
        raise RequestValidationError(issues)
    return await admitted_score(state, body)


async def admitted_score(state: AppState, body: ScoreRequest) -> ScoreResponse | JSONResponse:
    """Score a request within its limits as ``POST /score`` does: under admission and the
    deadline, a default budget fitted to it; a refusal (429, 504, 422) is the reply. The
    chat sidecar scores its turns through this too."""
    started = time.perf_counter()
    timeout_s = state.settings.request_timeout_s
    size = prompt_size_of(body, state.settings)
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
    default budget fitted to the deadline is ``max_prompts``): admission weighs it by this.
    A free-form question: its samples' prompt, the judge's pairs (none with the NLI judge,
    which uses no engine) and UF over its groups (``budget.freeform_planned_prompts``)."""
    budget = body.max_prompts or max_prompts or settings.max_prompts_per_question
    if body.options is None:
        return freeform_planned_prompts(
            body.method,
            body.samples or settings.samples,
            budget,
            given=body.answer is not None,
            judge_prompts_per_pair=0 if settings.freeform_nli_model is not None else 1,
        )
    return planned_prompts(body.method, len(body.options), budget)


def prompt_size_of(body: ScoreRequest, settings: Settings) -> float:
    """The relative engine cost of one of the question's prompts (``budget.prompt_size``;
    free-form: ``budget.freeform_prompt_size``)."""
    question_bytes = len(body.question.encode())
    if body.options is None:
        given = body.answer.encode() if isinstance(body.answer, str) else None
        samples = body.samples or settings.samples
        return freeform_prompt_size(question_bytes, samples, None if given is None else len(given))
    return prompt_size(question_bytes, [len(o.encode()) for o in body.options])


#: A fitted budget aims at half the deadline: the warm prediction is within 0.5x-2x, and
#: under load a large question was seen to run 1.4x its prediction (docs/performance.md).
FIT_SHARE = 0.5


def fitted_budget(
    state: AppState, body: ScoreRequest, timeout_s: float, size: float, share: float = 1.0
) -> int | None:
    """The default work budget lowered so that the question, alone on the engine, is
    predicted to finish within ``FIT_SHARE`` of its deadline at the measured rate (with
    ``share`` of the engine), or None when it fits as it is, the rate is not measured yet
    or the request sets ``max_prompts`` itself (a budget the client chose stands: if it
    cannot fit, the reply is 422 ``deadline_unreachable``). Never below the method's
    minimum: a question that cannot fit even so is refused by admission with that 422."""
    if body.max_prompts is not None:
        return None
    within = state.admission.prompts_within(timeout_s * share, size, FIT_SHARE)
    planned = planned_work(body, state.settings)
    if within is None or within >= planned:
        return None
    need = freeform_min_prompts(body.method) if body.options is None else min_prompts(body.method)
    return max(within, need)


def _fitted_batch(
    state: AppState, items: list[ScoreRequest], timeout_s: float
) -> tuple[list[int | None], int, float]:
    """The items' work budgets fitted to the batch's one deadline (each default budget to
    its share of the planned work, ``fitted_budget``), the batch's planned prompts under
    them and their mean size per prompt."""
    sizes = [prompt_size_of(item, state.settings) for item in items]
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
        for issue in score_issues(item, settings, ("body", "items", i))
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
