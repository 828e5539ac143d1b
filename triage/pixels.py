"""Decoding the images of one series into a float32 volume ordered along the patient axis.

Ordering follows the Image Plane module (PS3.3 C.7.6.2): each slice's Image Position (Patient)
projected on the normal of its Image Orientation (Patient); Instance Number when either is
missing. Values follow the CT Image module (PS3.3 C.8.2.1) for ``hu`` and the Image Pixel module
(PS3.3 C.7.6.3) for ``raw``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import UID

from triage.errors import InvalidInput
from triage.manifest import Rescale

SliceTransform = Callable[[np.ndarray], np.ndarray]

_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")


@dataclass(frozen=True)
class Volume:
    """Slices [N, H, W] in patient order, with the instance each slice came from."""

    pixels: np.ndarray
    sop_instance_uids: tuple[str, ...]
    sop_class_uids: tuple[str, ...]


def decode_series(
    datasets: Sequence[Dataset],
    rescale: Rescale | str = Rescale.HU,
    *,
    slice_transform: SliceTransform | None = None,
) -> Volume:
    """Decode ``datasets`` (one series) into a float32 volume; frames of multi-frame images
    become slices.

    ``slice_transform`` is applied to each decoded slice before stacking, so that a resize to
    the model size never holds the full-resolution series in memory at once.
    Raises InvalidInput, with a reason a radiologist can read, when the series cannot be used.
    """
    if not datasets:
        raise InvalidInput("no images in the series")
    rescale = Rescale(rescale)
    for ds in datasets:
        _check_decodable(ds)
    shapes = sorted({(int(ds.Rows), int(ds.Columns)) for ds in datasets})
    if len(shapes) > 1:
        listed = ", ".join(f"{rows}x{cols}" for rows, cols in shapes)
        raise InvalidInput(f"images of different sizes in one series: {listed}")
    ordered = sort_slices(datasets)
    slices, instance_uids, class_uids = [], [], []
    for ds in ordered:
        # A multi-frame image contributes each of its frames, in stored order.
        for values in _frames(ds, rescale):
            slices.append(slice_transform(values) if slice_transform else values)
            instance_uids.append(str(ds.SOPInstanceUID))
            class_uids.append(str(ds.SOPClassUID))
    return Volume(
        pixels=np.stack(slices).astype(np.float32, copy=False),
        sop_instance_uids=tuple(instance_uids),
        sop_class_uids=tuple(class_uids),
    )


def sort_slices(datasets: Sequence[Dataset]) -> list[Dataset]:
    """``datasets`` ordered along the slice normal, or by Instance Number as a fallback."""
    positions = [_position_along_normal(ds) for ds in datasets]
    known = [p for p in positions if p is not None]
    if len(known) == len(datasets):
        order = sorted(range(len(datasets)), key=known.__getitem__)
    else:
        order = sorted(range(len(datasets)), key=lambda i: _instance_number(datasets[i]))
    return [datasets[i] for i in order]


def _position_along_normal(ds: Dataset) -> float | None:
    orientation = ds.get("ImageOrientationPatient")
    position = ds.get("ImagePositionPatient")
    if not orientation or not position or len(orientation) != 6 or len(position) != 3:
        return None
    row, column = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    return float(np.dot(np.cross(row, column), np.asarray(position, float)))


def _instance_number(ds: Dataset) -> int:
    # Images without a number keep their relative order after the numbered ones (sort is stable).
    number = ds.get("InstanceNumber")
    return int(number) if number not in (None, "") else 2**31


def _check_decodable(ds: Dataset) -> None:
    if "PixelData" not in ds:
        raise InvalidInput("an image of the series has no pixel data")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if photometric not in _MONOCHROME:
        raise InvalidInput(
            f"unsupported photometric interpretation {photometric or 'missing'}, "
            "only greyscale images can be analysed"
        )


def _frames(ds: Dataset, rescale: Rescale) -> list[np.ndarray]:
    try:
        stored = ds.pixel_array
    except Exception as exc:  # pydicom raises many types; the reason is what the reader needs
        raise InvalidInput(f"cannot decode image pixel data ({_syntax_name(ds)})") from exc
    frames = int(ds.get("NumberOfFrames") or 1)
    expected = 2 if frames == 1 else 3
    if stored.ndim != expected:
        raise InvalidInput(f"unexpected image shape {stored.shape} for {frames} frame(s)")
    stack = stored[None] if frames == 1 else stored
    return [_values(ds, frame, index, rescale) for index, frame in enumerate(stack)]


def _values(ds: Dataset, stored: np.ndarray, frame: int, rescale: Rescale) -> np.ndarray:
    values = stored.astype(np.float32)
    if rescale is Rescale.HU:
        # Slope/intercept map stored values to output units (Hounsfield units for CT);
        # MONOCHROME1 only changes how they are displayed, not what they mean.
        slope, intercept = _rescale(ds, frame)
        return values * np.float32(slope) + np.float32(intercept)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        # Invert so that higher always means brighter, within the stored bit depth.
        if int(ds.get("PixelRepresentation", 0)) == 1:
            return -values - 1
        return np.float32(2 ** int(ds.BitsStored) - 1) - values
    return values


def _rescale(ds: Dataset, frame: int) -> tuple[float, float]:
    """Rescale slope and intercept: top level, else the functional groups of enhanced images
    (Pixel Value Transformation, PS3.3 C.7.6.16.2.9), shared or of the frame."""
    sources = [ds]
    for keyword, index in (("PerFrameFunctionalGroupsSequence", frame),
                           ("SharedFunctionalGroupsSequence", 0)):
        groups = ds.get(keyword)
        if groups and len(groups) > index:
            transform = groups[index].get("PixelValueTransformationSequence")
            if transform:
                sources.append(transform[0])
    for source in sources:
        if "RescaleSlope" in source or "RescaleIntercept" in source:
            return (float(source.get("RescaleSlope", 1) or 1),
                    float(source.get("RescaleIntercept", 0) or 0))
    return 1.0, 0.0


def _syntax_name(ds: Dataset) -> str:
    meta = getattr(ds, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    if uid is None:
        return "transfer syntax unknown"
    uid = UID(str(uid))
    return f"transfer syntax {uid.name}" if uid.name != str(uid) else f"transfer syntax {uid}"
