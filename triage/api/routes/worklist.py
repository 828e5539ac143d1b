"""The prioritised worklist, its filters, and its live updates."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated, Any

import redis.asyncio as aioredis
from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import Response, StreamingResponse

from triage.api.deps import PagesDep, ReaderDep, SettingsDep, audit_async, still_valid
from triage.audit import AuditAction
from triage.priority import PriorityClass
from triage.worklist import (
    DEFAULT_PAGE_SIZE,
    EVENTS_STREAM,
    MAX_PAGE_SIZE,
    StudyStatus,
    WorklistPage,
    WorklistQuery,
)

router = APIRouter(prefix="/api/v1", tags=["worklist"])
# A comment line this often keeps proxies from closing a quiet event stream.
KEEPALIVE_SECONDS = 15.0
# How often a stream checks that its session or token still holds.
RECHECK_SECONDS = 5.0


@router.get("/worklist", response_model=WorklistPage)
async def worklist(
    request: Request,
    user: ReaderDep,
    pages: PagesDep,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = DEFAULT_PAGE_SIZE,
    offset: Annotated[int, Query(ge=0)] = 0,
    status: StudyStatus | None = None,
    priority: PriorityClass | None = None,
    modality: Annotated[str | None, Query(max_length=16)] = None,
    model: Annotated[str | None, Query(max_length=64)] = None,
    finding: Annotated[str | None, Query(max_length=64, description="finding code")] = None,
    claimed_by: Annotated[str | None, Query(max_length=128)] = None,
    unclaimed: Annotated[bool | None, Query(description="only studies nobody holds")] = None,
    read: bool | None = None,
    received_from: datetime | None = None,
    received_to: datetime | None = None,
) -> Response:
    """Studies by priority class (critical, urgent, routine), then by arrival, with the
    number of matching studies per class."""
    query = WorklistQuery(status=status, priority=priority, modality=modality, model=model,
                          finding=finding, claimed_by=claimed_by, unclaimed=unclaimed,
                          read=read,
                          received_from=received_from, received_to=received_to)
    # Encoded once per worklist version and shared by every reader (triage.pagecache).
    page = await pages.get(query, limit=limit, offset=offset)
    await audit_async(request, user, AuditAction.WORKLIST_VIEWED, details={
        "filters": query.model_dump(mode="json", exclude_none=True),
        "offset": offset, "shown": page.shown})
    return Response(content=page.body, media_type="application/json")


@router.get("/worklist/events", response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}}}})
async def events(_user: ReaderDep, settings: SettingsDep, request: Request,
                 last_event_id: Annotated[str | None, Header(max_length=64)] = None
                 ) -> StreamingResponse:
    """Server-sent events: new studies, status, priority and claim changes, as they happen.

    Each event is ``event: <kind>`` with an ``id`` and JSON data naming the study, its status
    and its priority. A client that reconnects with ``Last-Event-ID`` (browsers' EventSource
    does so by itself) first gets every change it missed; if they are no longer all kept, it
    gets ``event: reset`` and should fetch the worklist again. API clients send their bearer
    token; the web pages are authenticated by their session cookie, never a token in the URL.
    """
    async def stream() -> AsyncIterator[str]:
        # Its own connection: a blocking read holds it until an event or the keepalive.
        connection = aioredis.Redis.from_url(settings.redis_connection_url,
                                             socket_timeout=KEEPALIVE_SECONDS + 10)
        try:
            position = await _start(connection, last_event_id)
            if position is None:
                position = await _newest(connection)
                yield "event: reset\ndata: {}\n\n"
            yield ": connected\n\n"
            quiet = 0.0
            while not await request.is_disconnected():
                # The stream ends when what admitted it ends: a revoked or expired token, a
                # signed-out or locked session.
                if not await still_valid(request):
                    yield "event: ended\ndata: {}\n\n"
                    return
                answer: Any = await connection.xread({EVENTS_STREAM: position}, count=200,
                                                     block=int(RECHECK_SECONDS * 1000))
                if not answer:
                    quiet += RECHECK_SECONDS
                    if quiet >= KEEPALIVE_SECONDS:
                        quiet = 0.0
                        yield ": keepalive\n\n"
                    continue
                quiet = 0.0
                for entry_id, fields in answer[0][1]:
                    position = entry_id.decode()
                    data = {k.decode(): v.decode() for k, v in fields.items()}
                    yield (f"id: {position}\nevent: {data.get('event', 'updated')}\n"
                           f"data: {json.dumps(data)}\n\n")
        except asyncio.CancelledError:
            pass
        finally:
            await connection.aclose()

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store"})


_EVENT_ID = re.compile(r"^\d{1,20}-\d{1,20}$")


async def _newest(connection: aioredis.Redis) -> str:
    newest: Any = await connection.xrevrange(EVENTS_STREAM, count=1)
    return newest[0][0].decode() if newest else "0-0"


async def _start(connection: aioredis.Redis, last_event_id: str | None) -> str | None:
    """Where to start reading: after ``last_event_id`` when every later event is still kept
    (``None`` when some are gone), else after the newest event."""
    if not last_event_id:
        return await _newest(connection)
    if not _EVENT_ID.match(last_event_id):
        return None
    oldest: Any = await connection.xrange(EVENTS_STREAM, count=1)
    if not oldest:
        return last_event_id

    def parts(entry: str) -> tuple[int, int]:
        ms, seq = entry.split("-")
        return int(ms), int(seq)

    # The stream is trimmed from the front: once the client's last event is gone, events
    # after it may be gone too.
    if parts(oldest[0][0].decode()) > parts(last_event_id):
        return None
    return last_event_id
