"""``POST /feedback`` and ``GET /calibration``, the store's life cycle, and recording each
successful score: validate, call the store, publish the live calibration, shape replies."""

from __future__ import annotations

import logging
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends
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
    FeedbackRequest,
    FeedbackResponse,
    ReliabilityBinOut,
)
from service.api.score.protocol import ScoreRequest, ScoreResponse
from service.store import (
    FeedbackExists,
    GoldIndexOutOfRange,
    LiveCalibration,
    ScoreConflict,
    ScoreRecord,
    Store,
    StoreUnavailable,
    UnknownScore,
)

log = logging.getLogger("ufcal.feedback")
router = APIRouter()

FEEDBACK_RESPONSES: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorResponse, "description": "No score with this id."},
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


async def open_store(state: AppState) -> None:
    """Open the store (migrating its database) and publish the live calibration it holds.

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
    state.telemetry.set_live_calibration(report)
    state.telemetry.set_store_up(True)
    log.info(
        "store open",
        extra={"fields": {"db": state.store.backend.where(), "window_n": report.n}},
    )


async def close_store(state: AppState) -> None:
    """Close the store (queued writes finish first)."""
    if state.store is not None:
        store, state.store = state.store, None
        await store.close()


def _store(state: AppState) -> Store:
    if state.store is None:
        raise ServiceUnavailable("the score store is not open")
    return state.store


# -- recording scores (called by POST /score) ---------------------------------------------


async def record_score(
    state: AppState, body: ScoreRequest, response: ScoreResponse
) -> JSONResponse | None:
    """Save a successful score; a 409 reply if its id already has feedback, else ``None``.

    While the database is unreachable the score waits in the store's queue (or is dropped
    and counted when the queue is full); neither fails the score.
    """
    if state.store is None:
        return None
    record = ScoreRecord(
        id=response.id,
        model=response.model,
        method=response.method,
        mode=response.mode,
        answer_index=response.answer.index,
        confidence=response.confidence,
        uncertainty=response.uncertainty,
        n_options=len(body.options),
        created_at=time.time(),
        question=body.question,
        options=body.options,
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


def _calibration_out(report: LiveCalibration) -> CalibrationResponse:
    return CalibrationResponse(
        n=report.n,
        window=report.window,
        n_bins=report.n_bins,
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


@router.post(
    "/feedback",
    status_code=201,
    response_model=FeedbackResponse,
    responses=FEEDBACK_RESPONSES,
)
async def post_feedback(
    body: FeedbackRequest, state: Annotated[AppState, Depends(app_state)]
) -> FeedbackResponse | JSONResponse:
    """Record whether an earlier answer was right; on disk (or committed by PostgreSQL)
    before the reply."""
    store = _store(state)
    try:
        record = await store.add_feedback(body.id, correct=body.correct, gold_index=body.gold_index)
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
    report = store.calibration()
    state.telemetry.observe_feedback(record.correct)
    state.telemetry.set_live_calibration(report)
    log.info(
        "feedback",
        extra={
            "fields": {
                "id": record.id,
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
    )


@router.get(
    "/calibration",
    response_model=CalibrationResponse,
    responses={503: {"model": ErrorResponse, "description": "The store is not open."}},
)
async def get_calibration(state: Annotated[AppState, Depends(app_state)]) -> CalibrationResponse:
    """Live calibration over the last scores with feedback, with the reliability bins."""
    return _calibration_out(_store(state).calibration())
