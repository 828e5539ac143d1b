"""The vigilance page of the admins' console: what the page's form asks for.

The page itself holds no figures: its script (``static/vigilance.js``) reads them from the
``/api/v1/admin/vigilance`` routes with the browser session, so the page shows exactly what
the API serves, with the same roles and audit records.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any
from urllib.parse import urlencode

from fastapi import Request

from triage.vigilance import clock

from .pages import manifests

# The period shown when none is asked for, as the API's: the last 30 days, today included.
DEFAULT_DAYS = 30
EXPORT_PATH = "/api/v1/admin/vigilance/export"


@dataclass(frozen=True)
class VigilanceQuery:
    """The form's values: a model, a version (empty: the active one), UTC days and a label."""

    model: str
    version: str
    start: date
    end: date
    label: str

    def export_url(self, file_format: str) -> str:
        values = {"model": self.model, "version": self.version, "start": self.start.isoformat(),
                  "end": self.end.isoformat(), "format": file_format}
        return EXPORT_PATH + "?" + urlencode({k: v for k, v in values.items() if v})


def _day(value: str | None) -> date | None:
    try:
        return date.fromisoformat(value) if value else None
    except ValueError:
        return None


def query_of(request: Request, model_ids: list[str]) -> VigilanceQuery:
    """The form's values from the URL; a mangled value gives way to its default."""
    params = request.query_params
    today = clock.now(request.app.state.settings).date()
    end = _day(params.get("end")) or today + timedelta(days=1)
    start = _day(params.get("start")) or end - timedelta(days=DEFAULT_DAYS)
    if start >= end:
        start = end - timedelta(days=DEFAULT_DAYS)
    model = (params.get("model") or "").strip()[:64] or (model_ids[0] if model_ids else "")
    return VigilanceQuery(model=model, version=(params.get("version") or "").strip()[:32],
                          start=start, end=end, label=(params.get("label") or "").strip()[:64])


def page_context(request: Request) -> dict[str, Any]:
    """The installed models (for the form's suggestions) and the form's values."""
    installed, _ = manifests(request.app.state.settings.models_dir)
    model_ids = sorted({m.id for m in installed.values()})
    query = query_of(request, model_ids)
    versions = sorted({m.version for m in installed.values() if m.id == query.model})
    return {"query": query, "model_ids": model_ids, "versions": versions,
            "export_csv": query.export_url("csv"), "export_parquet": query.export_url("parquet")}
