"""The prioritised worklist: one item per study, indexed in Redis.

Items are sorted by priority class (critical, urgent, routine), then by arrival. Orthanc stays
the source of truth: every item can be rebuilt from the study and the SR the service wrote.
Each change is also published on a Redis channel for live updates.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from enum import Enum
from typing import Any, cast

import redis
from pydantic import BaseModel, Field

from triage.priority import PriorityClass

KEY_PREFIX = "triage"
WORKLIST_KEY = f"{KEY_PREFIX}:worklist"
# Every change is appended to this stream with the study, its status and its priority; the
# live-events route replays it from a client's last event id after a dropped connection.
EVENTS_STREAM = f"{KEY_PREFIX}:events:stream"
EVENTS_KEPT = 20_000
CLAIMS_KEY = f"{KEY_PREFIX}:claims"
# Every change to any item increments the version; the epoch is set by the first write after
# Redis was emptied, so that a version number counted again from 1 is never taken for an
# old one (``Worklist.version``).
VERSION_KEY = f"{KEY_PREFIX}:worklist:version"
EPOCH_KEY = f"{KEY_PREFIX}:worklist:epoch"
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


class FindingVerdict(BaseModel):
    """A radiologist's view of one AI finding."""

    model: str
    model_version: str
    code: str
    agree: bool


class Feedback(BaseModel):
    """What a radiologist records on a study: agreement per finding, and per finding code
    whether it is present in their final read (the reference for performance monitoring)."""

    findings: list[FindingVerdict] = Field(default_factory=list)
    outcomes: dict[str, bool] = Field(
        default_factory=dict, description="finding code -> present in the final read")


class FeedbackRecord(Feedback):
    study_instance_uid: str
    user: str
    at: datetime
    sr_sop_instance_uid: str | None = Field(
        default=None, description="The assessment SR stored in the study for this feedback")


