"""Strict JSON request bodies: what Python's ``json`` module accepts but RFC 8259 does not
never reaches a request model.

Python's parser takes ``NaN``, ``Infinity``, integers of thousands of digits, lone surrogate
escapes (``"\\ud800"``, which no encoder can write back), duplicate keys (the last silently
wins) and nesting until the interpreter's recursion limit. Each of those used to pass
validation or break the error reply itself. Here the body is parsed once, strictly, and
every refusal is a 422 whose ``loc`` names where in the body the problem is:

* the body must be UTF-8 (a leading BOM is ignored, as RFC 8259 allows); bytes that are not
  UTF-8 inside a string are reported at that string;
* ``NaN``, ``Infinity``, ``-Infinity``, numbers beyond a float's range and integers longer
  than ``MAX_INT_DIGITS`` digits are refused at their field;
* strings (keys too) may not hold lone surrogates or U+0000 (a store or log could not take
  them);
* an object may not repeat a key; nesting is at most ``MAX_DEPTH`` deep;
* a body sent without a JSON content type is 415.

Routes get this by being ``StrictJSONRoute``s (every router of the service uses it)."""

from __future__ import annotations

import email.message
import functools
import json
import math
import re
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import HTTPException, Request, Response
from fastapi.routing import APIRoute

MAX_DEPTH = 32
MAX_INT_DIGITS = 40
QUOTE_CHARS = 100
_BAD_CHAR = re.compile("[\x00\ud800-\udfff]")


class InvalidBody(HTTPException):
    """A body that is not strict JSON (HTTP 422, ``detail`` a list of issues)."""

    def __init__(self, issues: list[dict[str, Any]]) -> None:
        super().__init__(status_code=422, detail=issues)


class UnsupportedContentType(HTTPException):
    """A body sent as something other than JSON (HTTP 415)."""

    def __init__(self, content_type: str) -> None:
        shown = quote_text(content_type, 60)
        super().__init__(
            status_code=415,
            detail=[
                {
                    "loc": ["header", "content-type"],
                    "msg": f"send the body as application/json (UTF-8), not {shown!r}",
                    "type": "unsupported_media_type",
                }
            ],
        )


def quote_text(text: str, limit: int = QUOTE_CHARS) -> str:
    """At most ``limit`` characters of ``text``, always encodable: lone surrogates and
    NULs are shown as escapes."""
    clipped = text if len(text) <= limit else text[:limit] + "..."
    if _BAD_CHAR.search(clipped):
        clipped = clipped.encode("utf-8", "backslashreplace").decode("utf-8")
        clipped = clipped.replace("\x00", "\\x00")
    return clipped


class _Rejected:
    """A parsed value that strict JSON does not allow (kept to report it at its field)."""

    __slots__ = ("reason", "text")

    def __init__(self, text: str, reason: str) -> None:
        self.text = text
        self.reason = reason


class _Object(dict[str, Any]):
    """A JSON object that repeated some of its keys."""

    repeated: list[str]


