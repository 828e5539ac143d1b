"""Choosing the series of a study that a model analyses, from the model's applicability.

The reasons given when nothing fits are shown to radiologists on the worklist: short, plain
English, and free of patient data (an age range is named, never the patient's age).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from fnmatch import fnmatchcase
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from triage.errors import OutOfScope
from triage.manifest import Applicability, Manifest, Orientation

# How close to the axial plane an image must be: |cos| of the angle between its normal and
# the patient's head-foot axis: up to about 32 degrees, as head CT gantry tilts go.
_AXIAL_MIN_COSINE = 0.85
_AGE = re.compile(r"^(\d{1,3})([DWMY])$")
_DAYS_PER = {"D": 1.0, "W": 7.0, "M": 30.4375, "Y": 365.25}


@dataclass(frozen=True)
class SeriesInfo:
    """What selection needs to know about one series (from its instances' DICOM attributes)."""

    series_instance_uid: str
    modality: str
    sop_class_uid: str
    body_part: str
    description: str
    n_instances: int
    study_description: str = ""
    slice_thickness: float | None = None
    image_type: tuple[str, ...] = ()
    orientation: tuple[float, ...] | None = None
    patient_age_years: float | None = None


def series_info(attributes: Mapping[str, Any] | Dataset, n_instances: int) -> SeriesInfo:
    """SeriesInfo from one instance's attributes, looked up by DICOM keyword.

    Accepts a pydicom Dataset and Orthanc's simplified tags (multiple values as ``a\\b``).
    """
    def text(keyword: str) -> str:
        value = attributes.get(keyword)
        return "" if value is None else str(value).strip()

    return SeriesInfo(
        series_instance_uid=text("SeriesInstanceUID"),
        modality=text("Modality").upper(),
        sop_class_uid=text("SOPClassUID"),
        body_part=text("BodyPartExamined").upper(),
        description=text("SeriesDescription"),
        n_instances=n_instances,
        study_description=text("StudyDescription"),
        slice_thickness=_number(attributes.get("SliceThickness")),
        image_type=tuple(v.upper() for v in _values(attributes.get("ImageType"))),
        orientation=_numbers(attributes.get("ImageOrientationPatient"), 6),
        patient_age_years=patient_age_years(text("PatientAge"), text("PatientBirthDate"),
                                            text("StudyDate")),
    )


def patient_age_years(age: str, birth_date: str, study_date: str) -> float | None:
    """Age at the study from Patient's Age (``045Y``), else from the birth and study dates."""
    match = _AGE.match(age)
    if match:
        return int(match.group(1)) * _DAYS_PER[match.group(2)] / 365.25
    try:
        born = date(int(birth_date[:4]), int(birth_date[4:6]), int(birth_date[6:8]))
        seen = date(int(study_date[:4]), int(study_date[4:6]), int(study_date[6:8]))
    except ValueError:
        return None
    return (seen - born).days / 365.25


def select_series(manifest: Manifest, series: Sequence[SeriesInfo]) -> SeriesInfo:
    """The largest series that fits ``manifest.applicability``.

    Raises OutOfScope with a reason a radiologist can read when none fits.
    """
    scope = manifest.applicability
    if not series:
        raise OutOfScope("no images in the study")
    candidates = [s for s in series if s.modality.upper() in scope.modalities]
    if not candidates:
        found = ", ".join(sorted({s.modality.upper() or "unknown" for s in series}))
        raise OutOfScope(f"no applicable model: modality {found}")
    if scope.sop_class_uids:
        candidates = _keep(candidates, lambda s: s.sop_class_uid in scope.sop_class_uids,
                           f"{manifest.id} does not accept this image type "
                           f"({_modalities(candidates)} images of another storage class)")
    if scope.body_parts or scope.descriptions:
        wanted = "/".join(scope.body_parts) or "its"
        candidates = _keep(candidates, lambda s: _anatomy_matches(scope, s),
                           f"{manifest.id} applies to {wanted} studies; "
                           f"body part here: {_body_parts(candidates)}")
    if scope.patient_age_years is not None:
        ages = scope.patient_age_years
        candidates = _keep(candidates,
                           lambda s: s.patient_age_years is not None
                           and s.patient_age_years in ages,
                           f"{manifest.id} is for patients aged {ages} years "
                           "(age outside that range or unknown)")
    candidates = _series_selectors(manifest, candidates)
    return _by_size(manifest, candidates)


def _keep(series: list[SeriesInfo], test: Callable[[SeriesInfo], bool],
          reason: str) -> list[SeriesInfo]:
    kept = [s for s in series if test(s)]
    if not kept:
        raise OutOfScope(reason)
    return kept


def _series_selectors(manifest: Manifest, series: list[SeriesInfo]) -> list[SeriesInfo]:
    scope = manifest.applicability
    fitting = [s for s in series if _selector_problem(scope, s) is None]
    if fitting:
        return fitting
    if scope.fallback_largest:
        return series
    largest = max(series, key=lambda s: (s.n_instances, s.series_instance_uid))
    raise OutOfScope(f"{manifest.id} needs {_selector_problem(scope, largest)}")


def _selector_problem(scope: Applicability, s: SeriesInfo) -> str | None:
    """What a series lacks for the model's series selectors, or None when it fits."""
    if scope.slice_thickness_mm is not None and (
        s.slice_thickness is None or s.slice_thickness not in scope.slice_thickness_mm
    ):
        found = "unknown" if s.slice_thickness is None else f"{s.slice_thickness:g} mm"
        return f"slices {scope.slice_thickness_mm} mm thick; largest series has {found}"
    missing = [v for v in scope.image_type if v.upper() not in s.image_type]
    if missing:
        return f"{'/'.join(scope.image_type)} images; largest series is {'/'.join(s.image_type)}"
    if scope.orientation is Orientation.AXIAL and not _is_axial(s.orientation):
        return "axial images; largest series is not axial"
    return None


def _by_size(manifest: Manifest, series: list[SeriesInfo]) -> SeriesInfo:
    scope = manifest.applicability
    fitting = [s for s in series if scope.min_instances <= s.n_instances <= scope.max_instances]
    if fitting:
        # Largest first; the UID only breaks ties, so the choice is reproducible.
        return max(fitting, key=lambda s: (s.n_instances, s.series_instance_uid))
    largest = max(s.n_instances for s in series)
    kind = _modalities(series)
    if largest < scope.min_instances:
        raise OutOfScope(
            f"{manifest.id} needs at least {scope.min_instances} images, "
            f"largest {kind} series has {largest}"
        )
    smallest = min(s.n_instances for s in series)
    if smallest > scope.max_instances:
        raise OutOfScope(
            f"{manifest.id} accepts at most {scope.max_instances} images, "
            f"smallest {kind} series has {smallest}"
        )
    sizes = ", ".join(str(n) for n in sorted({s.n_instances for s in series}))
    raise OutOfScope(
        f"{manifest.id} needs {scope.min_instances} to {scope.max_instances} images, "
        f"{kind} series have {sizes}"
    )


def _anatomy_matches(scope: Applicability, s: SeriesInfo) -> bool:
    if s.body_part and any(fnmatchcase(s.body_part, p.upper()) for p in scope.body_parts):
        return True
    texts = [t.upper() for t in (s.description, s.study_description) if t]
    return any(fnmatchcase(t, p.upper()) for t in texts for p in scope.descriptions)


def _is_axial(orientation: tuple[float, ...] | None) -> bool:
    if orientation is None:
        return False
    normal = np.cross(np.asarray(orientation[:3]), np.asarray(orientation[3:]))
    length = float(np.linalg.norm(normal))
    return length > 0 and abs(normal[2]) / length >= _AXIAL_MIN_COSINE


def _values(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        # Orthanc decodes the value separator of ISO 2022 IR 13 (Japanese) data as a yen sign
        # (0x5C in JIS X 0201); the code strings and numbers read here never contain one.
        return [v.strip() for v in re.split(r"[\\\u00a5]", value) if v.strip()]
    if isinstance(value, list | tuple) or hasattr(value, "__iter__"):
        return [str(v).strip() for v in value]
    return [str(value).strip()]


def _number(value: Any) -> float | None:
    values = _values(value)
    try:
        return float(values[0]) if values else None
    except ValueError:
        return None


def _numbers(value: Any, count: int) -> tuple[float, ...] | None:
    try:
        numbers = tuple(float(v) for v in _values(value))
    except ValueError:
        return None
    return numbers if len(numbers) == count else None


def _body_parts(series: Sequence[SeriesInfo]) -> str:
    return ", ".join(sorted({s.body_part or "not stated" for s in series}))


def _modalities(series: Sequence[SeriesInfo]) -> str:
    return "/".join(sorted({s.modality.upper() for s in series}))
