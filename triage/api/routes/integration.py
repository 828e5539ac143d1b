"""What a RIS, a PACS or a monitoring system calls: results by accession, and metrics.

No patient names or identifiers here: systems get the study's identifiers, status, priority
and findings.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request, Response, status
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel

from triage.api.deps import IntegrationDep, WorklistDep, audit
from triage.audit import AuditAction
from triage.metrics import RedisCollector
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


def _metrics_registry(request: Request) -> CollectorRegistry:
    """The app's Prometheus registry: one collector reading the metrics every worker keeps in
    Redis (made on the first scrape)."""
    registry: CollectorRegistry | None = getattr(request.app.state, "metrics_registry", None)
    if registry is None:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(RedisCollector(request.app.state.redis))
        request.app.state.metrics_registry = registry
    return registry


@router.get("/metrics", response_class=PlainTextResponse)
def metrics(request: Request, _user: IntegrationDep) -> Response:
    """Prometheus text format: studies by outcome and model version, stage and
    time-to-notification histograms, queue depths, live workers, worklist counts."""
    return Response(generate_latest(_metrics_registry(request)),
                    media_type=CONTENT_TYPE_LATEST)
