"""``GET /scores``: validate the limit, read the store, shape the reply."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Depends, Query
from fastapi.responses import JSONResponse

from service.api.common import AppState, ErrorResponse, ServiceUnavailable, app_state
from service.api.scores.protocol import (
    DEFAULT_LIMIT,
    MAX_LIMIT,
    FeedbackOut,
    RecentScore,
    RecentScoresResponse,
)
from service.calibration.prompts import LETTERS
from service.store import StoredScore, StoreUnavailable

log = logging.getLogger("ufcal.scores")
router = APIRouter()


def _recent(stored: StoredScore) -> RecentScore:
    s = stored.score
    feedback = None
    if stored.correct is not None:
        feedback = FeedbackOut(
            correct=stored.correct,
            gold_index=stored.gold_index,
            received_at=stored.feedback_at or 0.0,
        )
    return RecentScore(
        id=s.id,
        created_at=s.created_at,
        model=s.model,
        method=s.method,
        mode=s.mode,
        task=s.task,
        answer_index=s.answer_index,
        answer_label=LETTERS[s.answer_index] if 0 <= s.answer_index < len(LETTERS) else "?",
        confidence=s.confidence,
        uncertainty=s.uncertainty,
        n_options=s.n_options,
        question=s.question,
        options=None if s.options is None else list(s.options),
        feedback=feedback,
    )


@router.get(
    "/scores",
    response_model=RecentScoresResponse,
    responses={503: {"model": ErrorResponse, "description": "The store is not open or failed."}},
)
async def recent_scores(
    state: Annotated[AppState, Depends(app_state)],
    limit: Annotated[
        int, Query(ge=1, le=MAX_LIMIT, description="How many scores, newest first.")
    ] = DEFAULT_LIMIT,
) -> RecentScoresResponse | JSONResponse:
    """The most recent scores of this instance with their feedback (the questions only with
    UFCAL_LOG_TEXT on)."""
    if state.store is None:
        raise ServiceUnavailable("the score store is not open")
    try:
        stored = await state.store.recent_scores(limit)
    except StoreUnavailable as exc:
        log.error("scores not read: %s", exc)
        return JSONResponse(
            {"detail": "the score store failed"}, status_code=503, headers={"Retry-After": "5"}
        )
    return RecentScoresResponse(
        scores=[_recent(s) for s in stored], limit=limit, text_logged=state.settings.log_text
    )
