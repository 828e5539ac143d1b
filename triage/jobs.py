"""The analysis job: one RQ job per study, a plain function of identifiers.

Everything the job needs (settings, Orthanc and Redis clients, the model registry with its
onnxruntime sessions) is built once per worker process and reused by every job.
"""

from __future__ import annotations

import io
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import cache

import pydicom
import redis
from rq import get_current_job

from triage import audit, delivery, metrics, queues
from triage.errors import (
    InvalidInput,
    OutOfScope,
    PermanentError,
    TransientError,
    status_reason,
)
from triage.findings import ModelResult
from triage.inference import infer, slice_transform, with_timings
from triage.ingest import SourceSeries, StudySnapshot, snapshot_study
from triage.keyimage import build_key_image
from triage.lease import release_if_held
from triage.logs import pseudonym
from triage.memory import tune_for_images
from triage.metrics import Stage, StudyMeasurement
from triage.orthanc import OrthancClient
from triage.priority import highest
from triage.recovery import alive_key
from triage.registry import BackgroundPackage, ModelPackage, ModelRegistry
from triage.report import build_report
from triage.retrieval import LoadedSeries, SeriesLoader
from triage.selection import select_series
from triage.settings import Settings, get_settings
from triage.streaming.cache import ScoreCache
from triage.streaming.final import ScoredSeries, analyse_series
from triage.streaming.scoring import streams
from triage.uids import sr_instance_uid
from triage.vigilance import clock, recording
from triage.vigilance.states import Roles, VersionStates
from triage.worklist import (
    KEY_PREFIX,
    FindingItem,
    ResultItem,
    SeriesItem,
    StudyStatus,
    Worklist,
    WorklistItem,
    utcnow,
)

log = logging.getLogger(__name__)


@dataclass
class WorkerContext:
    settings: Settings
    orthanc: OrthancClient
    redis: redis.Redis
    registry: ModelRegistry
    loader: SeriesLoader
    states: VersionStates

    @property
    def worklist(self) -> Worklist:
        return Worklist(self.redis)


@cache
def context() -> WorkerContext:
    """The per-process context; models are loaded here, once, not per study."""
    tune_for_images()
    settings = get_settings()
    registry = ModelRegistry.load(settings.models_dir)
    for model_id, error in registry.errors.items():
        log.error("model package %s refused: %s", model_id, error)
    orthanc = OrthancClient.from_settings(settings)
    return WorkerContext(
        settings=settings,
        orthanc=orthanc,
        redis=redis.Redis.from_url(settings.redis_connection_url),
        registry=registry,
        loader=SeriesLoader(orthanc, settings.fetch_threads),
        states=VersionStates(settings, registry.packages),
    )


def analyse_study(orthanc_id: str, study_instance_uid: str, inputs: str) -> str:
    """Analyse one study and record the outcome; returns the final status.

    ``inputs`` is the fingerprint of the source instances the job was queued for. A job
    whose study has changed since (a late instance arrived) stops without writing: the newer
    job owns the worklist item. Studies outside every model's scope, or whose images cannot
    be used, end ``skipped``; transient errors are retried and the study is ``failed`` only
    when the last retry fails too; any other error fails the study at once.
    """
    ctx = context()
    key = pseudonym(study_instance_uid)
    started = _mark_analysing(ctx, study_instance_uid, inputs)
    if started is None:
        log.info("study %s: job superseded by a newer set of instances", key)
        return SUPERSEDED
    measurement = StudyMeasurement()
    roles = ctx.states.roles()
    try:
        status = _analyse(ctx, orthanc_id, study_instance_uid, inputs, measurement, roles)
    except (OutOfScope, InvalidInput) as exc:
        status = StudyStatus.SKIPPED
        _set_status(ctx, study_instance_uid, inputs, status, status_reason(exc))
    except TransientError as exc:
        # The technical cause is for administrators: here, and in RQ's failed jobs.
        log.warning("study %s: %s", key, exc)
        job = get_current_job()
        if job is not None and job.should_retry:
            _set_status(ctx, study_instance_uid, inputs, StudyStatus.QUEUED,
                        f"{status_reason(exc)}; the analysis will be tried again")
        else:
            _set_status(ctx, study_instance_uid, inputs, StudyStatus.FAILED,
                        f"{status_reason(exc)} after several attempts")
            _measured(ctx, key, StudyStatus.FAILED, measurement)
        raise
    except Exception as exc:
        log.error("study %s: analysis failed (%s)", key, type(exc).__name__)
        _set_status(ctx, study_instance_uid, inputs, StudyStatus.FAILED, status_reason(exc))
        _measured(ctx, key, StudyStatus.FAILED, measurement)
        _no_retry()
        raise
    if isinstance(status, StudyStatus):
        _measured(ctx, key, status, measurement)
    log.info("study %s %s", key, status.value if isinstance(status, StudyStatus) else status)
    if status in (StudyStatus.ANALYSED, StudyStatus.SKIPPED):
        _queue_shadows(ctx, orthanc_id, study_instance_uid, inputs, roles)
    _flush_records(ctx)
    return status.value if isinstance(status, StudyStatus) else status


