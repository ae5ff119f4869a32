"""The chat page at `/` (`serve --no-web-ui` turns it off): three static files from web/ beside this module.

No build step and nothing from a CDN: the page works offline. It is public as the files are (they hold
no server data); everything it shows comes from the API with the same authorization as any client
(/v1/models for the model and its served scheme, /v1/chat/completions streamed). The Content-Security-
Policy allows only these files' own script and style and connections to this server, so even text a
model writes that slipped into the page as HTML could not run (app.js renders it as text anyway).
"""
from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import Response

WEB_DIR = Path(__file__).with_name("web")
# URL path -> (file in web/, media type)
PAGES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/web/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/web/style.css": ("style.css", "text/css; charset=utf-8"),
}
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def add_web_ui(app: FastAPI) -> None:
    """Serve the page's files (read once, now: a missing file fails here, at start-up, naming it)."""
    for path, (name, media_type) in PAGES.items():
        file = WEB_DIR / name
        if not file.is_file():
            raise FileNotFoundError(f"the web UI's {file} is missing (package data of fp8_turbo); "
                                    f"reinstall the package or serve with --no-web-ui")
        app.add_api_route(path, _static(file.read_bytes(), media_type), methods=["GET"], include_in_schema=False)


def _static(body: bytes, media_type: str):
    async def serve_file() -> Response:
        return Response(body, media_type=media_type, headers=HEADERS)
    return serve_file
