"""HTTP shell: validate the request, call the scorer, shape the reply."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from service.api.protocol import (
    AnswerOut,
    ErrorResponse,
    HealthResponse,
    ScoreRequest,
    ScoreResponse,
    UsageOut,
    ValidationErrorResponse,
)
from service.calibration.prompts import Question
from service.config import Settings
from service.engines import build_engine
from service.engines.base import Engine, EngineError, EngineFeatureMissing, EngineUnavailable
from service.scoring import ScoreParams, ScoreResult, Unscorable, score

log = logging.getLogger("ufcal")


class ServiceUnavailable(Exception):
    """The engine is not ready yet (or any more)."""


@dataclass
class EngineSlot:
    """The engine behind the app and where its start-up stands."""

    engine: Engine | None = None
    error: str | None = None
    task: asyncio.Task[None] | None = field(default=None, repr=False)


def to_response(result: ScoreResult, request_id: str) -> ScoreResponse:
    """Shape a scoring result into the wire format (options by label)."""
    labels = result.question.labels
    return ScoreResponse(
        id=request_id,
        answer=AnswerOut(
            index=result.answer,
            label=labels[result.answer],
            text=result.question.options[result.answer],
        ),
        confidence=result.confidence,
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


def score_params(body: ScoreRequest, settings: Settings) -> ScoreParams:
    """Per-request parameters over the configured defaults."""
    return ScoreParams(
        method=body.method,
        mode=body.mode or settings.mode,
        samples=body.samples or settings.samples,
        temperature=body.temperature or settings.temperature,
        tau=body.tau or settings.tau,
        eps=settings.eps if body.eps is None else body.eps,
        skip_mass=settings.skip_mass,
    )


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An error as one short line: the first line of its message, never a traceback."""
    lines = str(exc).strip().splitlines()
    text = lines[0].strip() if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def create_app(settings: Settings | None = None, engine: Engine | None = None) -> FastAPI:
    """Build the app. Without ``engine`` the settings select and start one in the
    background, so /healthz answers while the model loads and /readyz says when it is up."""
    settings = settings or Settings()
    slot = EngineSlot()
    template = settings.prompt_template()

    async def start_engine() -> None:
        try:
            built = engine or await build_engine(settings)
            await built.start()
            slot.engine = built
            log.info("engine ready", extra={"fields": {"model": built.model}})
        except Exception as exc:  # start-up failures are reported by /readyz
            slot.error = f"{type(exc).__name__}: {exc}"
            log.error("engine failed to start: %s", slot.error)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        slot.task = asyncio.create_task(start_engine())
        try:
            yield
        finally:
            slot.task.cancel()
            with contextlib.suppress(BaseException):
                await slot.task
            if slot.engine is not None:
                await slot.engine.close()

    app = FastAPI(
        title="ufcal",
        version="0.1.0",
        summary="Calibrated confidence for LLM multiple-choice answers (UF Calibration).",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.engine_slot = slot

    def ready_engine() -> Engine:
        if slot.engine is None:
            raise ServiceUnavailable(slot.error or "the engine is starting")
        return slot.engine

    @app.exception_handler(ServiceUnavailable)
    async def _unavailable(_: Request, exc: ServiceUnavailable) -> JSONResponse:
        return JSONResponse(
            {"detail": one_line(exc)}, status_code=503, headers={"Retry-After": "5"}
        )

    errors = {
        400: {"model": ErrorResponse, "description": "The engine lacks what the mode needs."},
        422: {
            "model": ValidationErrorResponse | ErrorResponse,
            "description": "Invalid input (the error names the field), or no model reply "
            "named an option (detail starts with 'cannot score').",
        },
        502: {"model": ErrorResponse, "description": "The engine failed."},
        503: {"model": ErrorResponse, "description": "The engine is not ready or unreachable."},
    }

    @app.post("/score", response_model=ScoreResponse, responses=errors)  # type: ignore[arg-type]
    async def score_question(body: ScoreRequest) -> ScoreResponse | JSONResponse:
        """Answer a multiple-choice question with a calibrated confidence."""
        engine_now = ready_engine()
        request_id = body.id or uuid.uuid4().hex
        question = Question(body.question, tuple(body.options))
        params = score_params(body, settings)
        try:
            result = await score(question, engine_now, params, template)
        except EngineFeatureMissing as exc:
            return JSONResponse(
                {"detail": f"mode {params.mode!r}: {one_line(exc)}"}, status_code=400
            )
        except EngineUnavailable as exc:
            return JSONResponse(
                {"detail": one_line(exc)}, status_code=503, headers={"Retry-After": "5"}
            )
        except EngineError as exc:
            return JSONResponse({"detail": one_line(exc)}, status_code=502)
        except Unscorable as exc:
            return JSONResponse({"detail": f"cannot score: {one_line(exc)}"}, status_code=422)
        return to_response(result, request_id)

    @app.get("/healthz", response_model=HealthResponse)
    async def healthz() -> HealthResponse:
        """The process is alive."""
        return HealthResponse(status="ok")

    @app.get("/readyz", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
    async def readyz() -> HealthResponse | JSONResponse:
        """The engine can take requests."""
        if slot.engine is not None and await slot.engine.ready():
            return HealthResponse(status="ready", model=slot.engine.model)
        detail = slot.error or ("the engine is starting" if slot.engine is None else "engine down")
        return JSONResponse(
            HealthResponse(status="unavailable", detail=detail).model_dump(), status_code=503
        )

    return app