SUPERSEDED = "superseded"


def _measured(ctx: WorkerContext, key: str, outcome: StudyStatus,
              measurement: StudyMeasurement) -> None:
    """Add what was measured of the study to the shared metrics. A metric is never worth
    an analysis: any error is logged (with the study's pseudonym ``key``) and dropped."""
    try:
        metrics.record_study(ctx.redis, outcome, measurement, job=get_current_job(),
                             study_key=key)
    except Exception as exc:
        log.warning("study %s: metrics not recorded (%s)", key, type(exc).__name__)


def _flush_records(ctx: WorkerContext) -> None:
    """Move the vigilance records waiting in Redis to PostgreSQL, once the study's status
    is final. Usually a no-op (nothing waiting, another worker flushing, or PostgreSQL backed
    off); an error never reaches the job."""
    try:
        recording.flush(ctx.redis, ctx.settings)
    except Exception as exc:
        log.warning("vigilance records not flushed (%s)", type(exc).__name__)


def _no_retry() -> None:
    """Retrying cannot fix this failure: the job goes straight to RQ's failed jobs."""
    job = get_current_job()
    if job is not None:
        job.retries_left = 0


def _mark_analysing(ctx: WorkerContext, study_uid: str, inputs: str) -> WorklistItem | None:
    return ctx.worklist.update(study_uid, _for_inputs(inputs, lambda item: item.model_copy(
        update={"status": StudyStatus.ANALYSING, "status_reason": "",
                "analysis_runs": item.analysis_runs + 1})), event="status")


def _for_inputs(inputs: str, change: Callable[[WorklistItem], WorklistItem]
                ) -> Callable[[WorklistItem], WorklistItem | None]:
    """``change`` applied only while the item still belongs to this set of instances."""
    return lambda item: change(item) if item.inputs == inputs else None


