"""What every endpoint shares: the app's state, error shaping and error responses."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from service.api.admission import Admission, DeadlineExceeded, DeadlineUnreachable, Overloaded
from service.calibration.prompts import PromptTemplate
from service.config import Settings
from service.context_fit import ContextOverflow
from service.engines.base import (
    Engine,
    EngineError,
    EngineFeatureMissing,
    EngineRejected,
    EngineUnavailable,
)
from service.recalibration import Recalibrator
from service.scoring import Unscorable
from service.scoring_freeform import EquivalenceJudge
from service.store import Store
from service.telemetry import Telemetry


class ErrorResponse(BaseModel):
    """Every non-validation error: one line saying what went wrong."""

    detail: str


class ValidationIssue(BaseModel):
    loc: list[str | int] = Field(description="Where: e.g. ['body', 'options', 0].")
    msg: str
    type: str


class ValidationErrorResponse(BaseModel):
    """Invalid input: each issue names its field in ``loc``."""

    detail: list[ValidationIssue]


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "The engine lacks what the mode needs."},
    422: {
        "model": ValidationErrorResponse | ErrorResponse,
        "description": "Invalid input (the error names the field; a question over the "
        "model's context has type context_length_exceeded), the engine refused the question "
        "(engine_rejected), the question's planned work would miss the deadline even on an "
        "idle engine (deadline_unreachable, at body.max_prompts: waiting cannot help), or "
        "no model reply named an option (detail starts with 'cannot score').",
    },
    502: {"model": ErrorResponse, "description": "The engine failed."},
    503: {"model": ErrorResponse, "description": "The engine is not ready or unreachable."},
    413: {"model": ErrorResponse, "description": "The body is over UFCAL_MAX_BODY_BYTES."},
    429: {
        "model": ErrorResponse,
        "description": "Overloaded: every slot and the queue are full, or the work queued "
        "and running ahead would push this request past its deadline at the engine's "
        "measured rate; see Retry-After. Never sent for a request that waiting cannot help.",
    },
    504: {"model": ErrorResponse, "description": "Past UFCAL_REQUEST_TIMEOUT_S; cancelled."},
}


class ServiceUnavailable(Exception):
    """The engine is not ready yet (or any more)."""


@dataclass
class AppState:
    """Everything the endpoints share, built once per app."""

    settings: Settings
    telemetry: Telemetry
    template: PromptTemplate
    engine: Engine | None = None
    engine_error: str | None = None
    engine_task: asyncio.Task[None] | None = field(default=None, repr=False)
    store: Store | None = field(default=None, repr=False)
    recalibrator: Recalibrator | None = field(default=None, repr=False)
    #: The free-form questions' equivalence judge; None: the engine's own model judges.
    freeform_judge: EquivalenceJudge | None = field(default=None, repr=False)
    admission: Admission = field(default_factory=lambda: Admission(16, 64), repr=False)
    exit_code: int = 0  # non-zero: the engine died, the process exits with it

    def ready_engine(self) -> Engine:
        """The engine, or ``ServiceUnavailable`` while it starts or after it failed."""
        if self.engine is None:
            raise ServiceUnavailable(self.engine_error or "the engine is starting")
        if self.exit_code or getattr(self.engine, "dead", False):
            raise ServiceUnavailable("the in-process engine died; the service is restarting")
        return self.engine


async def app_state(request: Request) -> AppState:
    """FastAPI dependency: the app's state."""
    state: AppState = request.app.state.ufcal
    return state


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An error as one short line: the first line of its message, never a traceback."""
    lines = str(exc).strip().splitlines()
    text = lines[0].strip() if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _issue_422(
    loc: list[str], msg: str, kind: str, ctx: dict[str, Any] | None = None
) -> JSONResponse:
    """A 422 with one validation-shaped issue at ``loc``."""
    issue: dict[str, Any] = {"loc": loc, "msg": msg, "type": kind}
    if ctx is not None:
        issue["ctx"] = ctx
    return JSONResponse({"detail": [issue]}, status_code=422)


def error_response(exc: Exception, mode: str) -> JSONResponse:
    """The HTTP reply for a scoring failure (500 for a bug: logged, never shown)."""
    if isinstance(exc, Overloaded):
        return JSONResponse(
            {"detail": one_line(exc)},
            status_code=429,
            headers={"Retry-After": str(exc.retry_after_s)},
        )
    if isinstance(exc, DeadlineExceeded):
        return JSONResponse({"detail": one_line(exc)}, status_code=504)
    if isinstance(exc, DeadlineUnreachable):
        ctx = {
            "planned_prompts": exc.planned,
            "predicted_s": round(exc.predicted_s, 2),
            "deadline_s": exc.timeout_s,
        }
        return _issue_422(["body", "max_prompts"], str(exc), "deadline_unreachable", ctx)
    if isinstance(exc, EngineFeatureMissing):
        return JSONResponse({"detail": f"mode {mode!r}: {one_line(exc)}"}, status_code=400)
    if isinstance(exc, ContextOverflow):
        ctx = {"prompt_tokens": exc.prompt_tokens, "new_tokens": exc.new_tokens, "limit": exc.limit}
        return _issue_422(["body", "question"], str(exc), "context_length_exceeded", ctx)
    if isinstance(exc, EngineRejected):
        return _issue_422(["body"], one_line(exc), "engine_rejected")
    if isinstance(exc, EngineUnavailable | ServiceUnavailable):
        return JSONResponse(
            {"detail": one_line(exc)}, status_code=503, headers={"Retry-After": "5"}
        )
    if isinstance(exc, EngineError):
        return JSONResponse({"detail": one_line(exc)}, status_code=502)
    if isinstance(exc, Unscorable):
        return JSONResponse({"detail": f"cannot score: {one_line(exc)}"}, status_code=422)
    return JSONResponse({"detail": f"internal error: {type(exc).__name__}"}, status_code=500)
