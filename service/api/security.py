"""Optional API keys: ``Authorization: Bearer <key>`` on every endpoint but the health
probes (and ``/metrics`` unless ``UFCAL_METRICS_AUTH``).

Secure by default: the check is an app-wide dependency, so an endpoint added later is
protected without anyone remembering to protect it. Keys are compared in constant time and
never logged."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Sequence
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

SCHEME_NAME = "bearerAuth"
ALWAYS_OPEN = frozenset({"/healthz", "/readyz"})
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="ufcal"'}

bearer = HTTPBearer(
    auto_error=False,
    scheme_name=SCHEME_NAME,
    description="An API key from UFCAL_API_KEYS (only when that is set).",
)


class ApiKeys:
    """The accepted keys, kept as SHA-256 digests so comparisons take the same time
    whatever the key's length or content."""

    def __init__(self, keys: Sequence[str]) -> None:
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def __repr__(self) -> str:  # never print a key (or its digest)
        return f"ApiKeys(<{len(self._digests)} keys>)"

    def accepts(self, token: str) -> bool:
        """True when ``token`` is one of the keys; every key is compared (no early exit)."""
        digest = hashlib.sha256(token.encode()).digest()
        found = False
        for known in self._digests:
            found |= hmac.compare_digest(digest, known)
        return found


def open_paths(metrics_auth: bool) -> frozenset[str]:
    """Paths that never need a key."""
    return ALWAYS_OPEN if metrics_auth else ALWAYS_OPEN | {"/metrics"}


def unauthorized(detail: str) -> HTTPException:
    return HTTPException(status_code=401, detail=detail, headers=CHALLENGE)


async def require_api_key(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> None:
    """App-wide dependency: 401 with a Bearer challenge when keys are configured and the
    request lacks a valid one (the open paths excepted)."""
    keys: ApiKeys = request.app.state.api_keys
    if not keys.enabled:
        return
    route = request.scope.get("route")
    path = getattr(route, "path", request.url.path)
    if path in request.app.state.open_paths:
        return
    if credentials is None:
        raise unauthorized("missing API key: send Authorization: Bearer <key>")
    if not keys.accepts(credentials.credentials):
        raise unauthorized("invalid API key")


_ERROR_SCHEMA = {
    "type": "object",
    "properties": {"detail": {"type": "string"}},
    "required": ["detail"],
}


def document_security(app: FastAPI, public: frozenset[str]) -> None:
    """Make ``app.openapi()`` say which operations need the bearer key (and can answer 401)
    and which are open."""
    build: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        for path, operations in schema.get("paths", {}).items():
            for operation in operations.values():
                if not isinstance(operation, dict):
                    continue
                if path in public:
                    operation.pop("security", None)
                    continue
                operation["security"] = [{SCHEME_NAME: []}]
                operation.setdefault("responses", {}).setdefault(
                    "401",
                    {
                        "description": "Missing or invalid API key (when UFCAL_API_KEYS is set).",
                        "content": {"application/json": {"schema": _ERROR_SCHEMA}},
                    },
                )
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
