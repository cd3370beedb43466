"""``GET /``: the studio page, and ``/static/``: its files, shipped in the package
(``producer/api/static``: plain HTML, CSS and JS modules; no build step, nothing from
elsewhere, so it works offline). The files hold no secret: the page asks for a key and
sends it with each API call, as any client does."""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

router = APIRouter(tags=["studio"], include_in_schema=False)

#: Scripts, styles and API calls from this origin only. Images: data: URIs (previews),
#: this origin (file:// outputs served by the API) and any store's presigned URLs.
CSP = (
    "default-src 'self'; img-src * data: blob:; connect-src 'self'; "
    "style-src 'self'; script-src 'self'; object-src 'none'; base-uri 'none'; "
    "frame-ancestors 'none'; form-action 'none'"
)

HEADERS = {
    "Content-Security-Policy": CSP,
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def static_files() -> StaticFiles:
    """The page's files, found through the package (a wheel install has them too)."""
    return StaticFiles(packages=[("producer.api", "static")])


@router.get("/", response_class=HTMLResponse)
def page() -> HTMLResponse:
    html = resources.files("producer.api").joinpath("static", "index.html").read_text()
    return HTMLResponse(html, headers=HEADERS)
