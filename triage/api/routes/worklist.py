"""The prioritised worklist, its filters, and its live updates."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated

import redis.asyncio as aioredis
from fastapi import APIRouter, Query, Request
from fastapi.responses import Response, StreamingResponse

from triage.api.deps import PagesDep, ReaderDep, SettingsDep, StreamReaderDep, audit_async
from triage.audit import AuditAction
from triage.priority import PriorityClass
from triage.worklist import (
    DEFAULT_PAGE_SIZE,
    EVENTS_CHANNEL,
    MAX_PAGE_SIZE,
    StudyStatus,
    WorklistPage,
    WorklistQuery,
)

router = APIRouter(prefix="/api/v1", tags=["worklist"])
# A comment line this often keeps proxies from closing a quiet event stream.
KEEPALIVE_SECONDS = 15.0


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
    read: bool | None = None,
    received_from: datetime | None = None,
    received_to: datetime | None = None,
) -> Response:
    """Studies by priority class (critical, urgent, routine), then by arrival, with the
    number of matching studies per class."""
    query = WorklistQuery(status=status, priority=priority, modality=modality, model=model,
                          finding=finding, claimed_by=claimed_by, read=read,
                          received_from=received_from, received_to=received_to)
    # Encoded once per worklist version and shared by every reader (triage.pagecache).
    page = await pages.get(query, limit=limit, offset=offset)
    await audit_async(request, user, AuditAction.WORKLIST_VIEWED, details={
        "filters": query.model_dump(mode="json", exclude_none=True),
        "offset": offset, "shown": page.shown})
    return Response(content=page.body, media_type="application/json")


@router.get("/worklist/events", response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}}}})
async def events(_user: StreamReaderDep, settings: SettingsDep,
                 request: Request) -> StreamingResponse:
    """Server-sent events: new studies, status, priority and claim changes, as they happen.

    Each event is ``event: <kind>`` with JSON data naming the study, its status and its
    priority. Browsers' EventSource cannot send headers: pass the token as
    ``?access_token=``.
    """
    async def stream() -> AsyncIterator[str]:
        connection = aioredis.Redis.from_url(settings.redis_connection_url)
        pubsub = connection.pubsub()
        await pubsub.subscribe(EVENTS_CHANNEL)
        try:
            yield ": connected\n\n"
            while not await request.is_disconnected():
                message = await pubsub.get_message(ignore_subscribe_messages=True,
                                                   timeout=KEEPALIVE_SECONDS)
                if message is None:
                    yield ": keepalive\n\n"
                    continue
                data = json.loads(message["data"])
                yield f"event: {data['event']}\ndata: {json.dumps(data)}\n\n"
        except asyncio.CancelledError:
            pass
        finally:
            await pubsub.unsubscribe(EVENTS_CHANNEL)
            await pubsub.aclose()
            await connection.aclose()

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})
