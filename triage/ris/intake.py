"""What an order does to the worklist: its study's clinical priority floor and what the
radiologist sees of it.

An urgent order for a study still waiting to be analysed with the routine studies moves its
analysis to the urgent queue, so that the AI result comes as early as the order asks.

An order that arrives before its study is stored and found by the watcher when the study is
complete (``orders_for``); one that arrives later updates the study's item at once
(``take``). Either way the order raises the clinical priority (STAT or ASAP, or an emergency
patient: urgent) and never lowers anything: a cancelled order is shown as cancelled, and the
priority it raised stays (the study exists and was made; a radiologist decides).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import redis
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Job

from triage.ingest import StudySnapshot
from triage.logs import pseudonym
from triage.priority import ClinicalPriority, PriorityClass, highest
from triage.queues import QueueName
from triage.ris import store
from triage.ris.orders import Order, matches
from triage.worklist import OrderStatus, StudyStatus, Worklist, WorklistItem

log = logging.getLogger(__name__)


def orders_for(connection: redis.Redis, *, study_uid: str, accession_number: str,
               patient_id: str, issuer: str) -> list[Order]:
    """The stored orders that belong to the study."""
    return [o for o in store.candidates(connection, study_uid=study_uid,
                                        accession_number=accession_number)
            if matches(o, study_uid=study_uid, accession_number=accession_number,
                       patient_id=patient_id, issuer=issuer)]


def orders_of(connection: redis.Redis, snapshot: StudySnapshot) -> list[Order]:
    """The stored orders that belong to the study of ``snapshot``."""
    return orders_for(connection, study_uid=snapshot.study_instance_uid,
                      accession_number=snapshot.accession_number,
                      patient_id=snapshot.patient_id, issuer=snapshot.issuer_of_patient_id)


def clinical_with_orders(clinical: ClinicalPriority, orders: Iterable[Order]
                         ) -> ClinicalPriority:
    """The study's clinical floor from its images, raised by its orders."""
    floors = [o.floor() for o in orders]
    reasons = list(clinical.reasons)
    reasons += [r for f in floors for r in f.reasons if r not in reasons]
    return ClinicalPriority(highest([clinical.priority, *(f.priority for f in floors)]),
                            tuple(reasons))


def with_orders(item: WorklistItem, orders: Iterable[Order]) -> WorklistItem:
    """``item`` with ``orders`` shown (replacing earlier states of the same orders, never a
    later one) and its priority raised to the floor of those applied."""
    shown_at = {o.key: o.updated_at for o in item.orders}
    applied = [o for o in orders if o.key not in shown_at or o.updated_at >= shown_at[o.key]]
    if not applied:
        return item
    keys = {o.key for o in applied}
    shown = [o for o in item.orders if o.key not in keys] + [o.item() for o in applied]
    floor = clinical_with_orders(ClinicalPriority(item.clinical_priority), applied)
    reasons = item.priority_reasons + [r for r in floor.reasons
                                       if r not in item.priority_reasons]
    return item.model_copy(update={
        "orders": sorted(shown, key=lambda o: o.received_at),
        "clinical_priority": highest([item.clinical_priority, floor.priority]),
        "priority": highest([item.priority, floor.priority]),
        "priority_reasons": reasons,
    })


def without_order(item: WorklistItem, key: str) -> WorklistItem | None:
    """``item`` no longer showing the order ``key`` (the RIS moved it to another study or
    patient); the priority it raised stays."""
    if not any(o.key == key for o in item.orders):
        return None
    return item.model_copy(update={"orders": [o for o in item.orders if o.key != key]})


def hasten(connection: redis.Redis, item: WorklistItem) -> bool:
    """Move the analysis of a study an order made urgent, still waiting with the routine
    ones, to the urgent queue; returns whether it moved. A job a worker has already taken
    stays where it is (only the job removed from the routine queue here is queued again)."""
    if (item.status is not StudyStatus.QUEUED or not item.job_id
            or item.priority is PriorityClass.ROUTINE):
        return False
    for name in (QueueName.DEFAULT, QueueName.BULK):
        if connection.lrem(Queue(name.value, connection=connection).key, 1, item.job_id):
            break
    else:
        return False
    try:
        job = Job.fetch(item.job_id, connection=connection)
    except NoSuchJobError:  # the watcher's recovery creates a missing job
        return False
    Queue(QueueName.URGENT.value, connection=connection).enqueue_job(job)
    log.info("study %s: analysis moved to the urgent queue by an order",
             pseudonym(item.study_instance_uid))
    return True


def newer(order: Order, stored: Order | None) -> bool:
    """Whether ``order`` describes the order later than what is stored (a message resent
    after a lost ACK, or sent out of order, never undoes a later one; at the same second a
    cancel or discontinue stands)."""
    if stored is None:
        return True
    if order.control_id == stored.control_id and order.message_type == stored.message_type:
        return False  # the same message again
    if order.message_time is None or stored.message_time is None:
        return True
    if order.message_time != stored.message_time:
        return order.message_time > stored.message_time
    return not (stored.status is not OrderStatus.ACTIVE and order.status is OrderStatus.ACTIVE)


def take(connection: redis.Redis, order: Order, *, days: int) -> list[str]:
    """Store ``order`` and show it on the studies already listed that it belongs to; returns
    their Study Instance UIDs."""
    stored = store.load(connection, order.key)
    if not newer(order, stored):
        log.info("order message %s older than the order's latest: kept as it was",
                 pseudonym(order.control_id))
        return []
    if stored is not None:
        order = order.model_copy(update={"received_at": stored.received_at})
    store.save(connection, order, days=days, previous=stored)
    worklist = Worklist(connection)
    if stored is not None:
        _withdraw_moved(worklist, stored, order)
    updated = []
    found = _listed(worklist, order)
    for item in found:
        if not matches(order, study_uid=item.study_instance_uid,
                       accession_number=item.accession_number, patient_id=item.patient_id,
                       issuer=item.issuer_of_patient_id):
            continue
        raised = worklist.update(item.study_instance_uid,
                                 lambda current: with_orders(current, [order]), event="order")
        if raised is not None:
            hasten(connection, raised)
        updated.append(item.study_instance_uid)
        log.info("study %s: order %s (%s) shown", pseudonym(item.study_instance_uid),
                 order.control, order.status.value)
    return updated


def _listed(worklist: Worklist, order: Order) -> list[WorklistItem]:
    """The listed studies ``order`` may belong to (the caller checks ``matches``)."""
    if order.study_uid:
        item = worklist.get(order.study_uid)
        return [item] if item is not None else []
    if order.accession_number:
        return worklist.with_facet(f"accession:{order.accession_number}")
    return []


def _withdraw_moved(worklist: Worklist, stored: Order, order: Order) -> None:
    """Take the order off the studies its earlier state matched and its new one does not
    (the RIS corrected its study, accession or patient): another patient's clinical
    question must not stay on them."""
    for item in _listed(worklist, stored):
        if matches(order, study_uid=item.study_instance_uid,
                   accession_number=item.accession_number, patient_id=item.patient_id,
                   issuer=item.issuer_of_patient_id):
            continue
        if worklist.update(item.study_instance_uid,
                           lambda current: without_order(current, order.key),
                           event="order") is not None:
            log.info("study %s: order moved elsewhere by the RIS, no longer shown",
                     pseudonym(item.study_instance_uid))
