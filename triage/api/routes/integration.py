"""What a RIS, a PACS or a monitoring system calls: results by accession, and metrics.

No patient names or identifiers here: systems get the study's identifiers, status, priority
and findings.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request, status
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel

from triage.admin import queue_depths, workers
from triage.api.deps import IntegrationDep, RedisDep, WorklistDep, audit
from triage.audit import AuditAction
from triage.priority import PriorityClass
from triage.worklist import FindingItem, StudyStatus, WorklistItem

router = APIRouter(tags=["integration"])


class StudyResult(BaseModel):
    study_instance_uid: str
    accession_number: str
    status: StudyStatus
    status_reason: str
    priority: PriorityClass
    findings: list[FindingItem]
    sr_sop_instance_uid: str | None


def _result(item: WorklistItem) -> StudyResult:
    return StudyResult(**item.model_dump(include=set(StudyResult.model_fields)))


@router.get("/api/v1/integration/results", response_model=list[StudyResult])
def results(request: Request, user: IntegrationDep, worklist: WorklistDep,
            accession_number: Annotated[str, Query(min_length=1, max_length=16)]
            ) -> list[StudyResult]:
    """The AI results of the studies with this accession number."""
    items = worklist.with_facet(f"accession:{accession_number}")
    for item in items:
        audit(request, user, AuditAction.STUDY_VIEWED,
              study_instance_uid=item.study_instance_uid, details={"via": "integration"})
    return [_result(i) for i in sorted(items, key=lambda i: i.received_at)]


@router.get("/api/v1/integration/results/{study_instance_uid}", response_model=StudyResult)
def result(study_instance_uid: str, request: Request, user: IntegrationDep,
           worklist: WorklistDep) -> StudyResult:
    item = worklist.get(study_instance_uid)
    if item is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "study not on the worklist")
    audit(request, user, AuditAction.STUDY_VIEWED, study_instance_uid=study_instance_uid,
          details={"via": "integration"})
    return _result(item)


@router.get("/metrics", response_class=PlainTextResponse)
def metrics(_user: IntegrationDep, worklist: WorklistDep, connection: RedisDep) -> str:
    """Prometheus text format: studies by status and priority, queue depths, live workers."""
    lines = ["# TYPE triage_studies gauge"]
    lines += [f'triage_studies{{status="{s.value}"}} {worklist.count_facet(f"status:{s.value}")}'
              for s in StudyStatus]
    counts = worklist.query_counts()
    lines += ["# TYPE triage_studies_by_priority gauge"]
    lines += [f'triage_studies_by_priority{{priority="{p}"}} {n}' for p, n in counts.items()]
    lines += ["# TYPE triage_queue_jobs gauge"]
    for depth in queue_depths(connection):
        for state in ("queued", "started", "scheduled", "failed"):
            lines.append(f'triage_queue_jobs{{queue="{depth.name}",state="{state}"}} '
                         f"{getattr(depth, state)}")
    alive = sum(w.alive for w in workers(connection))
    lines += ["# TYPE triage_workers_alive gauge", f"triage_workers_alive {alive}"]
    return "\n".join(lines) + "\n"
