"""Sending results back to the hospital: the SR (and an optional key image) to the PACS
through Orthanc's C-STORE jobs, and notifications of critical results to webhooks.

Every delivery is an RQ job of its own with a deterministic id per (result, target), retried
with backoff for hours, so a PACS that is down for an hour receives everything when it comes
back. Its state (pending, delivered, failed with the error) is kept on the worklist item,
and a target that acknowledged a result is never sent it again.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable
from typing import Any, Protocol, TypeVar

import httpx
import redis
from rq import Queue, Retry, get_current_job

from triage.errors import PermanentError, TransientError
from triage.logs import pseudonym
from triage.priority import PriorityClass
from triage.queues import QueueName
from triage.settings import Destination, Settings, Webhook
from triage.worklist import (
    DeliveryItem,
    DeliveryStatus,
    Worklist,
    WorklistItem,
    utcnow,
)

log = logging.getLogger(__name__)


def _wanted(rule: str, item: WorklistItem) -> bool:
    positive = any(f.positive for f in item.findings)
    if rule == "all":
        return True
    if rule == "positive":
        return positive
    if rule == "urgent":
        return positive and item.priority is not PriorityClass.ROUTINE
    return positive and item.priority is PriorityClass.CRITICAL  # "critical"


def delivery_job_id(kind: str, target: str, sr_uid: str) -> str:
    return f"deliver-{kind}-{target}-{hashlib.sha256(sr_uid.encode()).hexdigest()[:20]}"


def schedule(connection: redis.Redis, settings: Settings, item: WorklistItem) -> list[str]:
    """Queue a delivery of the item's latest SR to every target whose rule it meets."""
    if not item.sr_sop_instance_uid:
        return []
    sr_uid = item.sr_sop_instance_uid
    targets: list[tuple[str, str, str]] = [
        ("dicom", d.name, "triage.delivery.deliver_dicom")
        for d in settings.destinations if _wanted(d.send, item)]
    # A webhook told of a preliminary result always hears what the complete study showed.
    told = {d.target for d in item.deliveries if d.kind == PRELIMINARY}
    targets += [("webhook", w.name, "triage.delivery.deliver_webhook")
                for w in settings.webhooks if _wanted(w.on, item) or w.name in told]
    targets += [("hl7", d.name, "triage.ris.results.deliver_hl7")
                for d in settings.ris_destinations if _wanted(d.send, item)]
    targets += [("fhir", d.name, "triage.ris.fhir.deliver_fhir")
                for d in settings.fhir_destinations if _wanted(d.send, item)]
    queue = Queue(QueueName.URGENT.value if item.priority is not PriorityClass.ROUTINE
                  else QueueName.DEFAULT.value, connection=connection)
    scheduled = []
    for kind, target, function in targets:
        if _state(item, target, sr_uid, kind) is not None:
            continue  # already planned or done for this result
        _set_state(connection, item.study_instance_uid, target, sr_uid,
                   lambda d: d, kind=kind)
        scheduled.append(_enqueue(queue, settings, function,
                                  (item.study_instance_uid, sr_uid, target),
                                  delivery_job_id(kind, target, sr_uid),
                                  f"deliver result to {target}"))
    return scheduled


# The kind of a delivery of a preliminary result (``triage.streaming``): to a webhook, before
# the study is complete and has an SR (its ``sr_sop_instance_uid`` is empty).
PRELIMINARY = "webhook-preliminary"


def _wanted_preliminary(rule: str, item: WorklistItem) -> bool:
    if not item.preliminary:
        return False
    if rule == "positive":
        return True
    if rule == "urgent":
        return item.priority is not PriorityClass.ROUTINE
    return item.priority is PriorityClass.CRITICAL


def schedule_preliminary(connection: redis.Redis, settings: Settings,
                         item: WorklistItem) -> list[str]:
    """Tell the webhooks that ask for preliminary results (``Webhook.preliminary``) of the
    item's preliminary findings, once per study and webhook."""
    scheduled = []
    for webhook in settings.webhooks:
        if not webhook.preliminary or not _wanted_preliminary(webhook.on, item):
            continue
        if _state(item, webhook.name, "") is not None:
            continue  # told already: the final result follows up
        _set_state(connection, item.study_instance_uid, webhook.name, "", lambda d: d,
                   kind=PRELIMINARY)
        digest = hashlib.sha256(item.study_instance_uid.encode()).hexdigest()[:20]
        scheduled.append(_enqueue(
            Queue(QueueName.URGENT.value, connection=connection), settings,
            "triage.delivery.deliver_preliminary", (item.study_instance_uid, webhook.name),
            f"deliver-preliminary-{webhook.name}-{digest}",
            f"deliver preliminary result to {webhook.name}"))
    return scheduled


def deliver_preliminary(study_uid: str, webhook_name: str) -> str:
    """RQ job: POST a preliminary result to a webhook (no patient data)."""
    return _tell(study_uid, "", webhook_name, preliminary_notification)


