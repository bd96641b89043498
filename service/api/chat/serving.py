"""``POST /v1/chat/completions`` and ``GET /v1/models``: ufcal as an OpenAI-compatible sidecar.

The request goes to the engine (``ChatCompletions``: the in-process vLLM, or the servers of
UFCAL_ENGINE_URL) without its ``ufcal`` key; the engine's reply comes back unchanged with a
top-level ``ufcal`` object (``ChatScore``) and an ``x-ufcal-confidence`` header. Streamed,
the chunks pass through as they come, and one last chunk before ``data: [DONE]`` carries
the ``ufcal`` object; the scoring starts after the engine's last chunk.

Scoring is /score's: the last user turn (with the conversation before it as context,
``conversation.py``) becomes a ``ScoreRequest`` scored by /score's own ``admitted_score``
(admission, the request deadline, the fitted budget), so metrics, logs, the store and
/feedback treat it as a /score.
The completion itself is the engine's ordinary traffic: it is not admitted (its length is
the client's ``max_tokens``, not ufcal's planned work) and ``ufcal.score: false`` makes the
whole request a plain pass-through.

Errors: invalid ``ufcal`` controls or a chat without a (non-empty) user turn are 422s whose
``loc`` names the field, found before anything is forwarded. The engine's own answer to a
bad chat request (4xx) is passed through unchanged, unscored. An engine that fails is a 503
(unreachable, 5xx) or 502, as for /score. When scoring fails after a whole reply, the reply
is /score's error; after a stream, the last chunk's ``ufcal`` is ``{"error": {status,
detail}}``."""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any, cast

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from service.api.chat.conversation import (
    ChatInputError,
    EventSplitter,
    OptionMatch,
    ScoredTurn,
    completion_text,
    conversation_key,
    match_option,
    scored_turn,
    stream_events,
    streamed_reply,
    with_key,
)
from service.api.chat.protocol import (
    CONFIDENCE_HEADER,
    ChatControls,
    ChatGiven,
    ChatScore,
    ChatScoreFailure,
    OptionScore,
)
from service.api.common import (
    ERROR_RESPONSES,
    AppState,
    ServiceUnavailable,
    app_state,
    error_response,
)
from service.api.json_body import (
    InvalidBody,
    StrictJSONRoute,
    UnsupportedContentType,
    is_json_content_type,
    parse_strict,
)
from service.api.score.protocol import ScoreRequest, ScoreResponse
from service.api.score.serving import admitted_score, score_issues
from service.config import Settings
from service.engines.base import ChatCompletions, ChatForward, ChatStream, EngineError
from service.engines.chat_openai import DONE, chunk

log = logging.getLogger("ufcal.chat")
router = APIRouter(route_class=StrictJSONRoute)

_CHAT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "description": "An OpenAI chat completion request, forwarded to the engine "
                    "without its ufcal key.",
                    "properties": {
                        "model": {"type": "string"},
                        "messages": {"type": "array", "items": {"type": "object"}},
                        "stream": {"type": "boolean"},
                        "ufcal": ChatControls.model_json_schema(),
                    },
                    "required": ["messages"],
                }
            }
        },
    }
}
_CHAT_RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERROR_RESPONSES,
    200: {
        "description": "The engine's chat.completion with a ufcal object (ChatScore) added, "
        "or with stream: the engine's chunks, then one chunk whose ufcal is the ChatScore, "
        "then [DONE]. An error status of the engine (a 4xx for the chat request) passes "
        "through as the engine sent it.",
        "content": {
            "application/json": {"schema": {"type": "object"}},
            "text/event-stream": {"schema": {"type": "string"}},
        },
    },
}


@dataclass(frozen=True)
class ChatPlan:
    """A chat request to score: the controls, the turn, and the scoring request's fields
    other than the answer (validated before anything is forwarded)."""

    controls: ChatControls
    turn: ScoredTurn
    fields: dict[str, Any]

    @property
    def options(self) -> list[str] | None:
        options: list[str] | None = self.fields.get("options")
        return options


# -- reading the request ---------------------------------------------------------------------


