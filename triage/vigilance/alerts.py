"""Alerts of the surveillance: raised once, told to the people who watch, acknowledged by one.

An alert is about one subject: a kind of check and what it watched (a model version and an
output label, a model version's inputs, a modality's arrivals). A subject has at most one open
alert: checks that run again while it is open add nothing. Each alert names the records that
raised it (``evidence_start`` to ``evidence_end``); once acknowledged, the subject alerts
again only on records later than those, so acknowledging means "seen up to here", and an
alarm that persists on new records raises a new alert.

Raising an alert commits it, then tells: the log, every configured webhook (a JSON message
without patient data, ``{"event": "vigilance.alert", ...}``; a webhook that fails is tried
again at the next check, until delivered or ``MAX_NOTIFY_ATTEMPTS``), and the Prometheus
gauge ``triage_vigilance_alerts_open``, whose figures are kept in Redis so that /metrics shows
the last known counts while PostgreSQL is down.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Any

import httpx
import psycopg
import redis
from psycopg.rows import TupleRow
from psycopg.types.json import Jsonb

from triage.metrics import VIGILANCE_ALERTS_KEY
from triage.settings import Settings, Webhook
from triage.vigilance import clock, trail
from triage.vigilance.records import RecordError

log = logging.getLogger(__name__)

Connection = psycopg.Connection[TupleRow]

EVENT = "vigilance.alert"
ACTOR = "vigilance"
# A webhook that keeps failing is given up after this many attempts (three days of hourly
# checks); its failures stay in alert_notifications for administrators.
MAX_NOTIFY_ATTEMPTS = 72
NOTE_LIMIT = 2000


class AlertKind(str, Enum):
    """What raised an alert (the ``alerts.kind`` column)."""

    OUTPUT_CUSUM = "output-cusum"
    SCORE_KS = "score-ks"
    INPUT_DRIFT = "input-drift"
    VOLUME = "volume"
    SHADOW_AGREEMENT = "shadow-agreement"


class AlertNotFound(RecordError):
    """No alert has this id."""


class AlreadyAcknowledged(RecordError):
    """The alert was acknowledged before; its acknowledgement is kept as it is."""


@dataclass(frozen=True)
class Alert:
    """One alert, open while ``acknowledged_at`` is None."""

    id: int
    kind: str
    model_id: str | None
    version: str | None
    label: str | None
    detail: dict[str, Any]
    raised_at: datetime
    evidence_start: datetime | None
    evidence_end: datetime | None
    acknowledged_at: datetime | None
    acknowledged_by: str | None
    note: str | None

    @property
    def summary(self) -> str:
        """One sentence for people, from the alert's detail."""
        return summary(self.kind, self.model_id, self.version, self.label, self.detail)


_COLUMNS = ("id, kind, model_id, version, label, detail, raised_at, evidence_start, "
            "evidence_end, acknowledged_at, acknowledged_by, note")


def _alert(row: TupleRow) -> Alert:
    return Alert(*row)


def _subject(model_id: str | None, version: str | None) -> str:
    return " ".join(part for part in (model_id, version) if part) or "the site"


def summary(kind: str, model_id: str | None, version: str | None, label: str | None,
            detail: dict[str, Any]) -> str:
    """The sentence that describes an alert of ``kind`` with this ``detail``."""
    who = _subject(model_id, version)
    if kind == AlertKind.OUTPUT_CUSUM.value:
        return (f"{who}: the daily flag rate of {label} {detail.get('direction', 'changed')} "
                f"({detail.get('rate', 0):.1%} on {detail.get('alarm_day')} against a "
                f"baseline of {detail.get('mean', 0):.1%}); the CUSUM chart crossed its "
                "threshold.")
    if kind == AlertKind.SCORE_KS.value:
        return (f"{who}: the scores of {label} over {detail.get('window_start', '')[:10]} to "
                f"{detail.get('window_end', '')[:10]} differ from the baseline period "
                f"(KS D={detail.get('statistic', 0):.2f}, adjusted p="
                f"{detail.get('adjusted_p', 0):.2g}).")
    if kind == AlertKind.INPUT_DRIFT.value:
        drifted = ", ".join(t["attribute"] for t in detail.get("drifted", []))
        return (f"{who}: the images analysed over {detail.get('window_start', '')[:10]} to "
                f"{detail.get('window_end', '')[:10]} differ from the baseline period in "
                f"{drifted or 'their acquisition attributes'}.")
    if kind == AlertKind.VOLUME.value:
        if detail.get("reason") == "model-silent":
            return (f"{who} analysed no study for {detail.get('hours')} hours while "
                    f"{detail.get('arrived')} {label} studies arrived (about "
                    f"{detail.get('expected', 0):.0f} analyses expected).")
        return (f"Only {detail.get('observed')} {label} studies arrived in the last "
                f"{detail.get('hours')} hours where about {detail.get('expected', 0):.0f} "
                "were expected.")
    return f"{who}: {kind} alert."