def preliminary_notification(settings: Settings, item: WorklistItem) -> dict[str, Any]:
    """The webhook message of a preliminary result: found on the images received so far."""
    return {
        "event": "ai-preliminary-result",
        "preliminary": True,
        "study_key": pseudonym(item.study_instance_uid),
        "accession_number": item.accession_number,
        "priority": item.priority.value,
        "findings": [{"code": p.code, "scheme": p.scheme, "meaning": p.meaning,
                      "probability": round(p.probability, 4), "model": p.model,
                      "model_version": p.model_version, "images_so_far": p.n_images}
                     for p in item.preliminary],
        "note": "found on the images received so far; the result of the complete study "
                "follows",
        "link": f"{settings.api_base_url}/api/v1/studies/{item.study_instance_uid}",
        "verified": False,
    }


def _enqueue(queue: Queue, settings: Settings, function: str, args: tuple[str, ...],
             job_id: str, description: str) -> str:
    """Queue one delivery job, retried with the configured backoff; returns its id."""
    return queue.enqueue(function, *args, job_id=job_id,
                         retry=Retry(max=settings.delivery_retries,
                                     interval=settings.delivery_retry_seconds)
                         if settings.delivery_retries else None,
                         failure_ttl=14 * 24 * 3600, result_ttl=24 * 3600,
                         description=description).id


def _state(item: WorklistItem, target: str, sr_uid: str, kind: str | None = None
           ) -> DeliveryItem | None:
    """The delivery of ``sr_uid`` to ``target`` (of ``kind``: names are unique per kind
    only; ``None`` matches any kind)."""
    for delivery in item.deliveries:
        if (delivery.target == target and delivery.sr_sop_instance_uid == sr_uid
                and kind in (None, delivery.kind)):
            return delivery
    return None


def _set_state(connection: redis.Redis, study_uid: str, target: str, sr_uid: str,
               change: Callable[[DeliveryItem], DeliveryItem], *, kind: str | None = None
               ) -> None:
    def update(item: WorklistItem) -> WorklistItem:
        current = _state(item, target, sr_uid, kind) or DeliveryItem(
            target=target, kind=kind or "dicom", sr_sop_instance_uid=sr_uid)
        others = [d for d in item.deliveries if d is not current]
        return item.model_copy(update={"deliveries": [*others, change(current)]})

    Worklist(connection).update(study_uid, update, event="delivery")


def _attempt(study_uid: str, sr_uid: str, target: str, send: Callable[[], None], *,
             kind: str | None = None) -> str:
    """Run one delivery attempt to ``target`` of ``kind`` and record its outcome on the
    worklist item."""
    from triage.jobs import context

    ctx = context()
    item = ctx.worklist.get(study_uid)
    state = _state(item, target, sr_uid, kind) if item else None
    if state is not None and state.status is DeliveryStatus.DELIVERED:
        return "already delivered"
    try:
        send()
    except (TransientError, PermanentError) as exc:
        job = get_current_job()
        final = isinstance(exc, PermanentError) or job is None or not job.should_retry
        status = DeliveryStatus.FAILED if final else DeliveryStatus.PENDING
        error = str(exc)
        _set_state(ctx.redis, study_uid, target, sr_uid, lambda d: d.model_copy(update={
            "status": status, "attempts": d.attempts + 1, "last_error": error}), kind=kind)
        log.warning("study %s: delivery to %s failed (%s)", pseudonym(study_uid), target, exc)
        if isinstance(exc, PermanentError) and job is not None:
            job.retries_left = 0
        raise
    _set_state(ctx.redis, study_uid, target, sr_uid, lambda d: d.model_copy(update={
        "status": DeliveryStatus.DELIVERED, "attempts": d.attempts + 1, "last_error": "",
        "delivered_at": utcnow()}), kind=kind)
    log.info("study %s: result delivered to %s", pseudonym(study_uid), target)
    return "delivered"


def deliver_dicom(study_uid: str, sr_uid: str, destination_name: str) -> str:
    """RQ job: C-STORE the SR (and key images, if enabled) to a DICOM destination."""
    from triage.jobs import context

    ctx = context()
    destination = _destination(ctx.settings, destination_name)

    def send() -> None:
        sr_id = ctx.orthanc.lookup_instance(sr_uid)
        if sr_id is None:
            raise PermanentError(f"SR {sr_uid} is no longer in Orthanc")
        ids = [sr_id]
        if destination.key_images:
            ids += _key_image_ids(ctx, study_uid, sr_uid)
        ctx.orthanc.register_modality(destination.name, destination.aet, destination.host,
                                      destination.port)
        ctx.orthanc.send(destination.name, ids)

    return _attempt(study_uid, sr_uid, destination_name, send, kind="dicom")


def _key_image_ids(ctx: Any, study_uid: str, sr_uid: str) -> list[str]:
    from triage.keyimage import key_image_uid

    instance = ctx.orthanc.lookup_instance(str(key_image_uid(sr_uid)))
    return [instance] if instance else []