def _chat_loc(loc: Any, turn_index: int | None) -> tuple[str | int, ...]:
    """Where a ScoreRequest field came from in the chat request."""
    parts = tuple(loc)
    if parts[:1] == ("body",):
        parts = parts[1:]
    if parts[:1] == ("question",):
        if turn_index is None:
            return ("body", "messages")
        return ("body", "messages", turn_index, "content")
    return ("body", "ufcal", *parts)


def _relocated(errors: Any, turn_index: int | None) -> list[dict[str, Any]]:
    return [{**dict(e), "loc": _chat_loc(e.get("loc", ()), turn_index)} for e in errors]


async def read_chat_body(request: Request) -> dict[str, Any]:
    """The request's JSON object (strict JSON, as every body of the service)."""
    content_type = request.headers.get("content-type", "")
    if not is_json_content_type(content_type):
        raise UnsupportedContentType(content_type or "no content type")
    body = parse_strict(await request.body())
    if not isinstance(body, dict):
        raise InvalidBody(
            [{"loc": ["body"], "msg": "the body must be a JSON object", "type": "dict_type"}]
        )
    return body


def read_controls(body: dict[str, Any]) -> ChatControls:
    """Take the ``ufcal`` key out of ``body`` and validate it."""
    given = body.pop("ufcal", None)
    if given is None:
        return ChatControls()
    try:
        return ChatControls.model_validate(given)
    except ValidationError as exc:
        raise RequestValidationError(
            [{**dict(e), "loc": ("body", "ufcal", *e["loc"])} for e in exc.errors()]
        ) from None


def _score_fields(controls: ChatControls, question: str) -> dict[str, Any]:
    fields: dict[str, Any] = {"question": question}
    for name in ("options", "samples", "mode", "max_prompts", "id"):
        value = getattr(controls, name)
        if value is not None:
            fields[name] = value
    return fields


def build_score_request(
    fields: dict[str, Any], settings: Settings, turn_index: int
) -> ScoreRequest:
    """The ScoreRequest of ``fields``; a 422 (``RequestValidationError``) naming the chat
    request's field for what /score would refuse, limits included."""
    try:
        body = ScoreRequest(**fields)
    except ValidationError as exc:
        raise RequestValidationError(_relocated(exc.errors(), turn_index)) from None
    issues = score_issues(body, settings, ())
    if issues:
        raise RequestValidationError(_relocated(issues, turn_index))
    return body


def plan_scoring(body: dict[str, Any], controls: ChatControls, settings: Settings) -> ChatPlan:
    """What scoring this chat request takes, or a 422 before anything is forwarded."""
    try:
        turn = scored_turn(body.get("messages"), settings.max_question_chars)
    except ChatInputError as exc:
        raise RequestValidationError([exc.issue()]) from None
    fields = _score_fields(controls, turn.question)
    build_score_request(fields, settings, turn.index)  # the answer, added later, is checked then
    return ChatPlan(controls, turn, fields)


@functools.lru_cache(maxsize=16)
def _serves_chat(kind: type) -> bool:
    """Whether engines of this class are ``ChatCompletions`` (a runtime protocol check
    costs tens of microseconds: once per class, not per request)."""
    return issubclass(kind, ChatCompletions)


def _engine(state: AppState) -> ChatCompletions | JSONResponse:
    engine = state.ready_engine()  # ServiceUnavailable: 503
    if not _serves_chat(type(engine)):
        return JSONResponse(
            {"detail": "the engine does not serve chat completions"}, status_code=400
        )
    return cast(ChatCompletions, engine)


def _passed(reply_status: int, body: bytes, media_type: str) -> Response:
    return Response(body, status_code=reply_status, media_type=media_type)


# -- scoring the reply -----------------------------------------------------------------------


def _given(
    response: ScoreResponse, text: str, options: list[str] | None, match: OptionMatch | None
) -> ChatGiven | None:
    """The reply as an answer, with the scorer's confidence in it (``response.given``)."""
    scored = response.given
    if options is None:
        if scored is None:
            return None
        return ChatGiven(
            text=text,
            match="free_form",
            confidence=scored.confidence,
            raw_confidence=scored.raw_confidence,
        )
    if match is None:
        return None
    confidence = scored.confidence if scored is not None else None
    raw = scored.raw_confidence if scored is not None else None
    return ChatGiven(
        text=text,
        index=match.index,
        label=list(response.distribution)[match.index],
        match=match.by,
        confidence=confidence,
        raw_confidence=raw,
    )