def _analyse(ctx: WorkerContext, orthanc_id: str, study_uid: str, inputs: str,
             measurement: StudyMeasurement, roles: Roles) -> StudyStatus | str:
    snapshot = snapshot_study(ctx.orthanc, orthanc_id, details=True,
                              study_instance_uid=study_uid)
    if snapshot.inputs != inputs:
        # More instances arrived since the job was queued; the watcher queues the new set
        # once the study is stable again, and that job writes the result.
        log.info("study %s changed since it was queued", pseudonym(study_uid))
        _set_status(ctx, study_uid, inputs, StudyStatus.QUEUED,
                    "more images arrived; analysis restarts when the study is complete")
        return SUPERSEDED
    _record_series(ctx, snapshot, inputs)
    _check_size(ctx, snapshot)
    chosen, reasons = _select(roles.active, snapshot)
    if not chosen:
        reason = "; ".join(reasons) or ("no model is installed" if not ctx.registry.packages
                                        else "no model version is active")
        _set_status(ctx, study_uid, inputs, StudyStatus.SKIPPED, reason)
        return StudyStatus.SKIPPED
    results: list[ModelResult] = []
    evidence: dict[str, pydicom.Dataset] = {}
    orthanc_ids: dict[str, str] = {}
    headers: dict[str, tuple[pydicom.Dataset, ...]] = {}  # of each analysed series
    refused: list[tuple[str, InvalidInput]] = []
    for package, series in chosen:
        scored = _from_stream(ctx, package, series)
        if scored is not None:
            results.append(scored.result)
            measurement.add_result(scored.result)
            for header in scored.headers:
                evidence.setdefault(header.SOPInstanceUID, header)
            orthanc_ids.update(scored.orthanc_ids)
            headers[series.info.series_instance_uid] = scored.headers
            continue
        try:
            loaded = load_series(ctx, package, series)
        except InvalidInput as exc:
            # This model cannot use these images (its calibration or geometry is missing,
            # say); the other models still run.
            refused.append((package.manifest.id, exc))
            continue
        timings = {name: loaded.timings[name] for name in ("fetch", "decode")}
        results.append(with_timings(
            infer(package, loaded.volume, series.info.series_instance_uid), **timings))
        measurement.add_result(results[-1])
        for header in loaded.headers:
            evidence.setdefault(header.SOPInstanceUID, header)
        orthanc_ids.update(loaded.orthanc_ids)
        headers[series.info.series_instance_uid] = loaded.headers
    if not results:
        if len(refused) == 1:
            raise refused[0][1]
        raise InvalidInput("; ".join(f"{model}: {exc}" for model, exc in refused))
    started = time.perf_counter()
    report = build_report(evidence=list(evidence.values()), results=results,
                          inputs_fingerprint=snapshot.inputs,
                          predecessors=_earlier_reports(ctx, snapshot, results),
                          site_zone=ctx.settings.site_zone)
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, report, enforce_file_format=True)
    built = time.perf_counter()
    ctx.orthanc.store(buffer.getvalue())
    stored = time.perf_counter()
    measurement.seconds.update({Stage.SR_BUILD: built - started, Stage.STORE: stored - built})
    sr_uid = str(report.SOPInstanceUID)
    _record_results(ctx, snapshot, results, sr_uid,
                    {"sr_build": built - started, "store": stored - built}, headers,
                    note="; ".join(f"not analysed by {model}: {exc}" for model, exc in refused))
    measurement.notified_at = time.time()
    if any(d.key_images for d in ctx.settings.destinations):
        _store_key_image(ctx, results, orthanc_ids, sr_uid)
    item = ctx.worklist.get(study_uid)
    if item is not None and item.inputs == inputs:
        delivery.schedule(ctx.redis, ctx.settings, item)
    return StudyStatus.ANALYSED


def _store_key_image(ctx: WorkerContext, results: Sequence[ModelResult],
                     orthanc_ids: dict[str, str], sr_uid: str) -> None:
    """Store the burned-in key image of the strongest positive finding, if there is one.

    The analysis kept only headers; the key instance is read again for its pixels.
    """
    positive = [(f, r.model) for r in results for f in r.findings if f.positive]
    if not positive:
        return
    finding, model = max(positive, key=lambda p: (-(p[0].priority.rank if p[0].priority
                                                     else 9), p[0].probability))
    try:
        source = ctx.orthanc.instance_dataset(orthanc_ids[finding.key_sop_instance_uid])
    except PermanentError as exc:  # e.g. deleted since: the SR and results stand without it
        log.warning("key image not made: %s", exc)
        return
    try:
        image = build_key_image(source, finding, model, sr_uid, site_zone=ctx.settings.site_zone)
    except InvalidInput as exc:  # the SR stands; the picture of its key image cannot be made
        log.warning("key image not made: %s", exc)
        return
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, image, enforce_file_format=True)
    ctx.orthanc.store(buffer.getvalue())


def _check_size(ctx: WorkerContext, snapshot: StudySnapshot) -> None:
    """Refuse studies too large to analyse within the worker's memory."""
    limit = ctx.settings.max_study_instances
    if snapshot.n_instances > limit:
        raise OutOfScope(f"study too large to analyse: {snapshot.n_instances} images "
                         f"(limit {limit})")
    statistics = ctx.orthanc.study_statistics(snapshot.orthanc_id)
    megabytes = int(statistics.get("UncompressedSize", 0)) / 2**20
    if megabytes > ctx.settings.max_study_megabytes:
        raise OutOfScope(f"study too large to analyse: {megabytes:.0f} MB "
                         f"(limit {ctx.settings.max_study_megabytes} MB)")


