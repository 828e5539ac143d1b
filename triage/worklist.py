"""The prioritised worklist: one item per study, indexed in Redis.

Items are sorted by priority class (critical, urgent, routine), then by arrival. Orthanc stays
the source of truth: every item can be rebuilt from the study and the SR the service wrote.
Each change is also published on a Redis channel for live updates.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from enum import Enum
from typing import cast

import redis
from pydantic import BaseModel, Field

from triage.priority import PriorityClass

KEY_PREFIX = "triage"
WORKLIST_KEY = f"{KEY_PREFIX}:worklist"
EVENTS_CHANNEL = f"{KEY_PREFIX}:events"
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
# Worklist order key: priority rank first, arrival second (milliseconds fit below 1e13).
_RANK_WEIGHT = 10**13


class StudyStatus(str, Enum):
    """Where a study is in the pipeline. Every study ends in a terminal status."""

    QUEUED = "queued"
    ANALYSING = "analysing"
    ANALYSED = "analysed"
    SKIPPED = "skipped"
    FAILED = "failed"

    @property
    def terminal(self) -> bool:
        return self in (StudyStatus.ANALYSED, StudyStatus.SKIPPED, StudyStatus.FAILED)


class FindingItem(BaseModel):
    code: str
    scheme: str
    meaning: str
    probability: float
    threshold: float
    positive: bool
    priority: PriorityClass | None = None
    model: str
    model_version: str
    key_sop_instance_uid: str | None = None


class SeriesItem(BaseModel):
    series_instance_uid: str
    modality: str = ""
    description: str = ""
    body_part: str = ""
    n_instances: int = 0


class ResultItem(BaseModel):
    """What one model did on one study: which series, which version, how long."""

    model: str
    model_version: str
    model_name: str
    weights_sha256: str
    regulatory_status: str
    series_instance_uid: str
    n_instances: int
    timings: dict[str, float] = Field(default_factory=dict)


class WorklistItem(BaseModel):
    """One study on the worklist, as the API returns it."""

    study_instance_uid: str
    orthanc_id: str
    accession_number: str = ""
    patient_name: str = ""
    patient_id: str = ""
    modality: str = ""
    study_description: str = ""
    study_date: str = ""
    status: StudyStatus = StudyStatus.QUEUED
    status_reason: str = ""
    clinical_priority: PriorityClass = PriorityClass.ROUTINE
    priority: PriorityClass = PriorityClass.ROUTINE
    priority_reasons: list[str] = Field(default_factory=list)
    score: float = 0.0
    findings: list[FindingItem] = Field(default_factory=list)
    received_at: datetime
    analysed_at: datetime | None = None
    sr_sop_instance_uid: str | None = None
    job_id: str = ""
    inputs: str = ""
    analysis_runs: int = Field(default=0, description="How often the current job has started")
    claimed_by: str | None = None
    claim_expires_at: datetime | None = None
    read_by: str | None = None
    read_at: datetime | None = None
    series: list[SeriesItem] = Field(default_factory=list)
    results: list[ResultItem] = Field(default_factory=list)

    @property
    def order_key(self) -> int:
        arrival_ms = int(self.received_at.timestamp() * 1000)
        return self.priority.rank * _RANK_WEIGHT + arrival_ms


def utcnow() -> datetime:
    return datetime.now(UTC)


def _item_key(study_instance_uid: str) -> str:
    return f"{KEY_PREFIX}:study:{study_instance_uid}"


class Worklist:
    """Reads and writes worklist items in Redis."""

    def __init__(self, connection: redis.Redis) -> None:
        self.redis = connection

    def get(self, study_instance_uid: str) -> WorklistItem | None:
        raw = self.redis.get(_item_key(study_instance_uid))
        return WorklistItem.model_validate_json(raw) if raw else None

    def put(self, item: WorklistItem, event: str = "updated") -> None:
        """Store ``item`` and its place in the order, then announce the change."""
        with self.redis.pipeline() as pipe:
            pipe.set(_item_key(item.study_instance_uid), item.model_dump_json())
            pipe.zadd(WORKLIST_KEY, {item.study_instance_uid: item.order_key})
            pipe.execute()
        self._publish(event, item)

    def update(self, study_instance_uid: str,
               change: Callable[[WorklistItem], WorklistItem | None],
               event: str = "updated") -> WorklistItem | None:
        """Apply ``change`` to the stored item atomically (optimistic locking).

        ``change`` returns the new item, or ``None`` to leave the item as it is. Nothing
        happens when the study has no item.
        """
        return self.upsert(study_instance_uid,
                           lambda item: change(item) if item is not None else None, event)

    def upsert(self, study_instance_uid: str,
               change: Callable[[WorklistItem | None], WorklistItem | None],
               event: str = "updated") -> WorklistItem | None:
        """Like ``update``, but ``change`` also decides for a study that has no item yet.

        The read and the write happen in one Redis transaction: if another process changes
        the item in between, ``change`` runs again on the new value.
        """
        key = _item_key(study_instance_uid)
        new: WorklistItem | None = None

        def transaction(pipe: redis.client.Pipeline) -> None:
            nonlocal new
            raw = pipe.get(key)
            new = change(WorklistItem.model_validate_json(raw) if raw else None)
            if new is None:
                return
            pipe.multi()
            pipe.set(key, new.model_dump_json())
            pipe.zadd(WORKLIST_KEY, {new.study_instance_uid: new.order_key})

        self.redis.transaction(transaction, key)
        if new is not None:
            self._publish(event, new)
        return new

    def promote_overdue(self, *, now: datetime, max_wait: timedelta) -> list[str]:
        """Promote routine studies not yet read that arrived more than ``max_wait`` ago.

        Anti-starvation (DESIGN.md, "Priorities"): nothing sits at the bottom forever. The
        promoted study keeps its arrival time, so it joins the urgent class in arrival order.
        Returns the promoted Study Instance UIDs.
        """
        cutoff = now - max_wait
        low = PriorityClass.ROUTINE.rank * _RANK_WEIGHT
        overdue = self.redis.zrangebyscore(WORKLIST_KEY, low,
                                           low + int(cutoff.timestamp() * 1000))
        reason = f"waited more than {int(max_wait.total_seconds() // 60)} min"

        def promote(item: WorklistItem) -> WorklistItem | None:
            if (item.priority is not PriorityClass.ROUTINE or item.read_at is not None
                    or item.received_at > cutoff):
                return None
            return item.model_copy(update={"priority": PriorityClass.URGENT,
                                           "priority_reasons": [*item.priority_reasons,
                                                                reason]})

        promoted = []
        for raw in cast(list[bytes], overdue):
            uid = raw.decode()
            if self.update(uid, promote, event="priority") is not None:
                promoted.append(uid)
        return promoted

    def page(self, limit: int = DEFAULT_PAGE_SIZE,
             offset: int = 0) -> tuple[list[WorklistItem], int]:
        """Items in worklist order, and the total number of items."""
        uids = cast(list[bytes], self.redis.zrange(WORKLIST_KEY, offset, offset + limit - 1))
        raws = self.redis.mget([_item_key(u.decode()) for u in uids]) if uids else []
        items = [WorklistItem.model_validate_json(r) for r in raws if r]
        return items, int(self.redis.zcard(WORKLIST_KEY))

    def _publish(self, event: str, item: WorklistItem) -> None:
        message = {
            "event": event,
            "study_instance_uid": item.study_instance_uid,
            "status": item.status.value,
            "priority": item.priority.value,
        }
        self.redis.publish(EVENTS_CHANNEL, json.dumps(message))