def deliver_webhook(study_uid: str, sr_uid: str, webhook_name: str) -> str:
    """RQ job: POST a notification of the result to a webhook (no patient data)."""
    return _tell(study_uid, sr_uid, webhook_name, notification)


def _tell(study_uid: str, sr_uid: str, webhook_name: str,
          message: Callable[[Settings, WorklistItem], dict[str, Any]]) -> str:
    """One attempt to POST ``message`` of the study's item to a webhook."""
    from triage.jobs import context

    ctx = context()
    webhook = _webhook(ctx.settings, webhook_name)

    def send() -> None:
        item = ctx.worklist.get(study_uid)
        if item is None:
            raise PermanentError("study no longer on the worklist")
        _post(webhook, message(ctx.settings, item))

    return _attempt(study_uid, sr_uid, webhook_name, send,
                    kind="webhook" if sr_uid else PRELIMINARY)


def current_result(worklist: Worklist, study_uid: str, sr_uid: str) -> WorklistItem:
    """The study's item while ``sr_uid`` is still its latest result; a result superseded by
    a newer one (which is sent on its own) or a study gone raises ``PermanentError``."""
    item = worklist.get(study_uid)
    if item is None:
        raise PermanentError("study no longer on the worklist")
    if item.sr_sop_instance_uid != sr_uid:
        raise PermanentError("superseded by a newer result of the study, sent on its own")
    return item


def _post(webhook: Webhook, message: dict[str, Any]) -> None:
    try:
        response = httpx.post(webhook.url, json=message, timeout=webhook.timeout_seconds)
    except httpx.TransportError as exc:
        problem = "timed out" if isinstance(exc, httpx.TimeoutException) else (
            "connection failed")
        raise TransientError(f"{webhook.name} unreachable: {problem}") from exc
    if response.status_code >= 500 or response.status_code in (408, 429):
        raise TransientError(f"{webhook.name} answered {response.status_code}")
    if response.status_code >= 400:
        raise PermanentError(f"{webhook.name} refused the notification "
                             f"({response.status_code})")


def notification(settings: Settings, item: WorklistItem) -> dict[str, Any]:
    """The webhook message: what to look at and how urgent, without the patient."""
    positive = [f for f in item.findings if f.positive]
    return {
        "event": "ai-result",
        "study_key": pseudonym(item.study_instance_uid),
        "accession_number": item.accession_number,
        "priority": item.priority.value,
        "findings": [{"code": f.code, "scheme": f.scheme, "meaning": f.meaning,
                      "probability": round(f.probability, 4), "model": f.model,
                      "model_version": f.model_version} for f in positive],
        "link": f"{settings.api_base_url}/api/v1/studies/{item.study_instance_uid}",
        "verified": False,
        # What the complete study showed, after a preliminary result (which cannot be
        # recalled: the priority it raised stays).
        "follows_preliminary": bool(item.preliminary),
        "preliminary_not_confirmed": [
            {"code": p.code, "meaning": p.meaning, "model": p.model,
             "model_version": p.model_version} for p in item.preliminary
            if not any(f.positive and (f.model, f.model_version, f.code)
                       == (p.model, p.model_version, p.code) for f in item.findings)],
    }


class _Named(Protocol):
    name: str


Target = TypeVar("Target", bound=_Named)


def configured(targets: Iterable[Target], name: str, what: str) -> Target:
    """The configured ``what`` (a destination, a webhook, ...) called ``name``; a job for one
    no longer configured fails for good."""
    for target in targets:
        if target.name == name:
            return target
    raise PermanentError(f"no {what} {name} is configured")


def _destination(settings: Settings, name: str) -> Destination:
    return configured(settings.destinations, name, "destination")


def _webhook(settings: Settings, name: str) -> Webhook:
    return configured(settings.webhooks, name, "webhook")


def undelivered(connection: redis.Redis) -> list[tuple[WorklistItem, DeliveryItem]]:
    """Every delivery not (yet) acknowledged, with its study: failed first."""
    worklist = Worklist(connection)
    found = []
    for status in (DeliveryStatus.FAILED, DeliveryStatus.PENDING):
        for item in worklist.with_facet(f"delivery:{status.value}"):
            found += [(item, d) for d in item.deliveries if d.status is status]
    return found


def retry_failed(connection: redis.Redis) -> list[str]:
    """Put every failed delivery back on its queue; returns the job ids."""
    retried = []
    for item, failed in undelivered(connection):
        if failed.status is not DeliveryStatus.FAILED:
            continue
        job_id = delivery_job_id(failed.kind, failed.target, failed.sr_sop_instance_uid)
        for queue in (Queue(q.value, connection=connection) for q in QueueName):
            if job_id in queue.failed_job_registry:
                queue.failed_job_registry.requeue(job_id)
                _set_state(connection, item.study_instance_uid, failed.target,
                           failed.sr_sop_instance_uid,
                           lambda d: d.model_copy(update={"status": DeliveryStatus.PENDING}),
                           kind=failed.kind)
                retried.append(job_id)
                break
    return retried
