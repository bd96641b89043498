"""Error replies that cannot fail: every one is JSON, names the field, and is small.

FastAPI's own validation handler re-encodes each offending ``input`` as it came: a ``NaN``,
an infinity or a lone surrogate makes that encoding raise (a plain-text 500), and a 1 MiB
string is sent back whole. Here each issue keeps ``loc``, ``msg`` and ``type``, and its
``input`` and ``ctx`` are quoted: scalars as they are when JSON can carry them, text cut
to ``QUOTE_CHARS`` characters, containers as a short preview. At most ``MAX_ISSUES`` issues
are listed. A failure while shaping a reply, and any exception no other handler took,
still answer JSON: a fixed 422, or a 500 carrying the request id that the log line
(with the traceback) carries too."""

from __future__ import annotations

import logging
import math
import reprlib
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

from service.api.json_body import QUOTE_CHARS, quote_text

log = logging.getLogger("ufcal.errors")

MAX_ISSUES = 20
MSG_CHARS = 300
REQUEST_ID_HEADER = "X-Request-ID"
_PREVIEW = reprlib.Repr()  # bounded: 2 levels, a few items, short strings
_PREVIEW.maxlevel, _PREVIEW.maxdict, _PREVIEW.maxlist = 2, 4, 4
_PREVIEW.maxstring, _PREVIEW.maxother = 40, 40
_FALLBACK_422 = b'{"detail":[{"loc":["body"],"msg":"invalid request","type":"value_error"}]}'


def quote_value(value: Any) -> Any:
    """``value`` as JSON can always encode it, in at most ~``QUOTE_CHARS`` characters."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if value.bit_length() <= 64 else quote_text(f"{value:.3e}")
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, str):
        return quote_text(value)
    if isinstance(value, bytes | bytearray):
        return quote_text(bytes(value[: QUOTE_CHARS * 4]).decode("utf-8", "backslashreplace"))
    return quote_text(_PREVIEW.repr(value))


def _loc_part(part: Any) -> str | int:
    if isinstance(part, int) and not isinstance(part, bool) and part.bit_length() <= 64:
        return part
    return quote_text(str(part), 60)


def safe_issue(error: Any) -> dict[str, Any]:
    """One validation issue, shaped so that it always encodes and stays small."""
    if not isinstance(error, Mapping):
        return {"loc": [], "msg": quote_text(str(error), MSG_CHARS), "type": "value_error"}
    loc = error.get("loc", ())
    parts = loc if isinstance(loc, Sequence) and not isinstance(loc, str) else (loc,)
    issue: dict[str, Any] = {
        "loc": [_loc_part(p) for p in parts[:16]],
        "msg": quote_text(str(error.get("msg", "")), MSG_CHARS),
        "type": quote_text(str(error.get("type", "value_error")), 60),
    }
    if "input" in error:
        issue["input"] = quote_value(error["input"])
    ctx = error.get("ctx")
    if isinstance(ctx, Mapping):
        issue["ctx"] = {quote_text(str(k), 60): quote_value(v) for k, v in list(ctx.items())[:8]}
    return issue


def validation_reply(errors: Sequence[Any]) -> JSONResponse:
    """The 422 for these validation errors (the first ``MAX_ISSUES`` of them)."""
    issues = [safe_issue(e) for e in errors[:MAX_ISSUES]]
    if len(errors) > MAX_ISSUES:
        issues.append(
            {
                "loc": [],
                "msg": f"{len(errors) - MAX_ISSUES} more issues not shown",
                "type": "too_many_errors",
            }
        )
    return JSONResponse({"detail": issues}, status_code=422)


def request_id(request: Request) -> str:
    """The caller's ``X-Request-ID`` when it is a plain token, else a new one."""
    given = request.headers.get(REQUEST_ID_HEADER, "")
    if 0 < len(given) <= 64 and all(c.isascii() and (c.isalnum() or c in "-_.") for c in given):
        return given
    return uuid.uuid4().hex


async def _validation_error(_: Request, exc: Exception) -> Response:
    try:
        errors = exc.errors() if isinstance(exc, RequestValidationError) else []
        return validation_reply(list(errors))
    except Exception:  # shaping the reply must not fail the request
        log.exception("could not shape a validation error")
        return _raw_json(_FALLBACK_422, 422)


def _raw_json(body: bytes, status: int, headers: dict[str, str] | None = None) -> Response:
    return Response(body, status_code=status, headers=headers, media_type="application/json")


async def _internal_error(request: Request, exc: Exception) -> Response:
    """The last resort: any exception no handler took is a JSON 500 with a request id."""
    rid = uuid.uuid4().hex
    if isinstance(exc, ClientDisconnect):  # nobody is left to answer
        log.info("client disconnected", extra={"fields": {"path": quote_text(request.url.path)}})
        return _raw_json(b'{"detail":"client disconnected"}', 400)
    try:
        rid = request_id(request)
        log.error(
            "internal error",
            exc_info=exc,
            extra={"fields": {"request_id": rid, "path": quote_text(request.url.path, 200)}},
        )
    except Exception:  # noqa: S110 # the JSON reply below must go out whatever the log does
        pass
    body = b'{"detail":"internal error","request_id":"' + rid.encode("ascii") + b'"}'
    return _raw_json(body, 500, {REQUEST_ID_HEADER: rid})


def install_error_handlers(app: FastAPI) -> None:
    """Make ``app``'s validation errors safe and its unhandled exceptions JSON 500s."""
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _internal_error)
