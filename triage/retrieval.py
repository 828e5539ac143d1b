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

import pydicom
from pydicom.dataset import Dataset

from triage.errors import InvalidInput
from triage.manifest import Rescale
from triage.orthanc import OrthancClient
from triage.pixels import DecodedInstance, SliceTransform, Volume, assemble, decode_instance


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


@dataclass(frozen=True)
class _Loaded:
    decoded: DecodedInstance
    fetched_at: float
    fetch_seconds: float
    decode_seconds: float


class SeriesLoader:
    """Downloads and decodes series with a pool of ``threads`` threads."""

    def __init__(self, orthanc: OrthancClient, threads: int) -> None:
        self.orthanc = orthanc
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="fetch")

    def load(self, instance_ids: Sequence[str], rescale: Rescale,
             slice_transform: SliceTransform | None = None) -> LoadedSeries:
        """Download ``instance_ids`` (one series) and decode them into a volume in patient
        order, each slice passed through ``slice_transform``.

        Raises InvalidInput with the same reason ``pixels.decode_series`` gives (both end in
        ``pixels.assemble``).
        """
        if not instance_ids:
            raise InvalidInput("no images in the series")
        decoded, timings = self.decode_each(instance_ids, rescale, slice_transform)
        started = perf_counter()
        volume = assemble(decoded)
        timings["decode"] += perf_counter() - started
        headers = tuple(one.header for one in decoded)
        return LoadedSeries(
            volume=volume,
            headers=headers,
            orthanc_ids={str(h.SOPInstanceUID): instance_id
                         for h, instance_id in zip(headers, instance_ids, strict=True)},
            timings=timings,
        )

    def decode_each(self, instance_ids: Sequence[str], rescale: Rescale,
                    slice_transform: SliceTransform | None = None
                    ) -> tuple[list[DecodedInstance], dict[str, float]]:
        """Download and decode each of ``instance_ids``, in that order, without assembling
        them (each says why it cannot be used, if so); with the timings ``load`` gives."""
        started = perf_counter()
        loaded = list(self.pool.map(
            lambda instance_id: self._one(instance_id, rescale, slice_transform),
            instance_ids))
        done = perf_counter()
        fetched = max((one.fetched_at for one in loaded), default=started)
        return [one.decoded for one in loaded], {
            "fetch": fetched - started, "decode": done - fetched,
            "fetch_busy": sum(one.fetch_seconds for one in loaded),
            "decode_busy": sum(one.decode_seconds for one in loaded)}

    def _one(self, instance_id: str, rescale: Rescale,
             slice_transform: SliceTransform | None) -> _Loaded:
        started = perf_counter()
        raw = self.orthanc.instance_file(instance_id)
        fetched = perf_counter()
        ds = pydicom.dcmread(io.BytesIO(raw))
        del raw
        decoded = decode_instance(ds, rescale, slice_transform)
        if "PixelData" in ds:
            del ds.PixelData
        return _Loaded(decoded, fetched_at=fetched, fetch_seconds=fetched - started,
                       decode_seconds=perf_counter() - fetched)
