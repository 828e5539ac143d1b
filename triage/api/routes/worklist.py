"""The prioritised worklist."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel

from triage.api.deps import ReaderDep, WorklistDep
from triage.worklist import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, WorklistItem

router = APIRouter(prefix="/api/v1", tags=["worklist"])


class WorklistPage(BaseModel):
    items: list[WorklistItem]
    total: int


@router.get("/worklist", response_model=WorklistPage)
def worklist(
    _user: ReaderDep,
    worklist: WorklistDep,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = DEFAULT_PAGE_SIZE,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> WorklistPage:
    """Studies by priority class (critical, urgent, routine), then by arrival."""
    items, total = worklist.page(limit=limit, offset=offset)
    return WorklistPage(items=items, total=total)
