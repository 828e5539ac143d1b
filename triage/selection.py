"""Choosing the series of a study that a model analyses, from the model's applicability.

The reasons given when nothing fits are shown to radiologists on the worklist: short, plain
English, and free of patient data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from triage.errors import OutOfScope
from triage.manifest import Manifest


@dataclass(frozen=True)
class SeriesInfo:
    """What selection needs to know about one series (from its instances' DICOM attributes)."""

    series_instance_uid: str
    modality: str
    sop_class_uid: str
    body_part: str
    description: str
    n_instances: int


def select_series(manifest: Manifest, series: Sequence[SeriesInfo]) -> SeriesInfo:
    """The largest series whose modality, SOP class and size fit ``manifest.applicability``.

    Raises OutOfScope with a reason a radiologist can read when none fits.
    """
    scope = manifest.applicability
    if not series:
        raise OutOfScope("no images in the study")
    by_modality = [s for s in series if s.modality.upper() in scope.modalities]
    if not by_modality:
        found = ", ".join(sorted({s.modality.upper() or "unknown" for s in series}))
        raise OutOfScope(f"no applicable model: modality {found}")
    by_class = [
        s
        for s in by_modality
        if not scope.sop_class_uids or s.sop_class_uid in scope.sop_class_uids
    ]
    if not by_class:
        raise OutOfScope(
            f"{manifest.id} does not accept this image type "
            f"({_modalities(by_modality)} images of another storage class)"
        )
    fitting = [s for s in by_class if scope.min_instances <= s.n_instances <= scope.max_instances]
    if fitting:
        # Largest first; the UID only breaks ties, so the choice is reproducible.
        return max(fitting, key=lambda s: (s.n_instances, s.series_instance_uid))
    largest = max(s.n_instances for s in by_class)
    kind = _modalities(by_class)
    if largest < scope.min_instances:
        raise OutOfScope(
            f"{manifest.id} needs at least {scope.min_instances} images, "
            f"largest {kind} series has {largest}"
        )
    smallest = min(s.n_instances for s in by_class)
    if smallest > scope.max_instances:
        raise OutOfScope(
            f"{manifest.id} accepts at most {scope.max_instances} images, "
            f"smallest {kind} series has {smallest}"
        )
    sizes = ", ".join(str(n) for n in sorted({s.n_instances for s in by_class}))
    raise OutOfScope(
        f"{manifest.id} needs {scope.min_instances} to {scope.max_instances} images, "
        f"{kind} series have {sizes}"
    )


def _modalities(series: Sequence[SeriesInfo]) -> str:
    return "/".join(sorted({s.modality.upper() for s in series}))