def _earlier_reports(ctx: WorkerContext, snapshot: StudySnapshot,
                     results: Sequence[ModelResult]) -> list[pydicom.Dataset]:
    """The SRs this study already has from the service, which the new one supersedes
    (Predecessor Documents Sequence); a re-run of the same analysis is not its own
    predecessor."""
    new_uid = sr_instance_uid(snapshot.study_instance_uid,
                              [f"{r.model.id}@{r.model.version}" for r in results],
                              snapshot.inputs)
    earlier = [ctx.orthanc.instance_dataset(i) for i in snapshot.own_sr_ids]
    return [ds for ds in earlier if ds.SOPInstanceUID != new_uid]


def _select(packages: Sequence[ModelPackage], snapshot: StudySnapshot
            ) -> tuple[list[tuple[ModelPackage, SourceSeries]], list[str]]:
    by_uid = {s.info.series_instance_uid: s for s in snapshot.series}
    chosen, reasons = [], []
    for package in packages:
        try:
            info = select_series(package.manifest, [s.info for s in snapshot.series])
        except OutOfScope as exc:
            reasons.append(str(exc))
            continue
        chosen.append((package, by_uid[info.series_instance_uid]))
    return chosen, reasons


def _from_stream(ctx: WorkerContext, package: ModelPackage, series: SourceSeries
                 ) -> ScoredSeries | None:
    """The analysis of ``series`` from the streaming score cache, computing only the images
    not scored while they arrived; ``None`` for a model that does not stream, with
    streaming off, or for a series the whole-series analysis must handle."""
    if not (ctx.settings.streaming and streams(package)):
        return None
    cache = ScoreCache(ctx.redis, ctx.settings, package.manifest.id, package.manifest.version)
    scored = analyse_series(ctx.orthanc, ctx.loader, cache, package, series)
    if scored is not None and scored.from_cache:
        return replace(scored, result=replace(scored.result, from_cache=scored.from_cache))
    return scored


def load_series(ctx: WorkerContext, package: ModelPackage, series: SourceSeries) -> LoadedSeries:
    """Download and decode a series for ``package`` (its rescale and input size)."""
    prep = package.manifest.preprocessing
    return ctx.loader.load(series.instance_ids, prep.rescale, slice_transform(prep))


def _set_status(ctx: WorkerContext, study_uid: str, inputs: str, status: StudyStatus,
                reason: str) -> None:
    ctx.worklist.update(study_uid, _for_inputs(inputs, lambda item: item.model_copy(
        update={"status": status, "status_reason": reason})), event="status")


def _record_series(ctx: WorkerContext, snapshot: StudySnapshot, inputs: str) -> None:
    series = [SeriesItem(series_instance_uid=s.info.series_instance_uid,
                         modality=s.info.modality, description=s.info.description,
                         body_part=s.info.body_part, n_instances=s.info.n_instances)
              for s in snapshot.series]
    ctx.worklist.update(snapshot.study_instance_uid,
                        _for_inputs(inputs, lambda item: item.model_copy(
                            update={"series": series})))


