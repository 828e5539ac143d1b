"""One study: its worklist item with series and per-model results."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, status

from triage.api.deps import ReaderDep, WorklistDep
from triage.worklist import WorklistItem

router = APIRouter(prefix="/api/v1", tags=["studies"])


@router.get("/studies/{study_instance_uid}", response_model=WorklistItem)
def study(study_instance_uid: str, _user: ReaderDep, worklist: WorklistDep) -> WorklistItem:
    item = worklist.get(study_instance_uid)
    if item is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "study not on the worklist")
    return item
