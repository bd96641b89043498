"""``POST /feedback`` and ``GET /calibration``, the store's life cycle, and recording each
successful score: validate, call the store, publish the live calibration, shape replies."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse

from service.api.common import (
    AppState,
    ErrorResponse,
    ServiceUnavailable,
    ValidationErrorResponse,
    app_state,
)
from service.api.feedback.protocol import (
    CalibrationResponse,
    ConfidenceCalibration,
    FeedbackRequest,
    FeedbackResponse,
    ReliabilityBinOut,
)
from service.api.json_body import StrictJSONRoute
from service.api.score.protocol import ScoreRequest, ScoreResponse, freeform_options
from service.api.security import CHALLENGE, ApiKeys, bearer_token
from service.config import Settings
from service.recalibration import RecalibrationConfig, Recalibrator, source_id
from service.store import (
    TASKS,
    CalibratorRecord,
    FeedbackExists,
    GoldIndexOutOfRange,
    LiveCalibration,
    ScoreConflict,
    ScoreRecord,
    Store,
    StoreUnavailable,
    Task,
    UnknownScore,
)

log = logging.getLogger("ufcal.feedback")
router = APIRouter(route_class=StrictJSONRoute)

FEEDBACK_RESPONSES: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorResponse, "description": "No score with this id."},
    403: {
        "model": ErrorResponse,
        "description": "UFCAL_FEEDBACK_KEYS is set and this API key is not one of them.",
    },
    409: {"model": ErrorResponse, "description": "This id already has feedback."},
    422: {
        "model": ValidationErrorResponse,
        "description": "Invalid input, not exactly one of correct / gold_index, or gold_index "
        "out of range for the scored question (loc names the field).",
    },
    503: {
        "model": ErrorResponse,
        "description": "The database is unreachable or the store is not open; nothing was "
        "recorded (retry after Retry-After seconds).",
    },
}


# -- life cycle (called from the app's lifespan) ------------------------------------------


async def open_store(state: AppState, calibrators: Sequence[CalibratorRecord] = ()) -> None:
    """Open the store (migrating its database), publish the live calibration it holds, and
    start the calibrators (``calibrators``: those of UFCAL_CALIBRATORS files, imported once).

    Fails with ``StoreUnavailable`` naming the database host (never the password) when the
    database cannot be reached: the service does not start without its store."""
    settings = state.settings
    database = settings.database()
    try:
        state.store = await Store.open(
            database,
            window=settings.calibration_window,
            n_bins=settings.calibration_bins,
            keep_text=settings.log_text,
            refresh_s=settings.live_refresh_s,
            score_buffer=settings.db_score_buffer,
            timeout_s=settings.db_timeout_s,
            pool_size=settings.db_pool_size,
            observer=state.telemetry,
        )
    except StoreUnavailable as exc:
        log.error("store not opened: %s", exc)
        raise
    report = state.store.calibration()
    state.telemetry.set_store_up(True)
    for task in TASKS:
        _publish(state, state.store, task)
    state.recalibrator = Recalibrator(
        state.store,
        state.telemetry,
        RecalibrationConfig(
            online=settings.recalibrate == "online",
            every=settings.recalibrate_every,
            min_labels=settings.recalibrate_min_labels,
            min_class=settings.recalibrate_min_class,
            window=settings.calibration_window,
            max_source_share=settings.recalibrate_max_source_share,
        ),
    )
    await state.recalibrator.start(calibrators)
    log.info(
        "store open",
        extra={"fields": {"db": state.store.backend.where(), "window_n": report.n}},
    )


async def close_store(state: AppState) -> None:
    """Close the store (queued writes and running refits finish first)."""
    if state.recalibrator is not None:
        await state.recalibrator.close()
    if state.store is not None:
        store, state.store = state.store, None
        await store.close()


def _publish(state: AppState, store: Store, task: Task) -> LiveCalibration:
    """Publish a task's live window to the metrics; its returned-confidence report."""
    report = store.calibration(task)
    state.telemetry.set_live_calibration(report, "returned", task)
    state.telemetry.set_live_calibration(store.raw_calibration(task), "raw", task)
    return report


def _store(state: AppState) -> Store:
    if state.store is None:
        raise ServiceUnavailable("the score store is not open")
    return state.store


# -- recording scores (called by POST /score) ---------------------------------------------


async def record_score(
    state: AppState, body: ScoreRequest, response: ScoreResponse
) -> JSONResponse | None:
    """Save a successful score; a 409 reply if its id already has feedback, else ``None``.

    The stored answer is the one the reply scores for the client: the given answer when
    the request had one (so /feedback judges it, and the calibrators learn from it), else
    the model's. A free-form score is kept like a multiple-choice one whose options are
    those UF ran over (the groups' representatives, then the abstention if one was added);
    the given answer's index is its group's. The ``task`` column keeps the two tasks
    apart (live windows, calibrators).

    While the database is unreachable the score waits in the store's queue (or is dropped
    and counted when the queue is full); neither fails the score.
    """
    if state.store is None:
        return None
    options = freeform_options(response) if body.options is None else body.options
    given = response.given
    if given is not None and given.index is not None:
        answer_index, confidence, raw = given.index, given.confidence, given.raw_confidence
    else:
        answer_index = response.answer.index
        confidence, raw = response.confidence, response.raw_confidence
    record = ScoreRecord(
        id=response.id,
        model=response.model,
        method=response.method,
        mode=response.mode,
        answer_index=answer_index,
        confidence=confidence,
        uncertainty=response.uncertainty,
        n_options=len(options),
        created_at=time.time(),
        question=body.question,
        options=options,
        raw_confidence=raw,
        calibrator_version=None if response.calibrator is None else response.calibrator.version,
        task=response.task,
    )
    try:
        # An id the service made up cannot have feedback yet: /score need not wait for the
        # commit. A client's own id may be taken (409), so that /score waits for its batch.
        await state.store.save_score(record, wait=body.id is not None)
    except ScoreConflict as exc:
        state.telemetry.observe_error(
            response.method, response.mode, 409, response.latency_ms / 1000.0
        )
        log.warning("score not saved", extra={"fields": {"id": response.id, "status": 409}})
        return JSONResponse({"detail": str(exc)}, status_code=409)
    except StoreUnavailable as exc:  # closing down
        log.error("score not saved: %s", exc, extra={"fields": {"id": response.id}})
    return None