def chat_score(
    response: ScoreResponse,
    plan: ChatPlan,
    options: list[str] | None,
    text: str,
    match: OptionMatch | None,
) -> ChatScore:
    """The ``ufcal`` object of a scored turn."""
    given = _given(response, text, options, match)
    confidence, raw_confidence = response.confidence, response.raw_confidence
    if given is not None and given.confidence is not None:
        confidence = given.confidence
        raw_confidence = raw_confidence if given.raw_confidence is None else given.raw_confidence
    option_scores = None
    if options is not None:
        option_scores = [
            OptionScore(
                label=label,
                text=option,
                probability=response.distribution[label],
                fidelity=response.fidelity[label],
            )
            for label, option in zip(response.distribution, options, strict=True)
        ]
    groups = getattr(response, "groups", None)
    return ChatScore(
        id=response.id,
        task="multiple_choice" if options is not None else "free_form",
        confidence=confidence,
        raw_confidence=raw_confidence,
        calibrator=response.calibrator,
        uncertainty=response.uncertainty,
        given=given,
        answer=response.answer if options is not None else None,
        options=option_scores,
        groups=None if groups is None else [g.model_dump() for g in groups],
        context_turns=plan.turn.context_turns,
        method=response.method,
        mode=response.mode,
        model=response.model,
        usage=response.usage,
        latency_ms=response.latency_ms,
    )


async def score_reply(state: AppState, plan: ChatPlan, text: str) -> ChatScore | JSONResponse:
    """Score the turn with the chatbot's reply ``text`` as the given answer; an error reply
    (/score's, its 422s naming the chat request's fields) when that fails."""
    fields = dict(plan.fields)
    match = None
    if plan.options is not None:
        match = match_option(text, [o.strip() for o in plan.options])
        if match is not None:
            fields["answer"] = match.index
    else:
        fields["answer"] = text if text.strip() else None
    try:
        body = build_score_request(fields, state.settings, plan.turn.index)
    except RequestValidationError as exc:
        return JSONResponse({"detail": _plain(exc.errors())}, status_code=422)
    outcome = await admitted_score(state, body)
    if isinstance(outcome, JSONResponse):
        return _relocated_reply(outcome, plan.turn.index)
    return chat_score(outcome, plan, body.options, text, match)


