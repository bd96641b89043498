"""Optional API keys: ``Authorization: Bearer <key>`` on every endpoint but the health
probes (and ``/metrics`` unless ``UFCAL_METRICS_AUTH``).

Secure by default: the check is an ASGI middleware in front of every route, so an endpoint
added later is protected without anyone remembering to protect it (and it costs nothing
when no key is configured: the middleware is not installed). Keys are compared in constant
time and never logged."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Sequence
from typing import Any

from fastapi import FastAPI
from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

SCHEME_NAME = "bearerAuth"
SCHEME_DESCRIPTION = "An API key from UFCAL_API_KEYS (only when that is set)."
ALWAYS_OPEN = frozenset({"/healthz", "/readyz"})
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="ufcal"'}


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


def bearer_token(scope: Scope) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header (scheme case-insensitive)."""
    scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


class ApiKeyAuth:
    """401 with a Bearer challenge for an HTTP request without a valid key, unless its path
    is one of ``public``."""

    def __init__(self, app: ASGIApp, keys: ApiKeys, public: frozenset[str]) -> None:
        self.app = app
        self.keys = keys
        self.public = public

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._path(scope) in self.public:
            await self.app(scope, receive, send)
            return
        token = bearer_token(scope)
        if token is not None and self.keys.accepts(token):
            await self.app(scope, receive, send)
            return
        detail = "invalid API key" if token else "missing API key: send Authorization: Bearer <key>"
        await JSONResponse({"detail": detail}, status_code=401, headers=CHALLENGE)(
            scope, receive, send
        )

    @staticmethod
    def _path(scope: Scope) -> str:
        path: str = scope["path"]
        root: str = scope.get("root_path", "")
        return path[len(root) :] if root and path.startswith(root) else path


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
        schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
        schemes[SCHEME_NAME] = {
            "type": "http",
            "scheme": "bearer",
            "description": SCHEME_DESCRIPTION,
        }
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
