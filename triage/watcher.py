"""Follows Orthanc's change log and queues every complete study exactly once per input set.

A study is complete when it has received no new instance for the stable age. The watcher
times that itself from the change log's NewInstance entries (``triage.arrivals``), which
is more than a second sooner than Orthanc's own StableStudy; Orthanc's announcement still
queues any study the watcher did not see arrive.

The cursor (last change handled) lives in Redis, so a restart of the watcher, Orthanc or Redis
neither misses nor duplicates a study; a lost cursor only means re-reading the change log, and
the deterministic job id turns the re-read into no-ops.

Two watchers may run: the one holding the lease (``triage.lease``) leads, the other stands by
and takes over when the lease runs out. Every write of the leader is fenced by its lease, so a
leader that was paused past its lease and wakes up writes nothing and steps down.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, cast

import redis
from redis.client import Pipeline

from triage import metrics
from triage.arrivals import ArrivalClock
from triage.errors import TransientError
from triage.ingest import StudySnapshot, snapshot_study
from triage.lease import Lease, LeaseKeeper, LeaseLost
from triage.logs import pseudonym
from triage.orthanc import Change, OrthancClient, StudyGone, orthanc_time
from triage.priority import ClinicalPriority, PriorityClass, clinical_priority, highest
from triage.queues import QueueName, enqueue_analysis, enqueue_stream, job_pending
from triage.recovery import recover_abandoned
from triage.ris import intake
from triage.settings import Settings
from triage.streaming.dispatch import Batch, Dispatcher
from triage.uids import job_id as make_job_id
from triage.uids import own_series_uids
from triage.vigilance import clock, recording
from triage.worklist import StudyStatus, Worklist, WorklistItem, utcnow

log = logging.getLogger(__name__)

CURSOR_KEY = "triage:watcher:cursor"
# Studies that changed and have not been reported stable yet: Orthanc forgets them when it
# restarts, so the watcher remembers them itself (Orthanc id -> change sequence).
UNSTABLE_KEY = "triage:watcher:unstable"
STABLE_STUDY = "StableStudy"
NEW_STUDY = "NewStudy"
NEW_SERIES = "NewSeries"
NEW_INSTANCE = "NewInstance"
PAGE_SIZE = 200
MAINTENANCE_SECONDS = 5.0
# How long past its stable age a study may stay unreported before the watcher treats it as
# complete itself (Orthanc restarted in between and will never report it).
UNSTABLE_GRACE_SECONDS = 30
# Study Instance UIDs of Orthanc study ids, kept to tell the service's own series apart.
STUDY_UID_CACHE = 10_000


def _queue_for(existing: WorklistItem | None, clinical: ClinicalPriority) -> QueueName:
    """Clinically urgent or already flagged studies go to ``urgent``; other new studies to
    ``default``; a re-analysis of an unflagged study to ``bulk``."""
    if clinical.priority is not PriorityClass.ROUTINE or (
            existing is not None and existing.priority is not PriorityClass.ROUTINE):
        return QueueName.URGENT
    if existing is None or not existing.results:
        return QueueName.DEFAULT
    return QueueName.BULK


def _logged_on_error(work: Callable[[], object], what: str) -> bool:
    """Run ``work``; any error but Orthanc or Redis being down is logged with ``what`` and
    swallowed. Returns whether it succeeded."""
    try:
        work()
    except (TransientError, redis.ConnectionError, redis.TimeoutError, LeaseLost):
        raise  # Orthanc or Redis is down (the page is read again later), or not leading
    except Exception:
        log.exception(what)
        return False
    return True


class Watcher:
    """Follows the change log. With a ``lease``, every write is fenced by it and ``run``
    leads only while it holds the lease; without one (a single watcher, tests) nothing is
    fenced."""

    def __init__(self, settings: Settings, orthanc: OrthancClient,
                 connection: redis.Redis, lease: Lease | None = None) -> None:
        self.settings = settings
        self.orthanc = orthanc
        self.redis = connection
        self.lease = lease
        # Writes through ``writer`` in transactions (the worklist's) are fenced by the lease.
        self.writer = lease.fenced_connection() if lease is not None else connection
        self.worklist = Worklist(self.writer)
        self.arrivals = ArrivalClock(settings.stable_age)
        # Images of streaming models, sent to workers as they arrive (``triage.streaming``).
        self.streamer = Dispatcher.for_settings(settings)
        self._study_uids: OrderedDict[str, str] = OrderedDict()

    @property
    def cursor(self) -> int:
        raw = self.redis.get(CURSOR_KEY)
        return int(raw) if raw else 0

    def _store_cursor(self, value: int, *, allow_lower: bool = False) -> None:
        """Persist the cursor; with a lease, fenced and never lower than the one stored
        (unless ``allow_lower``: Orthanc's change log itself restarted)."""
        if self.lease is None:
            self.redis.set(CURSOR_KEY, value)
        else:
            self.lease.set_max(CURSOR_KEY, value, allow_lower=allow_lower)

    def _write(self, commands: Callable[[Pipeline], object]) -> None:
        """Run the write commands ``commands`` queues, fenced by the lease if there is one."""
        if self.lease is None:
            with self.redis.pipeline() as pipe:
                commands(pipe)
                pipe.execute()
        else:
            self.lease.write(commands)

    def _forget_unstable(self, study_id: str) -> None:
        self._write(lambda pipe: pipe.hdel(UNSTABLE_KEY, study_id))

    def _enqueue_fenced(self, enqueue: Callable[[Pipeline | None], object]) -> None:
        """Run an RQ enqueue, with a lease as part of a transaction fenced by it (the
        ``pipeline`` RQ's enqueue takes, in MULTI)."""
        if self.lease is None:
            enqueue(None)
            return

        def fenced(pipe: Pipeline) -> None:
            pipe.multi()
            enqueue(pipe)

        self.lease.transaction(fenced)

    def _check_lease(self) -> None:
        """Just before a write that cannot join a fenced transaction (RQ's own calls)."""
        if self.lease is not None:
            self.lease.check()

    def poll_once(self, now: float | None = None) -> int:
        """Handle every change Orthanc has logged since the cursor, then queue the studies
        that have been quiet for the stable age; returns the number of studies queued.

        ``now`` is the watcher's monotonic clock (``time.monotonic()`` if not given).
        """
        queued = 0
        cursor = self.cursor
        while True:
            page = self.orthanc.changes(cursor, PAGE_SIZE)
            if page.last < cursor:
                # Orthanc's index was replaced (a new database numbers changes from 0 again).
                log.warning("Orthanc's change log restarted below cursor %d: reading it again",
                            cursor)
                cursor = 0
                self._store_cursor(0, allow_lower=True)
                continue
            seen = time.monotonic() if now is None else now
            self._note_arrivals(page.changes, seen)
            for change in page.changes:
                if change.change_type == STABLE_STUDY:
                    self._forget_unstable(change.resource_id)
                    if not self.arrivals.already_queued(change.resource_id):
                        # The snapshot read holds every instance seen so far.
                        queued += self._queue_timed(change.resource_id, seen) or 0
                    # A crash after this costs at most re-reading the rest of the page.
                    self._store_cursor(change.seq)
            cursor = page.last if page.changes else cursor
            self._store_cursor(cursor)
            if page.done or not page.changes:
                break
        moment = time.monotonic() if now is None else now
        queued += self.queue_complete(moment)
        self.send_streams(moment)
        if self.streamer is not None:
            self.streamer.polled(moment)
        return queued

    def send_streams(self, now: float) -> int:
        """Send the streaming batches due at ``now``, each enqueue fenced by the lease;
        returns how many were sent. Streaming never holds up the change log: an error is
        logged and the batches are left to the analysis at stability."""
        streamer = self.streamer
        if streamer is None:
            return 0

        def enqueue(batch: Batch) -> None:
            self._enqueue_fenced(lambda pipe: enqueue_stream(
                self.redis, self.settings, study_id=batch.study_id,
                study_instance_uid=batch.study_instance_uid, series_id=batch.series_id,
                instance_ids=batch.instance_ids, pipeline=pipe))

        sent: list[int] = []
        _logged_on_error(lambda: sent.append(streamer.send(self.redis, now, enqueue)),
                         "streaming batches not sent; the analyses at stability do them")
        return sent[0] if sent else 0

    def queue_complete(self, now: float) -> int:
        """Queue the studies quiet for the stable age at ``now``; returns how many."""
        queued = 0
        for study_id in self.arrivals.due(now):
            handled = self._queue_timed(study_id, now)
            if handled is not None:
                self._forget_unstable(study_id)
                queued += handled
        return queued

    def _queue_timed(self, study_id: str, now: float) -> int | None:
        """Handle a complete study (``_handle``) and tell the arrival clock: queued at
        ``now``, or, when it could not be read, dropped so that Orthanc's own announcement
        of it is handled again."""
        if self.streamer is not None:
            self.streamer.forget(study_id)
        handled = self._handle(Change(seq=0, change_type=STABLE_STUDY, resource_id=study_id,
                                      resource_type="Study"))
        if handled is None:
            self.arrivals.dropped(study_id)
        else:
            self.arrivals.queued(study_id, now)
        return handled

    def _note_arrivals(self, changes: list[Change], seen: float) -> None:
        """Start or restart the clock of every study that received an instance, and
        remember new studies as unstable.

        Both only add to Orthanc's own announcement. When Orthanc or Redis is down the page
        is read again later, as for any change; any other error is logged and the change
        log goes on, every study's next announcement by Orthanc then being handled (the
        arrivals not seen may belong to a study queued a moment ago).
        """
        if not changes:
            return
        seqs = f"changes {changes[0].seq}-{changes[-1].seq}"

        def note() -> None:
            for study_id in self._arrived([c.resource_id for c in changes
                                           if c.change_type == NEW_INSTANCE], seen):
                self.arrivals.arrived(study_id, seen)

        if not _logged_on_error(note, f"arrivals of {seqs} not noted; Orthanc's "
                                "announcements will queue those studies"):
            self.arrivals.forget_queued()
        _logged_on_error(lambda: self._remember_unstable(changes),
                         f"new studies of {seqs} not remembered as unstable")

    def _arrived(self, instance_ids: list[str], seen: float | None = None) -> set[str]:
        """Orthanc ids of the studies that received ``instance_ids``, leaving out the
        service's own series: SRs, key images and assessments (storing them must not restart
        the clock). The images of a series a streaming model may want join its batch
        (``seen``: when they were seen, monotonic)."""
        if not instance_ids:
            return set()
        series = self.orthanc.bulk_content(instance_ids, level="Series")
        unknown = sorted({s["ParentStudy"] for s in series} - self._study_uids.keys())
        for study in self.orthanc.bulk_content(unknown, level="Study"):
            self._study_uids[study["ID"]] = study.get("MainDicomTags", {}).get(
                "StudyInstanceUID", "")
        while len(self._study_uids) > STUDY_UID_CACHE:
            self._study_uids.popitem(last=False)
        studies = set()
        for one in series:
            study_uid = self._study_uids.get(one["ParentStudy"], "")
            own = own_series_uids(study_uid)
            if one.get("MainDicomTags", {}).get("SeriesInstanceUID") not in own:
                studies.add(one["ParentStudy"])
                self._stream(one, study_uid, instance_ids, seen)
        return studies

    def _stream(self, series: dict[str, Any], study_uid: str, instance_ids: list[str],
                seen: float | None) -> None:
        """Add the images of ``instance_ids`` that belong to ``series`` to its batch, if a
        streaming model may want the series."""
        if self.streamer is None or not study_uid or not self.streamer.wants(
                str(series.get("MainDicomTags", {}).get("Modality", ""))):
            return
        members = set(series.get("Instances", []))
        self.streamer.add(series["ParentStudy"], study_uid, series["ID"],
                          [i for i in instance_ids if i in members],
                          time.monotonic() if seen is None else seen)

    def _remember_unstable(self, changes: list[Change]) -> None:
        """Note the studies that got a new study or series entry in ``changes``: they are
        unstable until queued (``sweep_unstable``)."""
        studies = {c.resource_id: c.seq for c in changes if c.change_type == NEW_STUDY}
        series = [c.resource_id for c in changes if c.change_type == NEW_SERIES]
        if series:
            last = max(c.seq for c in changes if c.change_type == NEW_SERIES)
            for study in self.orthanc.bulk_content(series, level="Study"):
                studies.setdefault(study["ID"], last)
        if studies:
            self._write(lambda p: p.hset(UNSTABLE_KEY, mapping=cast(dict[Any, Any], studies)))

    def sweep_unstable(self, now: datetime) -> int:
        """Queue studies Orthanc stopped tracking (it restarted before they were stable).

        Returns the number queued.
        """
        queued = 0
        limit = timedelta(seconds=self.settings.stable_age + UNSTABLE_GRACE_SECONDS)
        for raw_id in cast(list[bytes], self.redis.hkeys(UNSTABLE_KEY)):
            study_id = raw_id.decode()
            try:
                study = self.orthanc.study(study_id)
            except StudyGone:
                self._forget_unstable(study_id)
                continue
            # Orthanc calls a study it no longer tracks "stable" without ever announcing it;
            # one quiet for this long would have been announced and seen by now.
            updated = orthanc_time(study.get("LastUpdate", ""))
            if updated is None or now - updated < limit:
                continue
            log.warning("study %s was never reported stable; queueing it", study_id)
            # Forgotten only once handled: Orthanc or Redis down in between (which raises)
            # leaves it here for the next sweep rather than lose it.
            handled = self._handle(Change(seq=0, change_type=STABLE_STUDY,
                                          resource_id=study_id, resource_type="Study"))
            self._forget_unstable(study_id)
            queued += handled or 0
        return queued

    def maintain(self, now: datetime) -> None:
        """The watcher's periodic chores besides following the change log."""
        self.worklist.promote_overdue(
            now=now, max_wait=timedelta(minutes=self.settings.max_wait_minutes))
        # Its worklist updates are fenced (``writer``), its RQ requeues checked just before.
        self._check_lease()
        recover_abandoned(self.writer)
        self.sweep_unstable(now)
        # Records left waiting when no study followed (or after PostgreSQL's back-off).
        recording.schedule_flush(self.redis)

    def _handle(self, change: Change) -> int | None:
        """Handle one stable study: 1 if it was queued, 0 if there was nothing to queue,
        ``None`` if it could not be read (logged: a study that cannot be read never blocks
        the others)."""
        try:
            return int(self.handle_stable_study(change))
        except (TransientError, redis.ConnectionError, redis.TimeoutError, LeaseLost):
            raise  # Orthanc or Redis is down: stop here and read this change again later
        except Exception:
            log.exception("stable study %s could not be queued; moving on",
                          change.resource_id)
            return None

    def handle_stable_study(self, change: Change) -> bool:
        try:
            snapshot = snapshot_study(self.orthanc, change.resource_id, first_instance=True)
        except StudyGone:
            log.info("stable study %s was deleted before it was read", change.resource_id)
            return False
        if not snapshot.series:
            return False  # only the service's own SRs: nothing to analyse
        return self.queue_study(snapshot, timed=True)

    def queue_study(self, snapshot: StudySnapshot, *, timed: bool = False) -> bool:
        """Put the study on the worklist (``queued``) and enqueue its analysis, once.

        ``timed``: the study has just become complete, so its stable wait and time to
        notification mean something (not so for a study queued by a rebuild of the worklist).
        """
        job_id = make_job_id(snapshot.study_instance_uid, snapshot.inputs)
        clinical = clinical_priority(snapshot.first_instance, calling_aet=snapshot.calling_aet,
                                     emergency_locations=self.settings.emergency_locations,
                                     emergency_aets=self.settings.emergency_aets)
        # The RIS's orders for the study (received before it was complete) raise the floor.
        orders = intake.orders_of(self.redis, snapshot)
        clinical = intake.clinical_with_orders(clinical, orders)
        queue: QueueName | None = None

        def change(existing: WorklistItem | None) -> WorklistItem | None:
            nonlocal queue
            queue = None
            if existing is not None and existing.job_id == job_id and (
                existing.status.terminal or job_pending(self.redis, job_id)
            ):
                return None
            queue = _queue_for(existing, clinical)
            return intake.with_orders(
                self._queued_item(snapshot, job_id, clinical, existing), orders)

        self.worklist.upsert(snapshot.study_instance_uid, change, event="queued")
        if queue is None:
            return False
        if timed:
            self._note_queued(snapshot, job_id)
        self._record_arrival(snapshot)
        # The worklist upsert above was fenced in its transaction, and so is the enqueue: a
        # leader that lost its lease in between writes the item but no job, and the new
        # leader, finding no pending job for it, queues the study itself.
        self._enqueue_fenced(lambda pipe: enqueue_analysis(
            self.redis, self.settings, queue=queue, job_id=job_id,
            orthanc_id=snapshot.orthanc_id, study_instance_uid=snapshot.study_instance_uid,
            inputs=snapshot.inputs, pipeline=pipe))
        log.info("study %s queued (%d instances, queue %s)",
                 pseudonym(snapshot.study_instance_uid), snapshot.n_instances, queue.value)
        self._late_orders(snapshot, {(o.key, o.updated_at) for o in orders})
        return True

    def _late_orders(self, snapshot: StudySnapshot, applied: set[tuple[str, datetime]]
                     ) -> None:
        """Show the orders (or states of orders) stored between the look-up of the study's
        orders and the item's creation (the listener found no item for them then, and the
        item was written without them), and move the study's analysis to the urgent queue if
        they make it urgent."""
        late = [o for o in intake.orders_of(self.redis, snapshot)
                if (o.key, o.updated_at) not in applied]
        if late:  # fenced, as every worklist write of the watcher
            raised = self.worklist.update(snapshot.study_instance_uid,
                                          lambda item: intake.with_orders(item, late),
                                          event="order")
            if raised is not None:
                intake.hasten(self.redis, raised)

    def _note_queued(self, snapshot: StudySnapshot, job_id: str) -> None:
        """Tell the worker, for the metrics, when the study's last instance reached Orthanc
        (``LastUpdate``) and that it is queued now. Written before the job exists, so the
        worker always finds it; a metric never holds up a study, so errors are only logged."""
        try:
            study = self.orthanc.study(snapshot.orthanc_id)
            received = orthanc_time(study.get("LastUpdate", ""))
            self._write(lambda p: metrics.note_queued(p, job_id, received=received))
        except LeaseLost:
            raise
        except Exception as exc:
            log.warning("study %s: arrival not noted for the metrics (%s)",
                        pseudonym(snapshot.study_instance_uid), type(exc).__name__)

    def _record_arrival(self, snapshot: StudySnapshot) -> None:
        """Count the study's arrival for the vigilance's volume watch (the first time it is
        queued; a study queued again is not a new arrival). Counted here rather than by a
        worker, so that studies still arrive in the records while every worker is down.
        Never holds up a study: errors are logged."""
        try:
            recording.enqueue_arrival(self.redis, snapshot.study_instance_uid,
                                      snapshot.modalities or None, clock.now(self.settings))
        except Exception as exc:
            log.warning("study %s: arrival not recorded for the vigilance (%s)",
                        pseudonym(snapshot.study_instance_uid), type(exc).__name__)

    @staticmethod
    def _queued_item(snapshot: StudySnapshot, job_id: str, clinical: ClinicalPriority,
                     existing: WorklistItem | None) -> WorklistItem:
        fields: dict[str, Any] = {
            "study_instance_uid": snapshot.study_instance_uid,
            "orthanc_id": snapshot.orthanc_id,
            "accession_number": snapshot.accession_number,
            "patient_name": snapshot.patient_name,
            "patient_id": snapshot.patient_id,
            "issuer_of_patient_id": snapshot.issuer_of_patient_id,
            "patient_birth_date": snapshot.patient_birth_date,
            "patient_sex": snapshot.patient_sex,
            "patient_age": snapshot.patient_age,
            "modality": snapshot.modalities,
            "study_description": snapshot.study_description,
            "study_date": snapshot.study_date,
            "status": StudyStatus.QUEUED,
            "status_reason": "",
            "arriving": 0,  # complete now
            "job_id": job_id,
            "inputs": snapshot.inputs,
        }
        if existing is None:
            return WorklistItem(received_at=snapshot.received_at or utcnow(),
                                clinical_priority=clinical.priority,
                                priority=clinical.priority,
                                priority_reasons=list(clinical.reasons), **fields)
        # Nothing lowers a priority: a later clinical flag only adds to what was there.
        fields["clinical_priority"] = highest([existing.clinical_priority, clinical.priority])
        fields["priority"] = highest([existing.priority, clinical.priority])
        fields["priority_reasons"] = existing.priority_reasons + [
            r for r in clinical.reasons if r not in existing.priority_reasons]
        if existing.job_id != job_id:
            fields["analysis_runs"] = 0  # runs are counted per input set
        # A re-analysis keeps the arrival time and the earlier findings until new ones exist.
        return existing.model_copy(update=fields)

    def run(self, stop: threading.Event) -> None:
        """Poll until ``stop`` is set; Orthanc or Redis outages are waited out. With a
        lease, poll only while leading, and otherwise stand by."""
        log.info("watcher following %s", self.orthanc.base_url)
        if self.lease is None:
            self._lead(stop, lambda: True)
            return
        log.info("standby (watcher %s) until it holds the lease", self.lease.holder)
        keeper = LeaseKeeper(self.lease)
        keeper.start()
        try:
            while not stop.is_set():
                if not self.lease.held:
                    stop.wait(min(self.settings.watcher_poll_seconds, self.lease.seconds / 3))
                    continue
                log.info("leading (watcher %s, fencing token %s)", self.lease.holder,
                         self.lease.token)
                self._lead(stop, lambda: self.lease is not None and self.lease.held)
                if not stop.is_set():
                    log.info("standby (watcher %s): the lease is lost", self.lease.holder)
                    # What this watcher timed may be stale by the time it leads again.
                    self.arrivals = ArrivalClock(self.settings.stable_age)
                    self.streamer = Dispatcher.for_settings(self.settings)
        finally:
            keeper.stop()

    def _lead(self, stop: threading.Event, leading: Callable[[], bool]) -> None:
        """Follow the change log and do the chores while ``leading()``."""
        last_maintenance = 0.0
        while not stop.is_set() and leading():
            try:
                self.poll_once()
                if time.monotonic() - last_maintenance >= MAINTENANCE_SECONDS:
                    self.maintain(utcnow())
                    # At most once a minute, whichever watcher takes the minute.
                    def sample() -> None:
                        self._check_lease()
                        metrics.sample_queue_depth_if_due(self.redis)

                    _logged_on_error(sample, "queue depth not sampled")
                    last_maintenance = time.monotonic()
            except LeaseLost:
                return
            except (TransientError, redis.ConnectionError, redis.TimeoutError) as exc:
                log.warning("watcher waiting: %s", exc)
                stop.wait(min(5.0, self.settings.watcher_poll_seconds * 5))
                continue
            stop.wait(self._pause())

    def _pause(self) -> float:
        """Until the next poll: the poll interval, or less when a study becomes complete
        sooner."""
        pause = self.settings.watcher_poll_seconds
        for due in (self.arrivals.next_due(),
                    self.streamer.next_due() if self.streamer is not None else None):
            if due is not None:
                pause = min(pause, max(0.0, due - time.monotonic()))
        return pause