class DeliveryStatus(str, Enum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


class DeliveryItem(BaseModel):
    """Where one result went: a DICOM destination or a webhook, and how it went."""

    target: str
    kind: str = Field(description="dicom, webhook, webhook-preliminary, hl7 (ORU^R01 to a "
                      "RIS) or fhir")
    sr_sop_instance_uid: str
    status: DeliveryStatus = DeliveryStatus.PENDING
    attempts: int = 0
    last_error: str = ""
    delivered_at: datetime | None = None


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
    images_from_cache: int = Field(
        default=0, description="Images scored while they arrived (streaming), not again")
    timings: dict[str, float] = Field(default_factory=dict)


class PreliminaryItem(BaseModel):
    """A finding seen on part of a series while its images were still arriving
    (``triage.streaming``): it raised the study's priority before the analysis of the complete
    study, which confirms it or says what the complete study showed."""

    model: str
    model_version: str
    series_instance_uid: str
    code: str
    scheme: str
    meaning: str
    probability: float
    threshold: float
    priority: PriorityClass | None = None
    n_images: int = Field(description="Images of the series analysed when it was raised")
    raised_at: datetime


class OrderStatus(str, Enum):
    """Where the RIS says an order stands (HL7 v2 order control, ORC-1)."""

    ACTIVE = "active"  # NW (new), XO (changed), SC (status changed) and the like
    CANCELLED = "cancelled"  # CA, OC: cancelled before it was done
    DISCONTINUED = "discontinued"  # DC, OD: stopped after it started


class OrderItem(BaseModel):
    """An order the RIS sent (HL7 v2 ORM^O01 or OMI^O23, ``triage.ris``) matched to the study:
    by Study Instance UID, or by accession number with the same Patient ID (and issuer)."""

    key: str = Field(description="The order's identity: sender and placer/filler numbers")
    sender: str = Field(description="The configured RIS sender it came from")
    placer_order_number: str = ""
    filler_order_number: str = ""
    accession_number: str = ""
    status: OrderStatus = OrderStatus.ACTIVE
    order_control: str = Field(default="", description="ORC-1 of the latest message")
    priority_code: str = Field(
        default="", description="HL7 priority as sent (S stat, A asap, R routine, ...)")
    priority: PriorityClass = PriorityClass.ROUTINE
    patient_class: str = Field(default="", description="PV1-2 (E emergency, I, O, ...)")
    ordering_location: str = ""
    clinical_question: str = ""
    procedure: str = ""
    procedure_code: str = Field(default="", description="OBR-4 identifier, as ordered")
    procedure_coding_system: str = Field(default="", description="OBR-4 name of coding system")
    received_at: datetime
    updated_at: datetime


class WorklistItem(BaseModel):
    """One study on the worklist, as the API returns it."""

    study_instance_uid: str
    orthanc_id: str
    accession_number: str = ""
    patient_name: str = ""
    patient_id: str = ""
    issuer_of_patient_id: str = ""
    patient_birth_date: str = Field(default="", description="DICOM date, as the source wrote it")
    patient_sex: str = ""
    patient_age: str = Field(default="", description="Patient's Age as the modality wrote it")
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
    feedback: list[FeedbackRecord] = Field(default_factory=list)
    deliveries: list[DeliveryItem] = Field(default_factory=list)
    series: list[SeriesItem] = Field(default_factory=list)
    results: list[ResultItem] = Field(default_factory=list)
    arriving: int = Field(
        default=0, description="Images received so far while the study is still arriving "
        "(a preliminary AI result raised it before it was complete); 0 once it is complete")
    preliminary: list[PreliminaryItem] = Field(
        default_factory=list, description="Findings raised on the images received so far, "
        "before the study was complete")
    orders: list[OrderItem] = Field(
        default_factory=list, description="The RIS orders matched to the study (HL7 v2)")

    @property
    def order_key(self) -> int:
        arrival_ms = int(self.received_at.timestamp() * 1000)
        return self.priority.rank * _RANK_WEIGHT + arrival_ms

    def facets(self) -> set[str]:
        """The index entries the worklist filters on (``kind:value``)."""
        facets = {f"status:{self.status.value}"}
        facets |= {f"modality:{m}" for m in self.modality.split("/") if m}
        facets |= {f"model:{r.model}" for r in self.results}
        facets |= {f"finding:{f.code}" for f in self.findings if f.positive}
        facets.add(f"claimed:{self.claimed_by}" if self.claimed_by else "unclaimed")
        facets.add("read" if self.read_at else "unread")
        if self.accession_number:
            facets.add(f"accession:{self.accession_number}")
        facets |= {f"delivery:{d.status.value}" for d in self.deliveries}
        return facets


def utcnow() -> datetime:
    return datetime.now(UTC)


def version_token(epoch: bytes | None, version: bytes | None) -> str | None:
    """``Worklist.version`` from the stored epoch and version counter."""
    if epoch is None or version is None:
        return None
    return f"{epoch.decode()}:{int(version)}"


def _item_key(study_instance_uid: str) -> str:
    return f"{KEY_PREFIX}:study:{study_instance_uid}"


def _facet_key(facet: str) -> str:
    return f"{KEY_PREFIX}:idx:{facet}"


def _write(pipe: redis.client.Pipeline, old: WorklistItem | None, new: WorklistItem) -> None:
    """Queue the commands that store ``new`` in place of ``old``, indexes included."""
    uid = new.study_instance_uid
    pipe.set(_item_key(uid), new.model_dump_json())
    pipe.zadd(WORKLIST_KEY, {uid: new.order_key})
    before = old.facets() if old else set()
    after = new.facets()
    for facet in before - after:
        pipe.srem(_facet_key(facet), uid)
    for facet in after - before:
        pipe.sadd(_facet_key(facet), uid)
    if new.claim_expires_at is not None:
        pipe.zadd(CLAIMS_KEY, {uid: new.claim_expires_at.timestamp()})
    else:
        pipe.zrem(CLAIMS_KEY, uid)
    pipe.incr(VERSION_KEY)
    pipe.set(EPOCH_KEY, uuid.uuid4().hex, nx=True)


class WorklistQuery(BaseModel):
    """Filters of the worklist; every one given must match."""

    status: StudyStatus | None = None
    priority: PriorityClass | None = None
    modality: str | None = None
    model: str | None = None
    finding: str | None = Field(default=None, description="code of a positive finding")
    claimed_by: str | None = None
    unclaimed: bool | None = Field(default=None, description="only studies nobody holds")
    read: bool | None = None
    received_from: datetime | None = None
    received_to: datetime | None = None

    def facets(self) -> list[str]:
        facets = []
        for kind, value in (("status", self.status.value if self.status else None),
                            ("modality", self.modality), ("model", self.model),
                            ("finding", self.finding), ("claimed", self.claimed_by)):
            if value:
                facets.append(f"{kind}:{value}")
        if self.unclaimed:
            facets.append("unclaimed")
        if self.read is not None:
            facets.append("read" if self.read else "unread")
        return facets


class WorklistPage(BaseModel):
    items: list[WorklistItem]
    total: int
    counts: dict[str, int] = Field(description="matching studies per priority class")


def _class_window(cls: PriorityClass) -> tuple[int, int]:
    """The order-key range of one priority class."""
    return cls.rank * _RANK_WEIGHT, (cls.rank + 1) * _RANK_WEIGHT - 1


def _outside_dates(start: datetime | None, end: datetime | None
                   ) -> list[tuple[float | str, float | str]]:
    """Order-key ranges of arrivals before ``start`` or after ``end``, in every class."""
    ranges: list[tuple[float | str, float | str]] = []
    for cls in PriorityClass:
        low, high = _class_window(cls)
        if start is not None:
            ranges.append((low, low + int(start.timestamp() * 1000) - 1))
        if end is not None:
            ranges.append((low + int(end.timestamp() * 1000) + 1, high))
    return ranges


class Worklist:
    """Reads and writes worklist items in Redis."""

    def __init__(self, connection: redis.Redis) -> None:
        self.redis = connection

    def get(self, study_instance_uid: str) -> WorklistItem | None:
        raw = self.redis.get(_item_key(study_instance_uid))
        return WorklistItem.model_validate_json(raw) if raw else None

    def put(self, item: WorklistItem, event: str = "updated") -> None:
        """Store ``item`` and its place in the order, then announce the change."""
        self.upsert(item.study_instance_uid, lambda _old: item, event)

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
            old = WorklistItem.model_validate_json(raw) if raw else None
            new = change(old)
            if new is None:
                return
            pipe.multi()
            _write(pipe, old, new)
            pipe.xadd(EVENTS_STREAM, cast(Any, _event(event, new)), maxlen=EVENTS_KEPT,
                      approximate=True)

        self.redis.transaction(transaction, key)
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
        result = self.query(WorklistQuery(), limit=limit, offset=offset)
        return result.items, result.total

    def query(self, query: WorklistQuery, *, limit: int = DEFAULT_PAGE_SIZE,
              offset: int = 0) -> WorklistPage:
        """The items that match ``query``, in worklist order (priority class, then arrival;
        ties by UID, so pages are stable), with the total and the count per class."""
        self.release_expired_claims(utcnow())
        source = WORKLIST_KEY
        temporary = None
        facets = query.facets()
        if facets or query.received_from or query.received_to:
            temporary = source = f"{KEY_PREFIX}:tmp:{uuid.uuid4().hex}"
            weights = {WORKLIST_KEY: 1, **{_facet_key(f): 0 for f in facets}}
            with self.redis.pipeline() as pipe:
                pipe.zinterstore(temporary, weights)
                pipe.expire(temporary, 30)
                for low, high in _outside_dates(query.received_from, query.received_to):
                    pipe.zremrangebyscore(temporary, low, high)
                pipe.execute()
        try:
            with self.redis.pipeline() as pipe:
                for cls in PriorityClass:
                    pipe.zcount(source, *_class_window(cls))
                if query.priority is None:
                    pipe.zrange(source, offset, offset + limit - 1)
                else:
                    pipe.zrangebyscore(source, *_class_window(query.priority),
                                       start=offset, num=limit)
                *counts, uids = pipe.execute()
        finally:
            if temporary:
                self.redis.delete(temporary)
        by_class = {cls.value: int(n) for cls, n in zip(PriorityClass, counts, strict=True)}
        total = sum(by_class.values()) if query.priority is None else by_class[
            query.priority.value]
        raws = self.redis.mget([_item_key(u.decode()) for u in uids]) if uids else []
        items = [WorklistItem.model_validate_json(r) for r in raws if r]
        return WorklistPage(items=items, total=total, counts=by_class)

    def version(self, now: datetime) -> str | None:
        """A token that changes whenever any item changes; ``None`` before the first write.

        Claims that expired by ``now`` are released first (a release is a change), as
        ``query`` does, so that a page computed at this version is still the right answer.
        """
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.zrangebyscore(CLAIMS_KEY, 0, now.timestamp(), start=0, num=1)
            pipe.mget([EPOCH_KEY, VERSION_KEY])
            expired, (epoch, version) = pipe.execute()
        if expired:
            self.release_expired_claims(now)
            epoch, version = self.redis.mget([EPOCH_KEY, VERSION_KEY])
        return version_token(epoch, version)

    def query_counts(self) -> dict[str, int]:
        """Studies per priority class."""
        return self.query(WorklistQuery(), limit=1).counts

    def with_facet(self, facet: str) -> list[WorklistItem]:
        """Items with one index entry, e.g. ``accession:A123`` (unordered)."""
        uids = cast(set[bytes], self.redis.smembers(_facet_key(facet)))
        raws = self.redis.mget([_item_key(u.decode()) for u in uids]) if uids else []
        return [WorklistItem.model_validate_json(r) for r in raws if r]

    def in_facet(self, facet: str, study_instance_uids: list[str]) -> list[bool]:
        """Whether each study has one index entry, e.g. ``status:analysed``, in one call."""
        if not study_instance_uids:
            return []
        found = self.redis.smismember(_facet_key(facet), study_instance_uids)
        return [bool(f) for f in cast(list[int], found)]

    def count_facet(self, facet: str) -> int:
        return int(self.redis.scard(_facet_key(facet)))

    def release_expired_claims(self, now: datetime) -> None:
        """Claims end on their own: a radiologist who walks away frees the study."""
        for raw in cast(list[bytes], self.redis.zrangebyscore(CLAIMS_KEY, 0, now.timestamp())):
            self.update(raw.decode(), lambda item: item.model_copy(update={
                "claimed_by": None, "claim_expires_at": None})
                if item.claim_expires_at and item.claim_expires_at <= now else None,
                event="claim")


def _event(event: str, item: WorklistItem) -> dict[str, str]:
    return {"event": event, "study_instance_uid": item.study_instance_uid,
            "status": item.status.value, "priority": item.priority.value}