class _Parse:
    """The parser's hooks for one body; ``suspect`` turns true when a hook met something
    the walk (``_check``) must find and name."""

    def __init__(self) -> None:
        self.suspect = False

    def object(self, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result = dict(pairs)
        if len(result) == len(pairs):
            return result
        self.suspect = True
        marked = _Object(result)
        marked.repeated = []
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen and key not in marked.repeated:
                marked.repeated.append(key)
            seen.add(key)
        return marked

    def int(self, text: str) -> int | _Rejected:
        if len(text.lstrip("-")) > MAX_INT_DIGITS:
            self.suspect = True
            return _Rejected(text, f"integer of more than {MAX_INT_DIGITS} digits")
        return int(text)

    def float(self, text: str) -> float | _Rejected:
        value = float(text)
        if not math.isfinite(value):
            self.suspect = True
            return _Rejected(text, "number outside the range of a 64-bit float")
        return value

    def constant(self, text: str) -> _Rejected:
        self.suspect = True
        return _Rejected(text, f"{text} is not a JSON number (RFC 8259)")


# Text that may decode to a refused string: a surrogate or NUL escape, or undecodable bytes.
_SUSPECT_TEXT = re.compile(r"\\u(?:[dD][89a-fA-F]|0000)|[\ud800-\udfff]")


def _string_issue(text: str) -> str | None:
    found = _BAD_CHAR.search(text)
    if found is None:
        return None
    char = found.group()
    if char == "\x00":
        return "U+0000 (NUL) is not allowed in strings"
    if "\udc80" <= char <= "\udcff":  # an undecodable body byte, or that escape
        return (
            f"not UTF-8: byte 0x{ord(char) - 0xDC00:02x} "
            f"(or the lone surrogate escape \\u{ord(char):04x}) in a string"
        )
    return f"lone surrogate \\u{ord(char):04x} is not a Unicode character"


def _issue(loc: list[str | int], msg: str, kind: str, value: str) -> dict[str, Any]:
    return {"loc": ["body", *loc], "msg": msg, "type": kind, "input": quote_text(value)}


def _check(value: Any, limit: int = 20) -> list[dict[str, Any]]:
    """Walk the parsed body without recursion; the first ``limit`` problems, by field."""
    issues: list[dict[str, Any]] = []
    stack: list[tuple[Any, list[str | int]]] = [(value, [])]
    while stack and len(issues) < limit:
        node, path = stack.pop()
        if len(path) > MAX_DEPTH:
            issues.append(
                _issue(path[:MAX_DEPTH], f"nested deeper than {MAX_DEPTH}", "too_deep", "")
            )
            continue
        if isinstance(node, str):
            if reason := _string_issue(node):
                issues.append(_issue(path, reason, "invalid_string", node))
        elif isinstance(node, _Rejected):
            issues.append(_issue(path, node.reason, "invalid_number", node.text))
        elif isinstance(node, dict):
            for key in getattr(node, "repeated", ()):
                issues.append(
                    _issue([*path, quote_text(key)], "duplicate key", "duplicate_key", key)
                )
            for key, item in reversed(node.items()):
                if reason := _string_issue(key):
                    issues.append(_issue([*path, quote_text(key)], reason, "invalid_key", key))
                else:
                    stack.append((item, [*path, key]))
        elif isinstance(node, list):
            stack.extend((item, [*path, i]) for i, item in reversed(list(enumerate(node))))
    return issues


def parse_strict(raw: bytes) -> Any:
    """The JSON value of a request body, or ``InvalidBody`` naming what is wrong where."""
    text = raw.decode("utf-8", "surrogateescape")
    if text.startswith("\ufeff"):
        text = text[1:]
    hooks = _Parse()
    try:
        value = json.loads(
            text,
            object_pairs_hook=hooks.object,
            parse_int=hooks.int,
            parse_float=hooks.float,
            parse_constant=hooks.constant,
        )
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno} column {exc.colno}"
        bad = text[exc.pos : exc.pos + 1]
        if bad and "\udc80" <= bad <= "\udcff":
            msg = f"not UTF-8: byte 0x{ord(bad) - 0xDC00:02x} at {where}"
        else:
            msg = f"invalid JSON: {exc.msg} at {where}"
        raise InvalidBody(
            [{"loc": ["body", exc.pos], "msg": msg, "type": "json_invalid"}]
        ) from None
    except RecursionError:
        raise InvalidBody(
            [{"loc": ["body"], "msg": f"nested deeper than {MAX_DEPTH}", "type": "too_deep"}]
        ) from None
    nesting = text.count("[") + text.count("{")  # counts brackets in strings too: an upper bound
    if hooks.suspect or nesting > MAX_DEPTH or _SUSPECT_TEXT.search(text):
        issues = _check(value)
        if issues:
            raise InvalidBody(issues)
    return value


@functools.lru_cache(maxsize=256)  # clients send a few values; parsing one is ~10 us
def is_json_content_type(value: str) -> bool:
    """``application/json`` or ``application/*+json``, in UTF-8 if a charset is given."""
    message = email.message.Message()
    message["content-type"] = value
    if message.get_content_maintype() != "application":
        return False
    subtype = message.get_content_subtype()
    if subtype != "json" and not subtype.endswith("+json"):
        return False
    charset = message.get_param("charset")
    return charset is None or str(charset).lower() in ("utf-8", "utf8")


class StrictJSONRequest(Request):
    """A request whose ``json()`` is ``parse_strict``."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = parse_strict(await self.body())
        return self._json


class StrictJSONRoute(APIRoute):
    """A route that parses its JSON body strictly and answers 415 to a body sent with no
    or another content type (FastAPI would try to validate the raw bytes)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        has_body = self.body_field is not None

        async def strict_handler(request: Request) -> Response:
            headers = request.headers
            sends_body = headers.get("content-length", "0") != "0" or (
                "transfer-encoding" in headers
            )
            if has_body and sends_body:
                content_type = headers.get("content-type", "")
                if not is_json_content_type(content_type):
                    raise UnsupportedContentType(content_type or "no content type")
            return await handler(StrictJSONRequest(request.scope, request.receive))

        return strict_handler
