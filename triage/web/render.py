"""Jinja2 templates of the web pages, and the front-end files they load.

Templates live in ``triage/web/templates``, our own scripts and styles in
``triage/web/static``. Third-party front-end packages (htmx, uPlot) come from npm
(``package-lock.json``, installed by ``make deps`` into ``TRIAGE_WEB_ASSETS_DIR``) and are
served from ``/static/vendor/``: nothing is loaded from outside the hospital at run time.
"""

from __future__ import annotations

import hashlib
import logging
from datetime import date, datetime
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, HTTPException, Request, status
from fastapi.responses import FileResponse, HTMLResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape

from triage.web.ris import order_ended, order_priority, patient_class, row_order
from triage.worklist import utcnow

router = APIRouter(include_in_schema=False)
log = logging.getLogger(__name__)

_WEB = Path(str(resources.files("triage.web")))
TEMPLATES = Environment(loader=FileSystemLoader(_WEB / "templates"),
                        autoescape=select_autoescape(["html"]), trim_blocks=True,
                        lstrip_blocks=True)
# The files of npm packages the pages load: name -> (package, path in it, media type).
VENDOR = {
    "htmx.min.js": ("htmx.org", "dist/htmx.min.js", "text/javascript"),
    "uPlot.iife.min.js": ("uplot", "dist/uPlot.iife.min.js", "text/javascript"),
    "uPlot.min.css": ("uplot", "dist/uPlot.min.css", "text/css"),
}
_OWN = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
THEMES = ("dark", "light")
THEME_COOKIE = "triage_theme"


def theme_of(request: Request) -> str:
    theme = request.cookies.get(THEME_COOKIE, "dark")
    return theme if theme in THEMES else "dark"


def page(request: Request, template: str, *, status_code: int = 200,
         **context: Any) -> HTMLResponse:
    """A whole page or a fragment, rendered with what every template may use."""
    session = getattr(request.state, "session", None)
    settings = request.app.state.settings
    html = TEMPLATES.get_template(template).render(
        request=request, session=session, csrf=session.csrf if session else "",
        theme=theme_of(request), settings=settings, now=utcnow(), **context)
    return HTMLResponse(html, status_code=status_code)


def _age_years(birth: date, on: date) -> int:
    return on.year - birth.year - ((on.month, on.day) < (birth.month, birth.day))


def dicom_date(value: str) -> date | None:
    try:
        return datetime.strptime(value[:8], "%Y%m%d").date() if len(value) >= 8 else None
    except ValueError:
        return None


def patient_age(birth_date: str, age: str, on: date) -> str:
    """The patient's age as reading rooms show it: from the birth date, else the Patient's
    Age the modality wrote (``045Y``), else empty."""
    born = dicom_date(birth_date)
    if born is not None and born <= on:
        return f"{_age_years(born, on)} y"
    if len(age) == 4 and age[:3].isdigit() and age[3] in "DWMY":
        return f"{int(age[:3])} {age[3].lower()}"
    return ""


def person_name(value: str) -> str:
    """A DICOM person name for people: ``FAMILY^Given^Middle`` as ``FAMILY, Given Middle``."""
    parts = [p.strip() for p in value.split("=")[0].split("^")]
    family, given = (parts + ["", ""])[:2]
    rest = " ".join(p for p in parts[2:4] if p)
    first = " ".join(p for p in (given, rest) if p)
    return ", ".join(p for p in (family, first) if p) or value


def display_date(value: str) -> str:
    day = dicom_date(value)
    return day.isoformat() if day else value


def waited(since: datetime, now: datetime) -> str:
    seconds = max(0, int((now - since).total_seconds()))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min"
    if seconds < 48 * 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    return f"{seconds // 86400} d"


def finding_key(model: str, model_version: str, code: str) -> str:
    """A form field's name for one finding: stable when a re-analysis reorders findings."""
    return hashlib.sha256(f"{model}|{model_version}|{code}".encode()).hexdigest()[:16]


def path_part(value: str) -> str:
    """One URL path segment: everything but unreserved characters percent-encoded."""
    return quote(value, safe="")


TEMPLATES.filters.update(person_name=person_name, display_date=display_date,
                         path_part=path_part)
TEMPLATES.globals.update(patient_age=patient_age, waited=waited, finding_key=finding_key,
                         row_order=row_order)
TEMPLATES.filters.update(order_priority=order_priority, patient_class=patient_class,
                         order_ended=order_ended)


@router.get("/static/vendor/{name}")
def vendor(name: str, request: Request) -> FileResponse:
    if name not in VENDOR:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such asset")
    package, inside, media_type = VENDOR[name]
    path = request.app.state.settings.web_assets_dir / package / inside
    if not path.is_file():
        log.error("front-end asset %s missing: install the front-end packages (make deps, "
                  "or npm ci) or set TRIAGE_WEB_ASSETS_DIR", name)
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE,
                            "front-end assets are not installed on this server")
    return FileResponse(path, media_type=media_type)


@router.get("/static/{name}")
def own(name: str) -> Response:
    path = _WEB / "static" / name
    media_type = _OWN.get(path.suffix)
    if media_type is None or "/" in name or not path.is_file():
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such asset")
    return FileResponse(path, media_type=media_type)
