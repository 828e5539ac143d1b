"""The streaming job: score a batch of images that just arrived, and raise the study the moment
a series crosses a threshold.

A batch is one series' images. Each active streaming model decides from the batch's first image
whether the series is for it (modality, storage class, anatomy, age, thickness, image type,
orientation: the count-based limits wait for the complete series), scores the images its
cache lacks and keeps their scores. When the images of the series scored so far cross a
label's threshold, the study's worklist item is raised (created if the study is not on the
list yet) with the reason "AI, preliminary: N images so far", a live event, and the webhooks
that ask for preliminary results. Nothing here is ever worth a result: the analysis at
stability is the one that counts, and it computes whatever this job did not.
"""

from __future__ import annotations

import io
import logging
import os
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pydicom
import redis
from rq import Queue

from triage import audit, delivery
from triage.errors import OutOfScope
from triage.inference import slice_transform
from triage.ingest import StudySnapshot, snapshot_study
from triage.logs import pseudonym
from triage.manifest import OutputLabel
from triage.pixels import decode_instance
from triage.priority import clinical_priority, highest
from triage.queues import QueueName
from triage.registry import ModelPackage
from triage.selection import select_series, series_info
from triage.streaming.cache import ScoreCache, ScoredImage
from triage.streaming.scoring import score, streams, usable
from triage.worklist import PreliminaryItem, StudyStatus, WorklistItem, utcnow

if TYPE_CHECKING:
    from triage.jobs import WorkerContext

log = logging.getLogger(__name__)

# Analyses of complete studies: streaming work waits while any of them does.
FINAL_QUEUES = (QueueName.URGENT, QueueName.DEFAULT)


@dataclass(frozen=True)
class Crossing:
    """A label whose threshold the images of a series scored so far cross."""

    package: ModelPackage
    label: OutputLabel
    series_instance_uid: str
    probability: float
    n_images: int


def final_waiting(connection: redis.Redis) -> bool:
    """Whether an analysis of a complete study waits on a queue."""
    return any(Queue(q.value, connection=connection).count for q in FINAL_QUEUES)


def analyse_arrivals(study_id: str, study_instance_uid: str, series_id: str,
                     instance_ids: Sequence[str]) -> str:
    """RQ job (``stream`` queue): score ``instance_ids`` (one series of the study, just
    arrived) with every active streaming model; raise the study on a crossing."""
    from triage.jobs import context

    ctx = context()
    if not ctx.settings.streaming:
        return "streaming is off"
    if final_waiting(ctx.redis):
        return "left to the analysis at stability (analyses of complete studies wait)"
    packages = [p for p in ctx.states.roles().active if streams(p)]
    if not packages:
        return "no active streaming model"
    item = ctx.worklist.get(study_instance_uid)
    if item is not None and (_complete(item) or _analysed_as_is(item, _inputs(
            ctx, study_id, study_instance_uid) if item.status.terminal else None)):
        return "the study is complete: left to its analysis"
    raws = list(ctx.loader.pool.map(ctx.orthanc.instance_file, instance_ids))
    datasets = [pydicom.dcmread(io.BytesIO(raw)) for raw in raws]
    del raws
    crossings: list[Crossing] = []
    for package in packages:
        crossings += _score(ctx, package, datasets, instance_ids)
    if crossings:
        _raise(ctx, study_id, study_instance_uid, crossings)
    elif item is not None and item.arriving:
        _count_arriving(ctx, study_id, study_instance_uid)
    return f"scored {len(datasets)} images, {len(crossings)} over a threshold"


def _complete(item: WorklistItem) -> bool:
    """The watcher has queued the complete study (its analysis computes what is left)."""
    return (item.arriving == 0 and bool(item.job_id)
            and item.status in (StudyStatus.QUEUED, StudyStatus.ANALYSING))


def _analysed_as_is(item: WorklistItem, inputs: str | None) -> bool:
    """The study's analysis has ended on exactly the images it has now (``inputs``): a batch
    that reaches a worker after it has nothing to add. Images that arrived since (a late
    series) are streamed as any others."""
    return (inputs is not None and item.status.terminal and item.arriving == 0
            and item.inputs == inputs)


def _inputs(ctx: WorkerContext, study_id: str, study_uid: str) -> str:
    """The fingerprint of the study's source images now."""
    return snapshot_study(ctx.orthanc, study_id, study_instance_uid=study_uid).inputs


def _score(ctx: WorkerContext, package: ModelPackage, datasets: Sequence[pydicom.Dataset],
           instance_ids: Sequence[str]) -> list[Crossing]:
    """Score the images of the batch ``package`` has not scored yet, if the series is for
    it; the labels the series' images scored so far cross."""
    manifest = package.manifest
    first = datasets[0]
    try:
        # Counts are decided on the complete series: any count fits here.
        select_series(manifest, [series_info(first, manifest.applicability.min_instances)])
    except OutOfScope:
        return []
    series_uid = str(first.get("SeriesInstanceUID", ""))
    cache = ScoreCache(ctx.redis, ctx.settings, manifest.id, manifest.version)
    known = cache.known(series_uid, [str(ds.get("SOPInstanceUID", "")) for ds in datasets])
    prep = manifest.preprocessing
    todo = []
    for ds, instance_id in zip(datasets, instance_ids, strict=True):
        if str(ds.get("SOPInstanceUID", "")) in known or str(
                ds.get("SeriesInstanceUID", "")) != series_uid:
            continue
        decoded = decode_instance(ds, prep.rescale, slice_transform(prep))
        if usable(decoded):
            todo.append((decoded, instance_id))
    count = cache.add(series_uid, score(package, todo))
    scored = cache.scored(series_uid)
    return [Crossing(package, label, series_uid, best, count)
            for label in manifest.outputs
            if (best := _best(scored.values(), label)) is not None and best >= label.threshold]


