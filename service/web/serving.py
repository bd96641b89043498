"""Serve the page and its three assets from package data, with a Content-Security-Policy
that lets the page load and call nothing but this origin (and run no inline script)."""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources

from fastapi import APIRouter, Request
from fastapi.responses import Response

#: The page may only talk to its own origin: scripts, styles, images and fetch() alike;
#: no inline script or style, no plugins, no framing, no <base> tricks, forms post home.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)
_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/ui/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/ui/app.css": ("app.css", "text/css; charset=utf-8"),
    "/ui/favicon.svg": ("favicon.svg", "image/svg+xml"),
}
#: The page's paths: open without an API key (they hold no data; the page asks for the key).
PATHS = frozenset(_FILES)


@dataclass(frozen=True)
class Asset:
    body: bytes
    media_type: str
    etag: str


def _load() -> dict[str, Asset]:
    folder = resources.files("service.web") / "static"
    assets = {}
    for path, (name, media_type) in _FILES.items():
        body = (folder / name).read_bytes()
        assets[path] = Asset(body, media_type, '"' + hashlib.sha256(body).hexdigest()[:32] + '"')
    return assets


def build_router() -> APIRouter:
    """Routes for the page and its assets (files read once, here)."""
    assets = _load()
    router = APIRouter(include_in_schema=False)

    def serve(asset: Asset) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            headers = {
                "Content-Security-Policy": CONTENT_SECURITY_POLICY,
                "X-Content-Type-Options": "nosniff",
                "Referrer-Policy": "no-referrer",
                "Cache-Control": "no-cache",  # revalidate: a new version shows at once
                "ETag": asset.etag,
            }
            if asset.etag in request.headers.get("if-none-match", ""):
                return Response(status_code=304, headers=headers)
            return Response(asset.body, media_type=asset.media_type, headers=headers)

        return endpoint

    for path, asset in assets.items():
        router.add_api_route(path, serve(asset), methods=["GET", "HEAD"])
    return router
