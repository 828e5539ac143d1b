"""Retrieving one series from Orthanc and decoding it, many instances at a time.

Each instance is downloaded and decoded by a thread of the worker's pool as soon as it
arrives, so decoding overlaps downloading. pydicom's parsing holds the GIL, but socket reads,
copies and numpy arithmetic do not, so both cores of a small server are used for one study.
The pool lives as long as the worker process: threads are not created per study (each new
thread can bring a new malloc arena, which is how a long-running worker's memory creeps up).

Only the header of each instance is kept once it is decoded; the pixel data is dropped at
once, so a 300-slice CT never holds its 150 MB of pixel data and its decoded slices together.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from time import perf_counter

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from triage.errors import InvalidInput
from triage.manifest import Rescale
from triage.orthanc import OrthancClient
from triage.pixels import (
    SliceTransform,
    Volume,
    check_instance,
    check_sizes,
    decode_frames,
    sort_slices,
    stack_slices,
)


@dataclass(frozen=True)
class LoadedSeries:
    """A decoded series, the headers of its instances (no pixel data) and what it took.

    ``timings`` holds wall-clock seconds that add up: ``fetch`` until the last instance was
    downloaded, ``decode`` from then until the volume was ready (decoding not hidden behind
    downloads, sorting, stacking); and, for diagnosis, ``fetch_busy`` and ``decode_busy``,
    the time the pool's threads spent on each, summed over threads.
    """

    volume: Volume
    headers: tuple[Dataset, ...]
    orthanc_ids: dict[str, str] = field(default_factory=dict)  # SOP Instance UID -> Orthanc id
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class _Instance:
    header: Dataset | None = None
    frames: list[np.ndarray] = field(default_factory=list)
    header_error: InvalidInput | None = None
    pixel_error: InvalidInput | None = None
    fetched_at: float = 0.0
    fetch_seconds: float = 0.0
    decode_seconds: float = 0.0


class SeriesLoader:
    """Downloads and decodes series with a pool of ``threads`` threads."""

    def __init__(self, orthanc: OrthancClient, threads: int) -> None:
        self.orthanc = orthanc
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="fetch")

    def close(self) -> None:
        self.pool.shutdown(wait=True)

    def load(self, instance_ids: Sequence[str], rescale: Rescale,
             slice_transform: SliceTransform | None = None) -> LoadedSeries:
        """Download ``instance_ids`` (one series) and decode them into a volume in patient
        order, each slice passed through ``slice_transform``.

        Raises InvalidInput with the same reason ``pixels.decode_series`` gives: header
        problems first (in the order given), then images of different sizes, then pixel
        data that does not decode (in patient order).
        """
        if not instance_ids:
            raise InvalidInput("no images in the series")
        started = perf_counter()
        instances = list(self.pool.map(
            lambda instance_id: self._one(instance_id, rescale, slice_transform),
            instance_ids))
        for instance in instances:
            if instance.header_error is not None:
                raise instance.header_error
        headers = [i.header for i in instances if i.header is not None]
        check_sizes(headers)
        by_header = {id(i.header): i for i in instances}
        ordered = sort_slices(headers)
        for header in ordered:
            error = by_header[id(header)].pixel_error
            if error is not None:
                raise error
        volume = stack_slices(ordered, [by_header[id(h)].frames for h in ordered])
        done = perf_counter()
        fetched = max(i.fetched_at for i in instances)
        return LoadedSeries(
            volume=volume,
            headers=tuple(headers),
            orthanc_ids={str(h.SOPInstanceUID): instance_id
                         for h, instance_id in zip(headers, instance_ids, strict=True)},
            timings={"fetch": fetched - started, "decode": done - fetched,
                     "fetch_busy": sum(i.fetch_seconds for i in instances),
                     "decode_busy": sum(i.decode_seconds for i in instances)},
        )

    def _one(self, instance_id: str, rescale: Rescale,
             slice_transform: SliceTransform | None) -> _Instance:
        started = perf_counter()
        raw = self.orthanc.instance_file(instance_id)
        instance = _Instance(fetched_at=perf_counter())
        instance.fetch_seconds = instance.fetched_at - started
        ds = pydicom.dcmread(io.BytesIO(raw))
        del raw
        instance.header = ds
        try:
            check_instance(ds)
        except InvalidInput as exc:
            instance.header_error = exc
            return instance
        try:
            instance.frames = decode_frames(ds, rescale, slice_transform)
        except InvalidInput as exc:
            instance.pixel_error = exc
        del ds.PixelData
        instance.decode_seconds = perf_counter() - instance.fetched_at
        return instance