def _record_results(ctx: WorkerContext, snapshot: StudySnapshot, results: list[ModelResult],
                    sr_uid: str, report_timings: dict[str, float],
                    headers: dict[str, tuple[pydicom.Dataset, ...]], note: str = "") -> None:
    """Put the results on the worklist, then audit them and queue their vigilance records
    (nothing is recorded when a newer set of instances owns the worklist item)."""
    findings = [
        FindingItem(code=f.concept.value, scheme=f.concept.scheme, meaning=f.concept.meaning,
                    probability=f.probability, threshold=f.threshold, positive=f.positive,
                    priority=f.priority, model=r.model.id, model_version=r.model.version,
                    key_sop_instance_uid=f.key_sop_instance_uid)
        for r in results for f in r.findings
    ]
    result_items = [
        ResultItem(model=r.model.id, model_version=r.model.version, model_name=r.model.name,
                   weights_sha256=r.model.weights_sha256,
                   regulatory_status=r.model.regulatory_status,
                   series_instance_uid=r.series_instance_uid,
                   n_instances=len(r.input_sop_instance_uids),
                   images_from_cache=r.from_cache,
                   timings={**r.timings, **report_timings})
        for r in results
    ]
    raised = [f for f in findings if f.positive and f.priority is not None]

    def change(item: WorklistItem) -> WorklistItem:
        # AI may raise the priority, never lower it (DESIGN.md, "Priorities"): not below the
        # clinical priority, and not below what an earlier analysis of the study raised it to.
        priority = highest([item.priority, item.clinical_priority,
                            *(f.priority for f in raised)])
        reasons = list(item.priority_reasons)
        reasons += [r for r in (f"AI: {f.meaning} (p={f.probability:.2f}, {f.model} "
                                f"{f.model_version})" for f in raised) if r not in reasons]
        reasons += [r for r in unconfirmed_reasons(item, findings, result_items)
                    if r not in reasons]
        return item.model_copy(update={
            "status": StudyStatus.ANALYSED, "status_reason": note,
            "priority": priority, "priority_reasons": reasons,
            "score": max((f.probability for f in findings), default=0.0),
            "findings": findings, "results": result_items,
            "analysed_at": utcnow(), "sr_sop_instance_uid": sr_uid,
        })

    stored = ctx.worklist.update(snapshot.study_instance_uid,
                                 _for_inputs(snapshot.inputs, change), event="analysed")
    if stored is not None:
        for r in results:
            audit.record(ctx.redis, actor="worker", source=f"{socket.gethostname()}:"
                         f"{os.getpid()}", action=audit.AuditAction.RESULT_PRODUCED,
                         study_instance_uid=snapshot.study_instance_uid,
                         details={"model": r.model.id, "model_version": r.model.version,
                                  "weights_sha256": r.model.weights_sha256,
                                  "sr_sop_instance_uid": sr_uid,
                                  "series_instance_uid": r.series_instance_uid})
        try:
            recording.enqueue(ctx.redis, recording.build_records(
                snapshot, results, headers, sr_uid, clock.now(ctx.settings)))
        except Exception as exc:  # the result is out; only its vigilance record is lost
            log.error("study %s: vigilance record not queued (%s)",
                      pseudonym(snapshot.study_instance_uid), type(exc).__name__)



def unconfirmed_reasons(item: WorklistItem, findings: Sequence[FindingItem],
                        results: Sequence[ResultItem]) -> list[str]:
    """Why a priority raised by a preliminary result stays although the complete study does
    not confirm it (AI may raise a priority, never lower it): the reason says what the
    complete study showed, and on which series."""
    reasons = []
    for p in item.preliminary:
        final = next((f for f in findings if (f.model, f.model_version, f.code)
                      == (p.model, p.model_version, p.code)), None)
        if final is None or final.positive:
            continue
        result = next((r for r in results if (r.model, r.model_version)
                       == (p.model, p.model_version)), None)
        other = result is not None and result.series_instance_uid != p.series_instance_uid
        where = ("on another series than the preliminary result (the complete study's "
                 f"largest fitting series, {result.n_instances} images)"
                 if other and result is not None else "on the complete series")
        reasons.append(
            f"AI, preliminary {p.meaning} (p={p.probability:.2f} on {p.n_images} images) not "
            f"confirmed: the complete study was analysed {where}, p={final.probability:.2f}; "
            "the priority stays raised")
    return reasons


# -- shadow trials ---------------------------------------------------------------------------

# At most one shadow analysis at a time per host (the value names the job holding it).
SHADOW_HOST_LOCK = KEY_PREFIX + ":shadow:host:{host}"
# A shadow job that finds its host busy goes to the back of the queue after this pause.
SHADOW_DEFER_SECONDS = 0.5


def _queue_shadows(ctx: WorkerContext, orthanc_id: str, study_uid: str, inputs: str,
                   roles: Roles) -> None:
    """Queue the study for each version in shadow, after the active analysis has ended.
    A shadow run is never worth a result: an error here is logged and dropped."""
    for package in roles.shadow:
        try:
            queues.enqueue_shadow(ctx.redis, ctx.settings, orthanc_id=orthanc_id,
                                  study_instance_uid=study_uid, inputs=inputs,
                                  model_id=package.manifest.id,
                                  version=package.manifest.version)
        except Exception as exc:
            log.warning("study %s: shadow analysis by %s not queued (%s)",
                        pseudonym(study_uid), package.manifest.key, type(exc).__name__)