# -- raising ---------------------------------------------------------------------------------

_LATEST_OF_SUBJECT = f"""
SELECT {_COLUMNS} FROM alerts
WHERE kind = %s AND model_id IS NOT DISTINCT FROM %s AND version IS NOT DISTINCT FROM %s
  AND label IS NOT DISTINCT FROM %s
ORDER BY raised_at DESC, id DESC LIMIT 1
"""
_INSERT = f"""
INSERT INTO alerts (kind, model_id, version, label, detail, raised_at, evidence_start,
                    evidence_end)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (kind, model_id, version, label) WHERE acknowledged_at IS NULL DO NOTHING
RETURNING {_COLUMNS}
"""


def raise_alert(conn: Connection, settings: Settings, *, kind: AlertKind | str,
                model_id: str | None, version: str | None, label: str | None,
                detail: dict[str, Any], evidence_start: datetime, evidence_end: datetime,
                now: datetime, connection: redis.Redis | None = None) -> Alert | None:
    """Record an alert and tell of it; return it, or None when its subject needs no new one.

    No alert is added while the subject has an open one, nor on records that its latest
    (acknowledged) alert already covered: ``evidence_start`` before that alert's
    ``evidence_end``. Once committed, the alert is logged, sent to the webhooks and counted
    in the gauge (in Redis, when ``connection`` is given); none of these can undo it.
    """
    kind = AlertKind(kind)
    with conn.transaction():
        latest = conn.execute(_LATEST_OF_SUBJECT, (kind.value, model_id, version, label)
                              ).fetchone()
        if latest is not None:
            previous = _alert(latest)
            if previous.acknowledged_at is None:
                return None
            if previous.evidence_end is not None and evidence_start < previous.evidence_end:
                return None
        row = conn.execute(_INSERT, (kind.value, model_id, version, label, Jsonb(detail), now,
                                     evidence_start, evidence_end)).fetchone()
        if row is None:  # another check raised it meanwhile
            return None
        alert = _alert(row)
        trail.record(conn, actor=ACTOR, action="alert.raised", model_id=model_id,
                     version=version, at=now,
                     details={"alert_id": alert.id, "kind": kind.value, "label": label})
        for webhook in _webhooks(settings):
            conn.execute("INSERT INTO alert_notifications (alert_id, webhook) VALUES (%s, %s)",
                         (alert.id, webhook.name))
    conn.commit()
    log.warning("vigilance alert %d (%s): %s", alert.id, kind.value, alert.summary)
    notify_pending(conn, settings, alert_ids=[alert.id])
    if connection is not None:
        publish_open(conn, connection)
    return alert


# -- webhooks --------------------------------------------------------------------------------

def _webhooks(settings: Settings) -> list[Webhook]:
    chosen = set(settings.vigilance_webhooks)
    return [w for w in settings.webhooks if not chosen or w.name in chosen]


def message(settings: Settings, alert: Alert) -> dict[str, Any]:
    """The webhook message of an alert: what drifted and where to look, no patient data (the
    detail holds counts, rates and test results only)."""
    return {
        "event": EVENT,
        "alert": {"id": alert.id, "kind": alert.kind, "model_id": alert.model_id,
                  "version": alert.version, "label": alert.label, "summary": alert.summary,
                  "detail": alert.detail, "raised_at": alert.raised_at.isoformat()},
        "link": f"{settings.api_base_url}/api/v1/admin/vigilance/alerts?open=true",
    }


def _send(webhook: Webhook, body: dict[str, Any]) -> str | None:
    """POST ``body``; None when the webhook took it, else why not (no response content)."""
    try:
        response = httpx.post(webhook.url, json=body, timeout=webhook.timeout_seconds)
    except httpx.TransportError as error:
        return "timed out" if isinstance(error, httpx.TimeoutException) else "unreachable"
    if response.status_code >= 300:
        return f"answered {response.status_code}"
    return None


