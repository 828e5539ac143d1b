"""What radiologists do with a study on the worklist: claim it, release it, mark it read,
and record feedback on the AI findings. Every change names the user who made it."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta

import redis

from triage.errors import TriageError
from triage.worklist import (
    KEY_PREFIX,
    Feedback,
    FeedbackRecord,
    Worklist,
    WorklistItem,
    utcnow,
)

# Append-only log of every feedback record, read by performance monitoring.
FEEDBACK_LOG_KEY = f"{KEY_PREFIX}:feedback"


class StudyNotFound(TriageError):
    """The study is not on the worklist."""


class ClaimConflict(TriageError):
    """Another radiologist holds the study."""


class InvalidFeedback(TriageError):
    """Feedback that names a finding the study does not have."""


class StillArriving(TriageError):
    """The study's images are still arriving: marking it read needs the reader's
    confirmation (they read an incomplete study)."""

    def __init__(self, arriving: int) -> None:
        super().__init__(f"images still arriving ({arriving}): confirm to mark read")
        self.arriving = arriving


def _claim_active(item: WorklistItem, now: datetime) -> bool:
    return bool(item.claimed_by and item.claim_expires_at and item.claim_expires_at > now)


def _change(worklist: Worklist, uid: str, change: Callable[[WorklistItem], WorklistItem],
            event: str) -> WorklistItem:
    """Apply ``change`` atomically; its TriageError (a conflict) comes out unchanged."""
    errors: list[TriageError] = []

    def guarded(item: WorklistItem) -> WorklistItem | None:
        errors.clear()
        try:
            return change(item)
        except TriageError as exc:
            errors.append(exc)
            return None

    if worklist.get(uid) is None:
        raise StudyNotFound(f"study {uid} is not on the worklist")
    updated = worklist.update(uid, guarded, event=event)
    if errors:
        raise errors[0]
    assert updated is not None
    return updated


def claim(worklist: Worklist, uid: str, user: str, *, minutes: int,
          now: datetime | None = None) -> WorklistItem:
    """Give ``user`` the study for ``minutes``; renewing one's own claim extends it."""
    now = now or utcnow()

    def change(item: WorklistItem) -> WorklistItem:
        if _claim_active(item, now) and item.claimed_by != user:
            raise ClaimConflict(f"claimed by {item.claimed_by} until "
                                f"{item.claim_expires_at:%H:%M} UTC")
        return item.model_copy(update={"claimed_by": user,
                                       "claim_expires_at": now + timedelta(minutes=minutes)})

    return _change(worklist, uid, change, "claim")


def release(worklist: Worklist, uid: str, user: str, *, force: bool = False) -> WorklistItem:
    """End ``user``'s claim (``force``: anyone's, for admins)."""
    now = utcnow()

    def change(item: WorklistItem) -> WorklistItem:
        if _claim_active(item, now) and item.claimed_by != user and not force:
            raise ClaimConflict(f"claimed by {item.claimed_by}")
        return item.model_copy(update={"claimed_by": None, "claim_expires_at": None})

    return _change(worklist, uid, change, "claim")


def mark_read(worklist: Worklist, uid: str, user: str, *,
              confirm: bool = False) -> WorklistItem:
    """Record that ``user`` has read the study; their claim ends with it. While its images
    are still arriving (``arriving``) this raises ``StillArriving`` unless ``confirm``."""
    now = utcnow()

    def change(item: WorklistItem) -> WorklistItem:
        if _claim_active(item, now) and item.claimed_by != user:
            raise ClaimConflict(f"claimed by {item.claimed_by}")
        if item.arriving > 0 and not confirm:
            raise StillArriving(item.arriving)
        return item.model_copy(update={"read_by": user, "read_at": now, "claimed_by": None,
                                       "claim_expires_at": None})

    return _change(worklist, uid, change, "read")


def check_feedback(item: WorklistItem, feedback: Feedback) -> None:
    """Raise ``InvalidFeedback`` when ``feedback`` names a finding the study does not have
    (a verdict on an unknown model finding, an outcome for a code no finding has) or gives
    two verdicts on one finding."""
    known = {(f.model, f.model_version, f.code) for f in item.findings}
    seen: set[tuple[str, str, str]] = set()
    for v in feedback.findings:
        key = (v.model, v.model_version, v.code)
        if key not in known:
            raise InvalidFeedback(f"no finding {v.code} of {v.model} {v.model_version} "
                                  "on this study")
        if key in seen:
            raise InvalidFeedback(f"two verdicts on finding {v.code} of {v.model} "
                                  f"{v.model_version}")
        seen.add(key)
    codes = {f.code for f in item.findings}
    for code in feedback.outcomes:
        if code not in codes:
            raise InvalidFeedback(f"no finding {code} on this study")


def add_feedback(worklist: Worklist, connection: redis.Redis, uid: str, user: str,
                 feedback: Feedback, *, at: datetime | None = None,
                 sr_sop_instance_uid: str | None = None) -> FeedbackRecord:
    """Store ``feedback`` on the study and in the append-only feedback log; ``at`` (default
    now) is when it was given, ``sr_sop_instance_uid`` the assessment SR that holds it."""
    record = FeedbackRecord(study_instance_uid=uid, user=user, at=at or utcnow(),
                            sr_sop_instance_uid=sr_sop_instance_uid, **feedback.model_dump())

    def change(item: WorklistItem) -> WorklistItem:
        check_feedback(item, feedback)
        return item.model_copy(update={"feedback": [*item.feedback, record]})

    _change(worklist, uid, change, "feedback")
    connection.rpush(FEEDBACK_LOG_KEY, record.model_dump_json())
    return record