def analyse_shadow(orthanc_id: str, study_instance_uid: str, inputs: str, model_id: str,
                   version: str) -> str:
    """Run a version in shadow on one study and record what it concluded, and nothing else:
    no SR, no worklist change, no priority, no delivery, no webhook.

    Bounded cost: one shadow analysis at a time per host (a job that finds its host busy
    goes back to the end of the lowest queue), run by a thread at the lowest CPU priority
    (SCHED_IDLE, nice 19) whose onnxruntime session and download threads inherit it.
    """
    ctx = context()
    package = ctx.states.roles().shadow_package(model_id, version)
    if package is None:
        return "not in shadow"  # promoted, retired or removed since the job was queued
    lock = SHADOW_HOST_LOCK.format(host=socket.gethostname())
    job = get_current_job()
    token = f"{job.worker_name if job else ''}|{uuid.uuid4().hex}"
    if not _take_host(ctx, lock, token):
        time.sleep(SHADOW_DEFER_SECONDS)
        queues.enqueue_shadow(ctx.redis, ctx.settings, orthanc_id=orthanc_id,
                              study_instance_uid=study_instance_uid, inputs=inputs,
                              model_id=model_id, version=version)
        return "deferred"
    try:
        background = BackgroundPackage(package.manifest, package.folder)
        status = _at_idle_priority(lambda: _shadow(ctx, background, orthanc_id,
                                                   study_instance_uid, inputs))
    finally:
        release_if_held(ctx.redis, lock, token)
    log.info("study %s: shadow analysis by %s %s", pseudonym(study_instance_uid),
             package.manifest.key, status)
    _flush_records(ctx)
    return status


def _take_host(ctx: WorkerContext, lock: str, token: str) -> bool:
    """Take the host's shadow slot; a slot held by a worker that died is taken over."""
    expiry = int(ctx.settings.job_timeout * 1000)
    if ctx.redis.set(lock, token, nx=True, px=expiry):
        return True
    holder = ctx.redis.get(lock)
    worker = bytes(holder).decode().split("|", 1)[0] if holder else ""  # type: ignore[arg-type]
    if holder is None or (worker and ctx.redis.exists(alive_key(worker))):
        return False
    release_if_held(ctx.redis, lock, holder)
    return bool(ctx.redis.set(lock, token, nx=True, px=expiry))


def _at_idle_priority(work: Callable[[], str]) -> str:
    """Run ``work`` in a new thread at the lowest CPU priority; return its result or raise
    its error. Threads the work starts inherit the priority."""
    outcome: list[str] = []
    error: list[BaseException] = []

    def run() -> None:
        idle_priority()
        try:
            outcome.append(work())
        except BaseException as exc:  # handed to the caller's thread
            error.append(exc)

    thread = threading.Thread(target=run, name="shadow", daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return outcome[0]


def idle_priority() -> None:
    """Give the calling thread the lowest CPU priority (Linux: per thread)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        if hasattr(os, "SCHED_IDLE"):
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except OSError as exc:  # a platform that refuses: the work still runs, at batch priority
        log.warning("shadow analysis priority not lowered (%s)", exc)


def _shadow(ctx: WorkerContext, package: ModelPackage, orthanc_id: str, study_uid: str,
            inputs: str) -> str:
    snapshot = snapshot_study(ctx.orthanc, orthanc_id, details=True,
                              study_instance_uid=study_uid)
    if snapshot.inputs != inputs:
        return SUPERSEDED  # the newer set of instances gets its own shadow run
    chosen, _ = _select([package], snapshot)
    if not chosen:
        return "out of scope"
    try:
        _check_size(ctx, snapshot)
    except OutOfScope:
        return "out of scope"
    _, series = chosen[0]
    # A loader of its own, created here, so its download threads run at this priority too.
    loader = SeriesLoader(ctx.orthanc, 1)
    try:
        prep = package.manifest.preprocessing
        loaded = loader.load(series.instance_ids, prep.rescale, slice_transform(prep))
    except InvalidInput:
        return "images not usable"
    finally:
        loader.pool.shutdown(wait=False)
    uid = series.info.series_instance_uid
    result = infer(package, loaded.volume, uid)
    recording.enqueue(ctx.redis, recording.build_records(
        snapshot, [result], {uid: loaded.headers}, None, clock.now(ctx.settings),
        role="shadow"))
    return "recorded"
