"""The API's interactive documentation (Swagger UI 5, which renders OpenAPI 3.1), with every
asset served by the service itself: a hospital network without internet access gets the page.

Swagger UI comes from npm (``swagger-ui-dist``, locked in ``package-lock.json`` and installed
by ``make deps``) into ``TRIAGE_WEB_ASSETS_DIR``. Only the files the page uses are served.
ReDoc is not offered: its standalone bundle loads web fonts from outside.
"""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path

from fastapi import APIRouter, HTTPException, Request, status
from fastapi.responses import FileResponse, HTMLResponse, Response

router = APIRouter(include_in_schema=False)
log = logging.getLogger(__name__)

PACKAGE = "swagger-ui-dist"
# The files of the package the page uses (and the source maps their last lines name).
ASSETS = {
    "swagger-ui.css": "text/css",
    "swagger-ui.css.map": "application/json",
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui-bundle.js.map": "application/json",
    "favicon-32x32.png": "image/png",
}
_PAGE = resources.files("triage.web").joinpath("docs.html").read_text()
_START = resources.files("triage.web").joinpath("docs.js").read_text()


def assets_folder(assets_dir: Path) -> Path:
    return assets_dir / PACKAGE


@router.get("/docs", response_class=HTMLResponse)
def docs_page() -> HTMLResponse:
    return HTMLResponse(_PAGE)


@router.get("/docs/start.js")
def start_script() -> Response:
    return Response(_START, media_type="text/javascript")


@router.get("/docs/assets/{name}")
def asset(name: str, request: Request) -> FileResponse:
    if name not in ASSETS:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such documentation asset")
    path = assets_folder(request.app.state.settings.web_assets_dir) / name
    if not path.is_file():
        log.error("documentation asset %s missing: install the front-end packages "
                  "(make deps, or npm ci) or set TRIAGE_WEB_ASSETS_DIR", name)
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE,
                            "documentation assets are not installed on this server")
    return FileResponse(path, media_type=ASSETS[name])
