"""Request limits: the body size (an ASGI middleware that never holds more than the limit
in memory) and the sizes inside a question (option count, text lengths, samples, budget).

Every refusal names the limit and the setting that raises it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, HTTPException
from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.score.protocol import ScoreRequest
from service.calibration.budget import freeform_min_prompts, min_prompts
from service.config import Settings


class BodyTooLarge(HTTPException):
    """The body is over ``UFCAL_MAX_BODY_BYTES`` (HTTP 413)."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            status_code=413,
            detail=f"request body larger than UFCAL_MAX_BODY_BYTES={limit} bytes",
        )


class BodySizeLimit:
    """Refuse bodies over ``max_bytes`` with 413: at once when Content-Length says so,
    else as soon as the bytes received pass the limit (chunked bodies)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await _send_413(scope, receive, send, self.max_bytes)
            return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if started:
                raise
            await _send_413(scope, receive, send, self.max_bytes)


def _content_length(scope: Scope) -> int | None:
    try:
        return int(Headers(scope=scope)["content-length"])
    except (KeyError, ValueError):
        return None


async def _send_413(scope: Scope, receive: Receive, send: Send, limit: int) -> None:
    reply = JSONResponse(
        {"detail": BodyTooLarge(limit).detail},
        status_code=413,
        headers={"connection": "close"},  # the rest of the body is never read
    )
    await reply(scope, receive, send)


def _issue(loc: tuple[str | int, ...], msg: str, value: Any) -> dict[str, Any]:
    return {"loc": loc, "msg": msg, "type": "limit_exceeded", "input": value}


def score_limit_issues(
    body: ScoreRequest, settings: Settings, prefix: tuple[str | int, ...] = ("body",)
) -> list[dict[str, Any]]:
    """What in one question is over the configured limits (empty: nothing)."""
    issues: list[dict[str, Any]] = []
    if len(body.question) > settings.max_question_chars:
        issues.append(
            _issue(
                (*prefix, "question"),
                f"question longer than UFCAL_MAX_QUESTION_CHARS={settings.max_question_chars}",
                len(body.question),
            )
        )
    options = body.options or []
    if len(options) > settings.max_options:
        issues.append(
            _issue(
                (*prefix, "options"),
                f"more than UFCAL_MAX_OPTIONS={settings.max_options} options",
                len(options),
            )
        )
    for i, option in enumerate(options):
        if len(option) > settings.max_option_chars:
            issues.append(
                _issue(
                    (*prefix, "options", i),
                    f"option longer than UFCAL_MAX_OPTION_CHARS={settings.max_option_chars}",
                    len(option),
                )
            )
    # A free-form answer becomes an option of the UF part: the option limit holds for it.
    if (
        body.options is None
        and isinstance(body.answer, str)
        and len(body.answer.strip()) > settings.max_option_chars
    ):
        issues.append(
            _issue(
                (*prefix, "answer"),
                f"free-form answer longer than UFCAL_MAX_OPTION_CHARS={settings.max_option_chars}",
                len(body.answer),
            )
        )
    if body.samples is not None and body.samples > settings.max_samples:
        issues.append(
            _issue(
                (*prefix, "samples"),
                f"more than UFCAL_MAX_SAMPLES={settings.max_samples} samples",
                body.samples,
            )
        )
    issues.extend(_budget_issues(body, settings, prefix))
    return issues


def _budget_issues(
    body: ScoreRequest, settings: Settings, prefix: tuple[str | int, ...]
) -> list[dict[str, Any]]:
    """A work budget over the configured one, or below what one scoring of the method needs
    (e.g. 1 prompt for uf: the read leaves nothing for the answer's chain)."""
    configured = settings.max_prompts_per_question
    loc = (*prefix, "max_prompts")
    if body.max_prompts is not None and configured and body.max_prompts > configured:
        return [
            _issue(
                loc,
                f"max_prompts above UFCAL_MAX_PROMPTS_PER_QUESTION={configured}",
                body.max_prompts,
            )
        ]
    effective = configured if body.max_prompts is None else body.max_prompts
    free_form = body.options is None
    need = freeform_min_prompts(body.method) if free_form else min_prompts(body.method)
    if 0 < effective < need:
        source = "max_prompts" if body.max_prompts is not None else "UFCAL_MAX_PROMPTS_PER_QUESTION"
        why = (
            "a free-form question needs (the samples, then UF's read and the answer's "
            "first chain step)"
            if free_form
            else f"method {body.method} needs (one read, then the answer's first chain "
            "step or the stated confidence)"
        )
        return [_issue(loc, f"{source}={effective} is below the {need} prompts {why}", effective)]
    return []


_ERROR_SCHEMA = {
    "type": "object",
    "properties": {"detail": {"type": "string"}},
    "required": ["detail"],
}
_ISSUES_SCHEMA = {
    "type": "object",
    "properties": {
        "detail": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "loc": {
                        "type": "array",
                        "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
                    },
                    "msg": {"type": "string"},
                    "type": {"type": "string"},
                },
                "required": ["loc", "msg", "type"],
            },
        }
    },
    "required": ["detail"],
}
_BODY_ERRORS = {
    "400": ("The body could not be read.", _ERROR_SCHEMA),
    "413": ("The body is over UFCAL_MAX_BODY_BYTES.", _ERROR_SCHEMA),
    "415": ("The body was not sent as application/json (UTF-8).", _ISSUES_SCHEMA),
}


def document_body_errors(app: FastAPI) -> None:
    """Make ``app.openapi()`` list the refusals every operation with a body can answer
    before its handler runs: 400 (unreadable body), 413 (too large) and 415 (not JSON).
    A body that is not strict JSON is a 422 (``service.api.json_body``)."""
    build: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        schema = build()
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                if not isinstance(operation, dict) or "requestBody" not in operation:
                    continue
                responses = operation.setdefault("responses", {})
                for code, (description, body) in _BODY_ERRORS.items():
                    responses.setdefault(
                        code,
                        {
                            "description": description,
                            "content": {"application/json": {"schema": body}},
                        },
                    )
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