def _best(images: Iterable[ScoredImage], label: OutputLabel) -> float | None:
    values = [image.scores[label.output][label.index] for image in images
              if label.output in image.scores and label.index < len(image.scores[label.output])]
    return max(values) if values else None


def _arriving(ctx: WorkerContext, study_id: str) -> int:
    """Images of the study in Orthanc now."""
    statistics = ctx.orthanc.study_statistics(study_id)
    return int(statistics.get("CountInstances", 0))


def _count_arriving(ctx: WorkerContext, study_id: str, study_uid: str) -> None:
    """Keep "images still arriving (N)" current on an item raised earlier."""
    count = _arriving(ctx, study_id)

    def change(item: WorklistItem) -> WorklistItem | None:
        if not item.arriving or item.arriving == count:
            return None
        return item.model_copy(update=_arriving_fields(item, count))

    ctx.worklist.update(study_uid, change, event="preliminary")


def _arriving_fields(item: WorklistItem, count: int) -> dict[str, object]:
    fields: dict[str, object] = {"arriving": count}
    if item.status is StudyStatus.QUEUED and not item.job_id:
        fields["status_reason"] = arriving_reason(count)
    return fields


def arriving_reason(count: int) -> str:
    return f"images still arriving ({count})"


def preliminary_reason(crossing: Crossing) -> str:
    """The priority reason of a preliminary finding."""
    identity = crossing.package.identity
    return (f"AI, preliminary: {crossing.n_images} images so far: "
            f"{crossing.label.concept.code_meaning} (p={crossing.probability:.2f}, "
            f"{identity.id} {identity.version})")


def _raise(ctx: WorkerContext, study_id: str, study_uid: str, crossings: list[Crossing]) -> None:
    """Raise the study for ``crossings``, creating its worklist item if needed; then the
    preliminary webhooks."""
    from triage.watcher import Watcher

    count = _arriving(ctx, study_id)
    snapshot: StudySnapshot | None = None
    if ctx.worklist.get(study_uid) is None:
        snapshot = snapshot_study(ctx.orthanc, study_id, first_instance=True)
    inputs = snapshot.inputs if snapshot is not None else _inputs(ctx, study_id, study_uid)
    now = utcnow()
    raised: list[Crossing] = []

    def change(existing: WorklistItem | None) -> WorklistItem | None:
        raised.clear()
        if existing is None:
            if snapshot is None:
                return None  # the item was removed meanwhile
            clinical = clinical_priority(
                snapshot.first_instance, calling_aet=snapshot.calling_aet,
                emergency_locations=ctx.settings.emergency_locations,
                emergency_aets=ctx.settings.emergency_aets)
            item = Watcher._queued_item(snapshot, "", clinical, None).model_copy(update={
                "job_id": "", "inputs": "", "arriving": count,
                "status_reason": arriving_reason(count)})
        elif _complete(existing) or _analysed_as_is(existing, inputs):
            return None  # queued or analysed meanwhile: its analysis says what it shows
        else:
            item = existing
            if existing.arriving:
                item = item.model_copy(update=_arriving_fields(existing, count))
        seen = {(p.model, p.model_version, p.series_instance_uid, p.code)
                for p in item.preliminary}
        new = [c for c in crossings if (c.package.identity.id, c.package.identity.version,
                                        c.series_instance_uid, c.label.concept.code_value)
               not in seen]
        if not new:
            return item if item is not existing else None
        raised.extend(new)
        reasons = list(item.priority_reasons)
        reasons += [r for r in map(preliminary_reason, new) if r not in reasons]
        return item.model_copy(update={
            "priority": highest([item.priority, *(c.label.priority for c in new)]),
            "priority_reasons": reasons,
            "preliminary": [*item.preliminary, *(PreliminaryItem(
                model=c.package.identity.id, model_version=c.package.identity.version,
                series_instance_uid=c.series_instance_uid,
                code=c.label.concept.code_value, scheme=c.label.concept.scheme_designator,
                meaning=c.label.concept.code_meaning, probability=c.probability,
                threshold=c.label.threshold, priority=c.label.priority,
                n_images=c.n_images, raised_at=now) for c in new)],
        })

    stored = ctx.worklist.upsert(study_uid, change, event="preliminary")
    if stored is None or not raised:
        return
    log.info("study %s raised on a preliminary result (%d images so far)",
             pseudonym(study_uid), max(c.n_images for c in raised))
    for crossing in raised:
        audit.record(ctx.redis, actor="worker", source=f"{socket.gethostname()}:"
                     f"{os.getpid()}", action=audit.AuditAction.RESULT_PRODUCED,
                     study_instance_uid=study_uid,
                     details={"model": crossing.package.identity.id,
                              "model_version": crossing.package.identity.version,
                              "weights_sha256": crossing.package.identity.weights_sha256,
                              "preliminary": True, "n_images": crossing.n_images,
                              "series_instance_uid": crossing.series_instance_uid})
    try:
        delivery.schedule_preliminary(ctx.redis, ctx.settings, stored)
    except Exception as exc:  # the raise stands; a pager message is only a copy of it
        log.warning("study %s: preliminary webhooks not queued (%s)", pseudonym(study_uid),
                    type(exc).__name__)
