"""The audit trail: who did what, when, from where, in a hash-chained append-only log.

Every record carries the SHA-256 of the previous record's hash and its own content, so
``verify`` finds any record that was altered, removed or reordered, and a head pointer kept
beside the log finds records cut off its end. Records name studies by Study Instance UID,
never by patient.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from datetime import datetime
from enum import Enum
from typing import Any, cast

import redis
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
    TOKEN_CREATED = "token.created"
    TOKEN_REVOKED = "token.revoked"
    AUDIT_EXPORTED = "audit.exported"
    WORKLIST_REBUILT = "admin.worklist_rebuilt"


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
    written: AuditRecord | None = None

    def append(pipe: redis.client.Pipeline) -> None:
        nonlocal written
        head = pipe.get(HEAD_KEY)
        seq, prev = (json.loads(head)["seq"] + 1, json.loads(head)["hash"]) if head else (
            1, GENESIS)
        entry = AuditRecord(seq=seq, at=utcnow(), actor=actor, role=role, source=source,
                            action=action, study_instance_uid=study_instance_uid,
                            details=details or {}, prev_hash=prev)
        entry.hash = entry.digest()
        pipe.multi()
        pipe.rpush(AUDIT_KEY, entry.model_dump_json())
        pipe.set(HEAD_KEY, json.dumps({"seq": entry.seq, "hash": entry.hash}))
        written = entry

    connection.transaction(append, HEAD_KEY)
    assert written is not None
    return written


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
