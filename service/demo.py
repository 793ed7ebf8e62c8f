"""The demo page at `/`: service/static/ (plain HTML, CSS and JS; no build step, nothing fetched from
elsewhere, so it works offline) on the same server as the API it calls.

The files are read once, when the app is built, and served from memory under their fixed names: no request
can name a file on disk. The Content-Security-Policy lets the page load only from this server (and show the
images it is given), so an asset from elsewhere could not sneak in unnoticed.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import Response
from starlette.exceptions import HTTPException

STATIC = Path(__file__).resolve().parent / "static"
TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8",
         ".js": "text/javascript; charset=utf-8"}
HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff",
           "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; "
                                      "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"}


def add_routes(app: FastAPI) -> None:
    files = {p.name: (p.read_bytes(), TYPES[p.suffix]) for p in STATIC.iterdir() if p.suffix in TYPES}

    def serve(name: str) -> Response:
        if name not in files:
            raise HTTPException(404, f"no demo file {name!r}")
        body, media_type = files[name]
        return Response(body, media_type=media_type, headers=HEADERS)

    @app.get("/", include_in_schema=False)
    async def index():
        return serve("index.html")

    @app.get("/demo/{name}", include_in_schema=False)
    async def asset(name: str):
        return serve(name)
