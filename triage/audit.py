"""The audit trail: who did what, when, from where, in a hash-chained append-only log.

Every record carries the SHA-256 of the previous record's hash and its own content, so
``verify`` finds any record that was altered, removed or reordered, and a head pointer kept
beside the log finds records cut off its end. Records name studies by Study Instance UID,
never by patient.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Callable, Iterator
from datetime import datetime
from enum import Enum
from typing import Any, cast

import redis
import redis.asyncio as aioredis
from pydantic import BaseModel, Field

from triage.worklist import KEY_PREFIX, utcnow

AUDIT_KEY = f"{KEY_PREFIX}:audit"
HEAD_KEY = f"{KEY_PREFIX}:audit:head"
GENESIS = "0" * 64


class AuditAction(str, Enum):
    RESULT_PRODUCED = "result.produced"
    WORKLIST_VIEWED = "worklist.viewed"
    STUDY_VIEWED = "study.viewed"
    STUDY_CLAIMED = "study.claimed"
    STUDY_RELEASED = "study.released"
    STUDY_READ = "study.read"
    FEEDBACK_RECORDED = "feedback.recorded"
    JOB_REQUEUED = "admin.job_requeued"
    JOB_DELETED = "admin.job_deleted"
    TOKEN_CREATED = "token.created"
    TOKEN_REVOKED = "token.revoked"
    AUDIT_EXPORTED = "audit.exported"
    WORKLIST_REBUILT = "admin.worklist_rebuilt"
    SIGNED_IN = "session.signed_in"
    SIGNED_OUT = "session.signed_out"
    SESSION_LOCKED = "session.locked"
    SIGN_IN_REFUSED = "session.sign_in_refused"
    KEY_IMAGE_VIEWED = "study.key_image_viewed"
    OUTCOMES_IMPORTED = "vigilance.outcomes_imported"
    MODEL_STATE_CHANGED = "vigilance.model_state_changed"
    ALERT_ACKNOWLEDGED = "vigilance.alert_acknowledged"
    BASELINE_SET = "vigilance.baseline_set"
    VIGILANCE_EXPORTED = "vigilance.exported"
    # Messages from the RIS the listener did not accept hold patient data.
    HL7_REJECTED_VIEWED = "admin.hl7_rejected_viewed"


class AuditRecord(BaseModel):
    seq: int
    at: datetime
    actor: str = Field(description="token owner, or the process that acted")
    role: str | None = None
    source: str = Field(description="client address, or host and process")
    action: AuditAction
    study_instance_uid: str | None = None
    details: dict[str, Any] = Field(default_factory=dict)
    prev_hash: str
    hash: str = ""

    def digest(self) -> str:
        content = self.model_dump(mode="json", exclude={"hash"})
        canonical = json.dumps(content, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


class Verification(BaseModel):
    ok: bool
    records: int
    problem: str | None = None


def record(connection: redis.Redis, *, actor: str, action: AuditAction, source: str,
           role: str | None = None, study_instance_uid: str | None = None,
           details: dict[str, Any] | None = None) -> AuditRecord:
    """Append one record; concurrent writers are serialised on the head pointer."""
    [written] = _append(connection, [dict(
        actor=actor, role=role, source=source, action=action,
        study_instance_uid=study_instance_uid, details=details or {})])
    return written


def _chain(head: bytes | str | None, entries: list[dict[str, Any]]
           ) -> tuple[list[AuditRecord], str]:
    """``entries`` (AuditRecord fields) as records following the chain head ``head``, and
    the new head."""
    seq, prev = (json.loads(head)["seq"] + 1, json.loads(head)["hash"]) if head else (
        1, GENESIS)
    chained = []
    for fields in entries:
        entry = AuditRecord(seq=seq, at=utcnow(), prev_hash=prev, **fields)
        entry.hash = entry.digest()
        chained.append(entry)
        seq, prev = seq + 1, entry.hash
    return chained, json.dumps({"seq": chained[-1].seq, "hash": chained[-1].hash})


def _append(connection: redis.Redis, entries: list[dict[str, Any]]) -> list[AuditRecord]:
    """Append ``entries`` (AuditRecord fields) as consecutive records, in one transaction
    on the head pointer: another writer in between makes it start again from the new head."""
    written: list[AuditRecord] = []

    def append(pipe: redis.client.Pipeline) -> None:
        chained, head = _chain(pipe.get(HEAD_KEY), entries)
        pipe.multi()
        pipe.rpush(AUDIT_KEY, *(entry.model_dump_json() for entry in chained))
        pipe.set(HEAD_KEY, head)
        written[:] = chained

    connection.transaction(append, HEAD_KEY)
    return written


async def _append_async(connection: aioredis.Redis, entries: list[dict[str, Any]]
                        ) -> list[AuditRecord]:
    """``_append`` for an asyncio Redis client."""
    async with connection.pipeline(transaction=True) as pipe:
        while True:
            try:
                await pipe.watch(HEAD_KEY)
                chained, head = _chain(await pipe.get(HEAD_KEY), entries)
                pipe.multi()
                pipe.rpush(AUDIT_KEY, *(entry.model_dump_json() for entry in chained))
                pipe.set(HEAD_KEY, head)
                await pipe.execute()
                return chained
            except redis.WatchError:
                continue


class AsyncAuditWriter:
    """Appends the records of the API's asyncio routes, several at a time.

    Each caller awaits its own record being stored: nothing is answered before it is
    audited. Records that arrive while an append is under way are appended together by the
    next one, so under load the chain head is read and written once per batch rather than
    once per record, and the requests of one process never retry against each other.
    """

    def __init__(self, connection: Callable[[], aioredis.Redis]) -> None:
        self.connection = connection  # the client of the running event loop
        self._pending: list[tuple[dict[str, Any], asyncio.Future[AuditRecord]]] = []
        self._drainer: asyncio.Task[None] | None = None

    async def record(self, *, actor: str, action: AuditAction, source: str,
                     role: str | None = None, study_instance_uid: str | None = None,
                     details: dict[str, Any] | None = None) -> AuditRecord:
        """Append one record (as ``record``), together with any others waiting."""
        done: asyncio.Future[AuditRecord] = asyncio.get_running_loop().create_future()
        self._pending.append((dict(actor=actor, role=role, source=source, action=action,
                                   study_instance_uid=study_instance_uid,
                                   details=details or {}), done))
        if self._drainer is None or self._drainer.done():
            # A task of its own: a request that goes away must not strand the others' records.
            self._drainer = asyncio.create_task(self._drain())
        return await done

    async def _drain(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            await self._write(batch)

    async def _write(self, batch: list[tuple[dict[str, Any], asyncio.Future[AuditRecord]]]
                     ) -> None:
        try:
            written = await _append_async(self.connection(),
                                          [fields for fields, _ in batch])
        except Exception as exc:  # every waiting caller gets the error, not only this one
            for _, done in batch:
                if not done.done():  # its request may have gone away meanwhile
                    done.set_exception(exc)
            return
        for (_, done), entry in zip(batch, written, strict=True):
            if not done.done():
                done.set_result(entry)


def records(connection: redis.Redis, batch: int = 1000) -> Iterator[tuple[int, bytes]]:
    """(position, raw JSON) of every stored record, oldest first."""
    start = 0
    while True:
        chunk = cast(list[bytes], connection.lrange(AUDIT_KEY, start, start + batch - 1))
        for offset, raw in enumerate(chunk):
            yield start + offset, raw
        if len(chunk) < batch:
            return
        start += batch


def verify(connection: redis.Redis) -> Verification:
    """Walk the chain; the first broken link is named by its sequence number."""
    expected_seq, prev = 1, GENESIS
    count = 0
    for _position, raw in records(connection):
        entry = AuditRecord.model_validate_json(raw)
        count += 1
        if entry.seq != expected_seq:
            missing = (f"record {expected_seq} is missing" if entry.seq > expected_seq
                       else f"record {entry.seq} is out of place")
            return Verification(ok=False, records=count, problem=missing)
        if entry.prev_hash != prev or entry.digest() != entry.hash:
            return Verification(ok=False, records=count,
                                problem=f"record {entry.seq} was altered")
        expected_seq, prev = entry.seq + 1, entry.hash
    head = connection.get(HEAD_KEY)
    if head:
        last = json.loads(head)
        if last["seq"] != expected_seq - 1 or last["hash"] != prev:
            return Verification(ok=False, records=count,
                                problem=f"records after {expected_seq - 1} were removed "
                                        f"(the log ends before record {last['seq']})")
    return Verification(ok=True, records=count)


def export(connection: redis.Redis, start: datetime | None = None,
           end: datetime | None = None) -> Iterator[str]:
    """Records in ``[start, end]`` as JSON lines, each with its hash for checking."""
    for _position, raw in records(connection):
        entry = AuditRecord.model_validate_json(raw)
        if (start is None or entry.at >= start) and (end is None or entry.at <= end):
            yield entry.model_dump_json() + "\n"
