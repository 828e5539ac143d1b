"""The analysis of a complete series by a streaming model: the scores of the images seen while
they arrived come from the score cache, and only the others are downloaded and scored.

The result is the one the analysis of the whole series gives (``inference.infer``): the same
images in the same patient order (``pixels.slice_order`` on the positions and numbers kept in
the cache), the same findings from the same scores (``inference.findings_from_scores``).
Whatever that analysis would refuse or report (an image that does not decode, a multi-frame
image, images of different sizes) sends the series back to it, so that it says so as always.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from time import perf_counter

import numpy as np
import pydicom

from triage.findings import ModelResult
from triage.inference import findings_from_scores, slice_transform
from triage.ingest import SourceSeries
from triage.orthanc import OrthancClient
from triage.pixels import slice_order
from triage.registry import ModelPackage
from triage.retrieval import SeriesLoader
from triage.streaming.cache import ScoreCache, ScoredImage
from triage.streaming.scoring import score, usable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoredSeries:
    """A complete series analysed from the cache: the result, the headers the SR needs of
    every image (the full header of the image it copies, see ``evidence_header``; the UIDs
    of the others), and each image's Orthanc id."""

    result: ModelResult
    headers: tuple[pydicom.Dataset, ...]
    orthanc_ids: dict[str, str] = field(default_factory=dict)
    from_cache: int = 0


def analyse_series(orthanc: OrthancClient, loader: SeriesLoader, cache: ScoreCache,
                   package: ModelPackage, series: SourceSeries) -> ScoredSeries | None:
    """Analyse the complete ``series`` with the cached scores; ``None`` when the series must
    go through the analysis of the whole series instead (see the module's docstring)."""
    manifest = package.manifest
    prep = manifest.preprocessing
    uid = series.info.series_instance_uid
    started = perf_counter()
    by_orthanc = {image.orthanc_id: image for image in cache.scored(uid).values()}
    from_cache = sum(1 for i in series.instance_ids if i in by_orthanc)
    misses = [i for i in series.instance_ids if i not in by_orthanc]
    full: dict[str, pydicom.Dataset] = {}
    timings = {"fetch": perf_counter() - started, "decode": 0.0, "inference": 0.0}
    if misses:
        decoded, loaded = loader.decode_each(misses, prep.rescale, slice_transform(prep))
        if not all(usable(d) for d in decoded):
            return None
        timings["fetch"] += loaded["fetch"]
        timings["decode"] += loaded["decode"]
        inferring = perf_counter()
        fresh = score(package, list(zip(decoded, misses, strict=True)))
        timings["inference"] += perf_counter() - inferring
        cache.add(uid, fresh)
        for image, one in zip(fresh, decoded, strict=True):
            by_orthanc[image.orthanc_id] = image
            full[image.sop_instance_uid] = one.header
    images = [by_orthanc[i] for i in series.instance_ids]
    if len({(i.rows, i.columns) for i in images}) > 1:
        return None
    inferring = perf_counter()
    ordered = [images[k] for k in slice_order([i.position for i in images],
                                              [i.number for i in images])]
    names = sorted({label.output for label in manifest.outputs})
    outputs = {name: np.asarray([i.scores[name] for i in ordered], dtype=np.float32)
               for name in names}
    uids = tuple(i.sop_instance_uid for i in ordered)
    findings = findings_from_scores(manifest, outputs, uids,
                                    tuple(i.sop_class_uid for i in ordered))
    timings["inference"] += perf_counter() - inferring
    fetching = perf_counter()
    first = evidence_header(orthanc, images, full)
    timings["fetch"] += perf_counter() - fetching
    headers = (first, *(full.get(i.sop_instance_uid) or i.header() for i in images
                        if i.sop_instance_uid != str(first.SOPInstanceUID)))
    return ScoredSeries(
        result=ModelResult(model=package.identity, series_instance_uid=uid,
                           input_sop_instance_uids=uids, findings=findings, timings=timings),
        headers=headers,
        orthanc_ids={i.sop_instance_uid: i.orthanc_id for i in images},
        from_cache=from_cache,
    )


def evidence_header(orthanc: OrthancClient, images: list[ScoredImage],
                    full: dict[str, pydicom.Dataset]) -> pydicom.Dataset:
    """The full header (no pixel data) of the series' image with the lowest SOP Instance UID:
    the one an SR of the study copies its patient and study attributes from when the series
    comes first (``report.build_report`` orders its evidence by Series and SOP Instance UID),
    and the one the vigilance records read the scanner from."""
    image = min(images, key=lambda i: i.sop_instance_uid)
    header = full.get(image.sop_instance_uid)
    if header is None:
        header = orthanc.instance_dataset(image.orthanc_id)
        if "PixelData" in header:
            del header.PixelData
    return header