def notify_pending(conn: Connection, settings: Settings, *,
                   alert_ids: Sequence[int] | None = None) -> int:
    """Send the webhook notifications not delivered yet (of ``alert_ids``, or of every alert)
    to the webhooks still configured; return how many were delivered. A failure is logged
    and counted; the notification stays pending for the next check."""
    configured = {w.name: w for w in settings.webhooks}
    rows = conn.execute(
        f"SELECT n.webhook, {', '.join('a.' + c for c in _COLUMNS.split(', '))} "
        "FROM alert_notifications n JOIN alerts a ON a.id = n.alert_id "
        "WHERE n.delivered_at IS NULL AND n.attempts < %(max)s "
        "AND (%(ids)s::bigint[] IS NULL OR n.alert_id = ANY(%(ids)s)) ORDER BY a.id",
        {"max": MAX_NOTIFY_ATTEMPTS, "ids": list(alert_ids) if alert_ids is not None else None}
    ).fetchall()
    conn.commit()
    delivered = 0
    for name, *alert_row in rows:
        webhook = configured.get(name)
        if webhook is None:
            continue
        alert = _alert(tuple(alert_row))
        problem = _send(webhook, message(settings, alert))
        if problem is None:
            delivered += 1
        else:
            log.warning("vigilance alert %d not delivered to webhook %s (%s); tried again at "
                        "the next check", alert.id, name, problem)
        conn.execute("UPDATE alert_notifications SET attempts = attempts + 1, "
                     "delivered_at = %s, last_error = %s WHERE alert_id = %s AND webhook = %s",
                     (clock.now(settings) if problem is None else None, problem, alert.id,
                      name))
        conn.commit()
    return delivered


# -- the gauge -------------------------------------------------------------------------------

def publish_open(conn: Connection, connection: redis.Redis) -> None:
    """Put the number of open alerts per (kind, model, version) in Redis for /metrics; every
    subject that ever alerted is counted, 0 once acknowledged. A Redis failure is logged."""
    rows = conn.execute(
        "SELECT kind, coalesce(model_id, ''), coalesce(version, ''), "
        "count(*) FILTER (WHERE acknowledged_at IS NULL) FROM alerts GROUP BY 1, 2, 3"
    ).fetchall()
    conn.commit()
    counts = {json.dumps([kind, model, version]): int(n) for kind, model, version, n in rows}
    try:
        with connection.pipeline(transaction=True) as pipe:
            pipe.delete(VIGILANCE_ALERTS_KEY)
            if counts:
                pipe.hset(VIGILANCE_ALERTS_KEY, mapping=counts)  # type: ignore[arg-type]
            pipe.execute()
    except redis.RedisError as error:
        log.warning("open vigilance alerts not published to the metrics (%s)",
                    type(error).__name__)


# -- reading and acknowledging ---------------------------------------------------------------

def alerts(conn: Connection, *, open_only: bool | None = None, model_id: str | None = None,
           limit: int = 500) -> list[Alert]:
    """The latest alerts first: open ones (``open_only`` True), acknowledged ones (False) or
    both (None), of one model or all."""
    rows = conn.execute(
        f"SELECT {_COLUMNS} FROM alerts "
        "WHERE (%(open)s::boolean IS NULL OR (acknowledged_at IS NULL) = %(open)s) "
        "AND (%(model)s::text IS NULL OR model_id = %(model)s) "
        "ORDER BY raised_at DESC, id DESC LIMIT %(limit)s",
        {"open": open_only, "model": model_id, "limit": limit}).fetchall()
    return [_alert(row) for row in rows]


def get(conn: Connection, alert_id: int) -> Alert:
    """The alert ``alert_id``; ``AlertNotFound`` when there is none."""
    row = conn.execute(f"SELECT {_COLUMNS} FROM alerts WHERE id = %s", (alert_id,)).fetchone()
    if row is None:
        raise AlertNotFound(f"no alert {alert_id}")
    return _alert(row)


def acknowledge(conn: Connection, alert_id: int, actor: str, note: str, *,
                now: datetime | None = None) -> Alert:
    """Record that ``actor`` saw alert ``alert_id`` (with ``note``), in the audit trail too;
    return the alert. The time is ``now`` (the vigilance clock by default), never before the
    alert was raised. Raises ``AlertNotFound``, or ``AlreadyAcknowledged`` (nothing changed)."""
    if not actor.strip():
        raise RecordError("an acknowledgement needs the name of who made it")
    if len(note) > NOTE_LIMIT:
        raise RecordError(f"the note is limited to {NOTE_LIMIT} characters")
    with conn.transaction():
        row = conn.execute(
            f"UPDATE alerts SET acknowledged_at = GREATEST(%s, raised_at), acknowledged_by = %s, "
            f"note = %s WHERE id = %s AND acknowledged_at IS NULL RETURNING {_COLUMNS}",
            (now or datetime.now().astimezone(), actor, note or None, alert_id)).fetchone()
        if row is None:
            existing = get(conn, alert_id)
            raise AlreadyAcknowledged(
                f"alert {alert_id} was acknowledged by {existing.acknowledged_by} at "
                f"{existing.acknowledged_at:%Y-%m-%d %H:%M %Z}")
        alert = _alert(row)
        trail.record(conn, actor=actor, action="alert.acknowledged", model_id=alert.model_id,
                     version=alert.version, at=alert.acknowledged_at,
                     details={"alert_id": alert.id, "kind": alert.kind, "label": alert.label,
                              "note": note})
    conn.commit()
    return alert