def _plain(errors: Any) -> list[dict[str, Any]]:
    return [
        {"loc": list(e["loc"]), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
        for e in errors
    ]


def _relocated_reply(reply: JSONResponse, turn_index: int) -> JSONResponse:
    """/score's 422 with its ``loc`` naming the chat request's fields."""
    if reply.status_code != 422:
        return reply
    content = json.loads(bytes(reply.body))
    if isinstance(content.get("detail"), list):
        content["detail"] = [
            {**issue, "loc": list(_chat_loc(issue.get("loc", ()), turn_index))}
            for issue in content["detail"]
        ]
    return JSONResponse(content, status_code=422)


def _failure(reply: JSONResponse) -> ChatScoreFailure:
    content = json.loads(bytes(reply.body))
    return ChatScoreFailure(status=reply.status_code, detail=content.get("detail"))


# -- the endpoints ---------------------------------------------------------------------------


@router.post(
    "/v1/chat/completions",
    responses=_CHAT_RESPONSES,
    openapi_extra=_CHAT_BODY,
    response_class=Response,
)
async def chat_completions(
    request: Request, state: Annotated[AppState, Depends(app_state)]
) -> Response:
    """An OpenAI chat completion from the engine, with the calibrated confidence of its
    answer to the last user turn (``ufcal``; ``ufcal.score: false``: unscored)."""
    seen = _Seen()
    status = 500
    try:
        response = await _chat_completion(request, state, seen)
        status = response.status_code
        return response
    except HTTPException as exc:
        status = exc.status_code
        raise
    except RequestValidationError:
        status = 422
        raise
    except ServiceUnavailable:
        status = 503
        raise
    finally:
        state.telemetry.observe_chat(seen.scored, seen.stream, status)


@dataclass
class _Seen:
    """What a chat request turned out to be (for its metric)."""

    scored: bool = True
    stream: bool = False


async def _chat_completion(request: Request, state: AppState, seen: _Seen) -> Response:
    body = await read_chat_body(request)
    had_controls = "ufcal" in body
    controls = read_controls(body)
    seen.scored = controls.score
    seen.stream = body.get("stream") is True
    plan = plan_scoring(body, controls, state.settings) if controls.score else None
    engine = _engine(state)
    if isinstance(engine, JSONResponse):
        return engine
    raw = (
        json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
        if had_controls
        else await request.body()
    )
    forward = ChatForward(body, raw, conversation_key(body.get("messages")))
    mode = controls.mode or state.settings.mode
    stream = body.get("stream") is True
    try:
        if stream:
            upstream = await engine.chat_completion_stream(forward)
        else:
            reply = await engine.chat_completion(forward)
    except EngineError as exc:
        log.warning("chat forward failed", extra={"fields": {"error": str(exc)[:200]}})
        return error_response(exc, mode)
    if stream:
        return await _stream_reply(state, upstream, plan)
    if plan is None or reply.status != 200:
        return _passed(reply.status, reply.body, reply.media_type)
    try:
        completion = json.loads(reply.body)
    except ValueError:
        return error_response(EngineError("the engine sent a reply that is not JSON"), mode)
    text = completion_text(completion) or ""
    scored = await score_reply(state, plan, text)
    if isinstance(scored, JSONResponse):
        return scored
    try:
        content = with_key(reply.body, "ufcal", scored.model_dump_json().encode())
    except ValueError:
        return error_response(EngineError("the engine's reply is not a JSON object"), mode)
    return Response(
        content,
        media_type=reply.media_type,
        headers={CONFIDENCE_HEADER: _header_value(scored.confidence)},
    )


def _header_value(confidence: float) -> str:
    return f"{confidence:.6f}"


async def _stream_reply(state: AppState, upstream: ChatStream, plan: ChatPlan | None) -> Response:
    if upstream.status != 200:  # the engine's refusal, whole
        try:
            content = b"".join([part async for part in upstream])
        finally:
            await upstream.aclose()
        return _passed(upstream.status, content, upstream.media_type)
    events = _passed_events(upstream) if plan is None else _scored_events(state, upstream, plan)
    return StreamingResponse(
        events, media_type=upstream.media_type, headers={"cache-control": "no-cache"}
    )


async def _passed_events(upstream: ChatStream) -> AsyncIterator[bytes]:
    try:
        async for part in upstream:
            yield part
    finally:
        await upstream.aclose()


async def _scored_events(
    state: AppState, upstream: ChatStream, plan: ChatPlan
) -> AsyncIterator[bytes]:
    """The engine's events as they come (nothing is parsed before its last one), then the
    ``ufcal`` chunk and ``[DONE]``."""
    splitter = EventSplitter()
    seen: list[bytes] = []
    try:
        async for part in upstream:
            ready = splitter.feed(part)
            if ready:
                seen.append(ready)
                yield ready
    finally:
        await upstream.aclose()
    rest = splitter.rest()
    if rest.strip():  # a last event without its blank line
        seen.append(rest)
        yield rest + b"\n\n"
    said = streamed_reply(stream_events(seen))
    if not said.error:
        scored = await score_reply(state, plan, said.text)
        ufcal = (
            {"error": _failure(scored).model_dump(mode="json")}
            if isinstance(scored, JSONResponse)
            else scored.model_dump(mode="json")
        )
        yield chunk(said.id, said.created, said.model, [], ufcal=ufcal)
    yield DONE


@router.get("/v1/models", responses=ERROR_RESPONSES, response_class=Response)
async def list_models(state: Annotated[AppState, Depends(app_state)]) -> Response:
    """The engine's OpenAI model list, unchanged."""
    engine = _engine(state)
    if isinstance(engine, JSONResponse):
        return engine
    try:
        reply = await engine.list_models()
    except EngineError as exc:
        return error_response(exc, "")
    return _passed(reply.status, reply.body, reply.media_type)
