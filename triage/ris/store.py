"""Orders from the RIS, kept in Redis until their study arrives (and for a while after).

An order is stored under its key (sender and placer/filler order numbers, see
``orders.Order.key``) as JSON, with an expiry of ``TRIAGE_RIS_ORDER_DAYS``, and indexed by the
two ways a study can be matched to it: its Study Instance UID when the order carries one, and
its accession number (checked against the study's Patient ID and issuer before it is used).

Messages the listener could not accept are kept, newest first, in a capped list for
administrators (``rejected_messages``): what was wrong, which answer the sender got, and the
start of the message as received. They hold patient data and stay in Redis, never in logs.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import cast

import redis
from pydantic import BaseModel, Field, ValidationError

from triage.ris.orders import Order

PREFIX = "triage:ris"
REJECTED = f"{PREFIX}:rejected"
REJECTED_KEEP = 1000
EXCERPT_CHARS = 4000


class RejectedMessage(BaseModel):
    """A message the MLLP listener did not accept, for administrators."""

    at: datetime
    peer: str = Field(description="The client's address")
    sender: str = Field(default="", description="The configured sender it matched, if any")
    answer: str = Field(description="AR, AE, or 'closed' when no answer could be sent")
    reason: str
    message_type: str = ""
    control_id: str = Field(default="", description="MSH-10, when it could be read")
    size: int = Field(description="Bytes received")
    excerpt: str = Field(default="", description="The start of the message, segments on lines")


def _order_key(key: str) -> str:
    return f"{PREFIX}:order:{key}"


def _by_uid(study_uid: str) -> str:
    return f"{PREFIX}:by-uid:{study_uid}"


def _by_accession(accession: str) -> str:
    return f"{PREFIX}:by-accession:{accession}"


def save(connection: redis.Redis, order: Order, *, days: int,
         previous: Order | None = None) -> None:
    """Store (or replace) ``order`` and index it, in one transaction; the index entries of
    its ``previous`` state that no longer hold are dropped."""
    ttl = days * 24 * 3600
    pipe = connection.pipeline(transaction=True)
    pipe.set(_order_key(order.key), order.model_dump_json(), ex=ttl)
    for stale in set(_indexes(previous) if previous else []) - set(_indexes(order)):
        pipe.srem(stale, order.key)
    for index in _indexes(order):
        pipe.sadd(index, order.key)
        pipe.expire(index, ttl)
    pipe.execute()


def _indexes(order: Order) -> list[str]:
    indexes = []
    if order.study_uid:
        indexes.append(_by_uid(order.study_uid))
    if order.accession_number:
        indexes.append(_by_accession(order.accession_number))
    return indexes


def load(connection: redis.Redis, key: str) -> Order | None:
    raw = connection.get(_order_key(key))
    if raw is None:
        return None
    try:
        return Order.model_validate_json(raw)  # type: ignore[arg-type]
    except ValidationError:
        return None


def _load_many(connection: redis.Redis, keys: Iterable[bytes | str]) -> list[Order]:
    names = sorted(k.decode() if isinstance(k, bytes) else k for k in keys)
    if not names:
        return []
    found = []
    for raw in connection.mget([_order_key(k) for k in names]):
        if raw is None:
            continue  # expired
        try:
            found.append(Order.model_validate_json(raw))  # type: ignore[arg-type]
        except ValidationError:
            continue
    return found


def candidates(connection: redis.Redis, *, study_uid: str, accession_number: str
               ) -> list[Order]:
    """Orders that may belong to a study: those naming its Study Instance UID and those
    with its accession number (the caller checks the patient, see ``orders.matches``)."""
    indexes = [_by_uid(study_uid)] + ([_by_accession(accession_number)]
                                      if accession_number else [])
    return _load_many(connection, cast(set[bytes], connection.sunion(indexes)))


def keep_rejected(connection: redis.Redis, message: RejectedMessage) -> None:
    pipe = connection.pipeline(transaction=True)
    pipe.lpush(REJECTED, message.model_dump_json())
    pipe.ltrim(REJECTED, 0, REJECTED_KEEP - 1)
    pipe.execute()


def rejected_messages(connection: redis.Redis, limit: int = 100) -> list[RejectedMessage]:
    """The latest messages not accepted, newest first."""
    found = []
    for raw in connection.lrange(REJECTED, 0, max(0, limit - 1)):  # type: ignore[union-attr]
        try:
            found.append(RejectedMessage.model_validate_json(raw))
        except ValidationError:
            continue
    return found