# -- endpoints ------------------------------------------------------------------------------


def _confidence_out(report: LiveCalibration) -> ConfidenceCalibration:
    return ConfidenceCalibration(
        accuracy=report.accuracy,
        ece=report.ece,
        ipr=report.ipr,
        ce=report.ce,
        brier=report.brier,
        auroc=report.auroc,
        bins=[
            ReliabilityBinOut(
                lower=b.lower,
                upper=b.upper,
                count=b.count,
                accuracy=b.accuracy,
                confidence=b.confidence,
            )
            for b in report.bins
        ],
    )


def _calibration_out(
    task: Task, report: LiveCalibration, raw: LiveCalibration
) -> CalibrationResponse:
    returned = _confidence_out(report)
    return CalibrationResponse(
        task=task,
        n=report.n,
        window=report.window,
        n_bins=report.n_bins,
        **returned.model_dump(),
        raw=_confidence_out(raw),
        returned=returned,
    )


def _feedback_source(request: Request, settings: Settings) -> str | JSONResponse | None:
    """Who sent a label: a hash of its API key when keys are in use (else None), or the
    401/403 reply when UFCAL_FEEDBACK_KEYS does not include the key."""
    token = bearer_token(request.scope)
    allowed = settings.feedback_key_list()
    if allowed:
        if token is None:
            return JSONResponse(
                {"detail": "missing API key: send Authorization: Bearer <key>"},
                status_code=401,
                headers=CHALLENGE,
            )
        if not ApiKeys(allowed).accepts(token):
            return JSONResponse(
                {"detail": "this API key may not send feedback (UFCAL_FEEDBACK_KEYS)"},
                status_code=403,
            )
    if token is None or not (settings.api_key_list() or allowed):
        return None
    return source_id(token)


@router.post(
    "/feedback",
    status_code=201,
    response_model=FeedbackResponse,
    responses=FEEDBACK_RESPONSES,
)
async def post_feedback(
    body: FeedbackRequest, request: Request, state: Annotated[AppState, Depends(app_state)]
) -> FeedbackResponse | JSONResponse:
    """Record whether an earlier answer was right; on disk (or committed by PostgreSQL)
    before the reply."""
    store = _store(state)
    source = _feedback_source(request, state.settings)
    if isinstance(source, JSONResponse):
        return source
    try:
        record = await store.add_feedback(
            body.id, correct=body.correct, gold_index=body.gold_index, source=source
        )
    except UnknownScore as exc:
        return JSONResponse({"detail": str(exc)}, status_code=404)
    except FeedbackExists as exc:
        return JSONResponse({"detail": str(exc)}, status_code=409)
    except GoldIndexOutOfRange as exc:
        issue = {"loc": ["body", "gold_index"], "msg": str(exc), "type": "value_error"}
        return JSONResponse({"detail": [issue]}, status_code=422)
    except StoreUnavailable as exc:
        log.error("feedback not saved: %s", exc, extra={"fields": {"id": body.id}})
        return JSONResponse(
            {"detail": "the feedback store is unavailable; nothing was recorded, retry later"},
            status_code=503,
            headers={"Retry-After": "5"},
        )
    state.telemetry.observe_feedback(record.correct)
    report = _publish(state, store, record.task)
    if state.recalibrator is not None:
        state.recalibrator.on_feedback(record)
    log.info(
        "feedback",
        extra={
            "fields": {
                "id": record.id,
                "task": record.task,
                "correct": record.correct,
                "gold_index": record.gold_index,
                "confidence": record.confidence,
                "window_n": report.n,
                "live_ece": report.ece,
            }
        },
    )
    return FeedbackResponse(
        id=record.id,
        correct=record.correct,
        gold_index=record.gold_index,
        answer_index=record.answer_index,
        confidence=record.confidence,
        window_size=report.n,
        task=record.task,
    )


@router.get(
    "/calibration",
    response_model=CalibrationResponse,
    responses={503: {"model": ErrorResponse, "description": "The store is not open."}},
)
async def get_calibration(
    state: Annotated[AppState, Depends(app_state)],
    task: Annotated[
        Task,
        Query(description="Whose live window: multiple_choice (the default) or free_form."),
    ] = "multiple_choice",
) -> CalibrationResponse:
    """Live calibration over one task's last scores with feedback, with the reliability
    bins, for the returned confidence (top level and ``returned``) and the raw scores
    (``raw``)."""
    store = _store(state)
    return _calibration_out(task, store.calibration(task), store.raw_calibration(task))
