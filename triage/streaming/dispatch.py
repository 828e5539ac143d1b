"""The leading watcher's side of streaming: batches of images that just arrived, per series.

The watcher sees each image arrive in Orthanc's change log. Images of a series whose modality
a streaming model accepts are gathered per series and sent as one ``stream`` job when the
batch reaches the model's batch size or its first image has waited ``stream_batch_seconds``.
A batch is dropped (the analysis at stability computes its images) when an analysis of a
complete study waits, or when ``stream_max_waiting`` batches already wait: under load the
service falls back to analysing complete studies instead of building a backlog.

A series arriving in a burst (a full batch sooner than ``stream_batch_seconds``: 64 images a
second and more with a batch size of 16, a PACS or a fast link rather than a scanner at its
pace) is not streamed either: it is complete within seconds anyway, and downloading its
images while Orthanc is still receiving them would slow the reception that matters more.
The watcher only knows that a batch's images arrived since its previous look at the change
log, so a batch counts as a burst only when it was full within ``stream_batch_seconds`` of
that look: a watcher held up on a busy server, or catching up with the change log as it
starts leading, which then finds a scanner's images of the last seconds at once, still
streams them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import redis
from rq import Queue

from triage.errors import ModelPackageError
from triage.manifest import Manifest, load_manifest
from triage.queues import STREAM_QUEUE
from triage.settings import Settings
from triage.streaming.arrivals import final_waiting

log = logging.getLogger(__name__)


@dataclass
class Batch:
    """Images of one series waiting to be sent."""

    study_id: str
    study_instance_uid: str
    series_id: str
    first_seen: float
    instance_ids: list[str] = field(default_factory=list)
    # The watcher's look at the change log before ``first_seen``: its first image arrived
    # after it. None: no earlier look (the watcher just started leading).
    opened: float | None = None


def streaming_manifests(models_dir: Path) -> list[Manifest]:
    """The manifests of the installed streaming models (a package that does not load is
    left to the workers, which report it)."""
    found = []
    for path in sorted(models_dir.glob("*/manifest.yaml")) if models_dir.is_dir() else []:
        try:
            manifest = load_manifest(path)
        except (ModelPackageError, OSError, ValueError):
            continue
        if manifest.preprocessing.streaming:
            found.append(manifest)
    return found


class Dispatcher:
    """Gathers arrived images into batches and sends the due ones (``send``)."""

    def __init__(self, settings: Settings, manifests: list[Manifest]) -> None:
        self.settings = settings
        self.modalities = {m.upper() for manifest in manifests
                           for m in manifest.applicability.modalities}
        self.batch_size = min((m.runtime.batch_size for m in manifests), default=16)
        self.pending: dict[str, Batch] = {}
        self.sent = 0
        self.dropped = 0
        self.bursts = 0  # images of series arriving in a burst, left to the final analysis
        self.last_poll: float | None = None  # the watcher's latest look at the change log

    @classmethod
    def for_settings(cls, settings: Settings) -> Dispatcher | None:
        """A dispatcher when streaming is on and a streaming model is installed."""
        if not settings.streaming:
            return None
        manifests = streaming_manifests(settings.models_dir)
        return cls(settings, manifests) if manifests else None

    def wants(self, modality: str) -> bool:
        return modality.upper() in self.modalities

    def add(self, study_id: str, study_uid: str, series_id: str, instance_ids: list[str],
            now: float) -> None:
        if not instance_ids:
            return
        opened = self.last_poll if self.last_poll is None or self.last_poll <= now else now
        batch = self.pending.setdefault(
            series_id, Batch(study_id, study_uid, series_id, now, opened=opened))
        batch.instance_ids += [i for i in instance_ids if i not in batch.instance_ids]

    def polled(self, now: float) -> None:
        """The watcher has read the change log up to now (images it sees later arrived after
        ``now``)."""
        self.last_poll = now

    def forget(self, study_id: str) -> None:
        """The study is complete: its analysis computes whatever is still pending."""
        for series_id in [s for s, b in self.pending.items() if b.study_id == study_id]:
            del self.pending[series_id]

    def due(self, now: float) -> list[Batch]:
        """Take the batches due at ``now``, full ones split into batch-size pieces; a batch
        full before its time, counted from the watcher's look before its first image, is a
        burst, dropped."""
        taken = []
        limit = self.settings.stream_batch_seconds
        for series_id, batch in list(self.pending.items()):
            if len(batch.instance_ids) < self.batch_size and now - batch.first_seen < limit:
                continue
            del self.pending[series_id]
            if (len(batch.instance_ids) >= self.batch_size and batch.opened is not None
                    and now - batch.opened < limit):
                self.bursts += len(batch.instance_ids)
                continue
            for start in range(0, len(batch.instance_ids), self.batch_size):
                taken.append(Batch(batch.study_id, batch.study_instance_uid, series_id,
                                   batch.first_seen,
                                   batch.instance_ids[start:start + self.batch_size]))
        return taken

    def next_due(self) -> float | None:
        """When the oldest pending batch is due (monotonic seconds)."""
        if not self.pending:
            return None
        return min(b.first_seen for b in self.pending.values()) + (
            self.settings.stream_batch_seconds)

    def send(self, connection: redis.Redis, now: float,
             enqueue: Callable[[Batch], None]) -> int:
        """Send the batches due at ``now`` with ``enqueue`` while there is room; the others
        are dropped. Returns how many were sent."""
        batches = self.due(now)
        if not batches:
            return 0
        room = 0 if final_waiting(connection) else max(
            0, self.settings.stream_max_waiting - Queue(STREAM_QUEUE,
                                                        connection=connection).count)
        for batch in batches[:room]:
            enqueue(batch)
        sent = min(room, len(batches))
        self.sent += sent
        if len(batches) > sent:
            self.dropped += len(batches) - sent
            log.debug("%d streaming batches left to the analysis at stability",
                      len(batches) - sent)
        return sent
