"""Decoding the images of one series into a float32 volume ordered along the patient axis.

Ordering follows the Image Plane module (PS3.3 C.7.6.2): each slice's Image Position (Patient)
projected on the normal of its Image Orientation (Patient); Instance Number when either is
missing. Values follow the CT Image module (PS3.3 C.8.2.1) for ``hu`` and the Image Pixel module
(PS3.3 C.7.6.3) for ``raw``.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, cast

import numpy as np
from pydicom.dataset import Dataset
from pydicom.encaps import parse_fragments
from pydicom.uid import UID

from triage.copying.values import values as dicom_values
from triage.errors import InvalidInput
from triage.manifest import Rescale


class SliceTransform(Protocol):
    """What each decoded slice goes through before stacking: the fit to the model's input.

    With ``pixel_spacing_mm`` set, the fit works in millimetres: every image must then have
    a usable Pixel Spacing, which the transform receives as (row, column) spacing.
    """

    @property
    def pixel_spacing_mm(self) -> float | None: ...

    def __call__(self, image: np.ndarray,
                 pixel_spacing: tuple[float, float] | None) -> np.ndarray: ...


_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
# Largest image side the decoder accepts, and the largest decoded size of one instance: a
# header that declares more is refused before anything is allocated.
MAX_IMAGE_SIDE = 16384
MAX_DECODED_MEGABYTES = 2048
_BITS_ALLOCATED = (8, 16, 32)
# A UID per PS3.5 9.1: digits in components without leading zeros, at most 64 characters.
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
# Storage classes whose pixel values Rescale Slope/Intercept turn into Hounsfield units:
# CT Image, Enhanced CT Image, Legacy Converted Enhanced CT Image.
_CT_STORAGE = {"1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1",
               "1.2.840.10008.5.1.4.1.1.2.2"}


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
    Raises InvalidInput, with a reason a radiologist can read, when the series cannot be used
    (see ``assemble``).
    """
    rescale = Rescale(rescale)
    return assemble([decode_instance(ds, rescale, slice_transform) for ds in datasets])


@dataclass
class DecodedInstance:
    """One instance's frames, each through the slice transform, or why it cannot be used:
    its header (identifiers, the declared image against the pixel data present), or its
    pixel data."""

    header: Dataset
    frames: list[np.ndarray] = field(default_factory=list)
    header_error: InvalidInput | None = None
    pixel_error: InvalidInput | None = None


def decode_instance(ds: Dataset, rescale: Rescale,
                    slice_transform: SliceTransform | None = None) -> DecodedInstance:
    """Check and decode one instance; its header is checked before anything is decoded."""
    try:
        _check_identifiers(ds)
        _check_decodable(ds)
        frames = _integer(ds, "NumberOfFrames", default=1)
        # Calibration and geometry are read before anything is decoded: a model never runs
        # on guessed Hounsfield units or a guessed pixel size.
        calibration = [_rescale(ds, frame, required=_is_ct(ds)) for frame in range(frames)] if (
            rescale is Rescale.HU) else None
        spacings = [_pixel_spacing(ds, frame) for frame in range(frames)] if (
            slice_transform is not None and slice_transform.pixel_spacing_mm is not None) else (
            [None] * frames)
    except InvalidInput as exc:
        return DecodedInstance(ds, header_error=exc)
    try:
        decoded = _frames(ds, calibration)
    except InvalidInput as exc:
        return DecodedInstance(ds, pixel_error=exc)
    if slice_transform is None:
        return DecodedInstance(ds, decoded)
    return DecodedInstance(ds, [slice_transform(values, spacing)
                                for values, spacing in zip(decoded, spacings, strict=True)])


def assemble(instances: Sequence[DecodedInstance]) -> Volume:
    """The volume of one series' decoded instances, in patient order; a multi-frame image
    contributes each of its frames, in stored order.

    Raises the first reason it cannot be used: a header problem (in the order given), then
    images of different sizes, then pixel data that does not decode (in patient order).
    """
    if not instances:
        raise InvalidInput("no images in the series")
    for instance in instances:
        if instance.header_error is not None:
            raise instance.header_error
    shapes = sorted({(int(i.header.Rows), int(i.header.Columns)) for i in instances})
    if len(shapes) > 1:
        listed = ", ".join(f"{rows}x{cols}" for rows, cols in shapes)
        raise InvalidInput(f"images of different sizes in one series: {listed}")
    by_header = {id(i.header): i for i in instances}
    ordered = [by_header[id(ds)] for ds in sort_slices([i.header for i in instances])]
    for instance in ordered:
        if instance.pixel_error is not None:
            raise instance.pixel_error
    count = sum(len(i.frames) for i in ordered)
    pixels = np.empty((count, *ordered[0].frames[0].shape), dtype=np.float32)
    instance_uids: list[str] = []
    class_uids: list[str] = []
    for instance in ordered:
        for values in instance.frames:
            pixels[len(instance_uids)] = values
            instance_uids.append(str(instance.header.SOPInstanceUID))
            class_uids.append(str(instance.header.SOPClassUID))
    return Volume(pixels=pixels, sop_instance_uids=tuple(instance_uids),
                  sop_class_uids=tuple(class_uids))


def sort_slices(datasets: Sequence[Dataset]) -> list[Dataset]:
    """``datasets`` ordered along the slice normal, or by Instance Number as a fallback."""
    order = slice_order([position_along_normal(ds) for ds in datasets],
                        [instance_number(ds) for ds in datasets])
    return [datasets[i] for i in order]


def slice_order(positions: Sequence[float | None], numbers: Sequence[int]) -> list[int]:
    """Indices of images in patient order from each one's ``position_along_normal`` and
    ``instance_number``: by position when every image has one, else by number; ties keep
    the given order."""
    if all(p is not None for p in positions):
        return sorted(range(len(positions)), key=lambda i: cast(float, positions[i]))
    return sorted(range(len(positions)), key=numbers.__getitem__)


def position_along_normal(ds: Dataset) -> float | None:
    orientation = ds.get("ImageOrientationPatient")
    position = ds.get("ImagePositionPatient")
    try:
        if not orientation or not position or len(orientation) != 6 or len(position) != 3:
            return None
        row, column = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
        along = float(np.dot(np.cross(row, column), np.asarray(position, float)))
    except (TypeError, ValueError):  # values that are not numbers: order by Instance Number
        return None
    return along if math.isfinite(along) else None


def instance_number(ds: Dataset) -> int:
    # Images without a number keep their relative order after the numbered ones (sort is stable).
    number = ds.get("InstanceNumber")
    try:
        return int(number) if number not in (None, "") else 2**31
    except (TypeError, ValueError):
        return 2**31


def _check_identifiers(ds: Dataset) -> None:
    # The SR references these UIDs; an invalid one would make the report itself invalid.
    for keyword, name in (("StudyInstanceUID", "Study Instance UID"),
                          ("SeriesInstanceUID", "Series Instance UID"),
                          ("SOPInstanceUID", "SOP Instance UID"),
                          ("SOPClassUID", "SOP Class UID")):
        value = str(ds.get(keyword, "") or "").strip()
        if not value:
            raise InvalidInput(f"an image of the series has no {name}")
        if len(value) > 64 or not _UID.match(value):
            raise InvalidInput(f"an image of the series has an invalid {name} "
                               "(not digits and dots, or longer than 64 characters)")


def _check_decodable(ds: Dataset) -> None:
    """Refuse, before decoding, what the decoder cannot or should not try: the header is
    checked against the pixel data so that no declared size is ever allocated blindly."""
    if "PixelData" not in ds:
        for keyword in ("FloatPixelData", "DoubleFloatPixelData"):
            if keyword in ds:
                raise InvalidInput(
                    "floating-point pixel data is not supported, only integer images "
                    "can be analysed"
                )
        raise InvalidInput("an image of the series has no pixel data")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if photometric not in _MONOCHROME:
        raise InvalidInput(
            f"unsupported photometric interpretation {photometric or 'missing'}, "
            "only greyscale images can be analysed"
        )
    rows, columns = _integer(ds, "Rows"), _integer(ds, "Columns")
    frames = _integer(ds, "NumberOfFrames", default=1)
    samples = _integer(ds, "SamplesPerPixel", default=1)
    bits = _integer(ds, "BitsAllocated")
    stored = _integer(ds, "BitsStored", default=bits)
    representation = _integer(ds, "PixelRepresentation", default=0)
    if not (0 < rows <= MAX_IMAGE_SIDE and 0 < columns <= MAX_IMAGE_SIDE):
        problem = "are invalid" if rows <= 0 or columns <= 0 else (
            f"exceed the limit of {MAX_IMAGE_SIDE} x {MAX_IMAGE_SIDE}")
        raise InvalidInput(f"image dimensions {rows} x {columns} {problem}")
    if frames < 1:
        raise InvalidInput(f"Number of Frames {frames} is invalid")
    if samples != 1:
        raise InvalidInput(f"Samples per Pixel {samples} in a greyscale image is invalid, "
                           "a greyscale image has 1")
    if bits not in _BITS_ALLOCATED:
        raise InvalidInput(f"Bits Allocated {bits} is not supported, only "
                           f"{', '.join(map(str, _BITS_ALLOCATED))} bit images can be analysed")
    if not 1 <= stored <= bits:
        raise InvalidInput(f"Bits Stored {stored} does not fit Bits Allocated {bits}")
    if representation not in (0, 1):
        raise InvalidInput(f"Pixel Representation {representation} is invalid, "
                           "it is 0 (unsigned) or 1 (signed)")
    expected = rows * columns * frames * bits // 8
    if expected > MAX_DECODED_MEGABYTES * 2**20:
        raise InvalidInput(
            f"image too large to decode: {rows} x {columns} x {frames} frames of {bits} bits "
            f"({expected / 2**20:.0f} MB, limit {MAX_DECODED_MEGABYTES} MB)"
        )
    data = ds.PixelData
    if not data:
        raise InvalidInput("pixel data is empty")
    if _is_encapsulated(ds):
        _check_fragments(ds, data, frames)
    elif len(data) < expected:
        raise InvalidInput(
            "pixel data is shorter than Rows x Columns x frames declare: "
            f"{len(data)} bytes for {rows} x {columns} x {frames} of {bits} bits "
            f"({expected} bytes)"
        )


def _integer(ds: Dataset, keyword: str, default: int | None = None) -> int:
    value = ds.get(keyword)
    name = re.sub(r"(?<!^)(?=[A-Z])", " ", keyword).replace(" Of ", " of ").replace(" Per ",
                                                                                     " per ")
    if value in (None, ""):
        if default is None:
            raise InvalidInput(f"an image of the series has no {name}")
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise InvalidInput(f"{name} of an image is not a whole number") from None


def _is_encapsulated(ds: Dataset) -> bool:
    meta = getattr(ds, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    return uid is not None and UID(str(uid)).is_encapsulated


def _check_fragments(ds: Dataset, data: bytes, frames: int) -> None:
    cannot = f"cannot decode image pixel data ({_syntax_name(ds)})"
    # The Basic Offset Table item comes first; the frames' fragments follow it.
    view = memoryview(data)
    if len(view) < 8 or bytes(view[:4]) != b"\xfe\xff\x00\xe0":
        raise InvalidInput(f"{cannot}: it is not encapsulated as the transfer syntax requires")
    view = view[8 + int.from_bytes(view[4:8], "little"):]
    try:
        fragments, offsets = parse_fragments(io.BytesIO(view))
    except Exception as exc:  # pydicom raises several types for malformed item headers
        raise InvalidInput(f"{cannot}: its fragments are malformed") from exc
    if fragments < frames:
        raise InvalidInput(f"{cannot}: {fragments} compressed fragment(s) for {frames} frames")
    # The first fragment starts after its 8-byte item header.
    start = bytes(view[offsets[0] + 8 : offsets[0] + 20]) if offsets else b""
    syntax = str(ds.file_meta.TransferSyntaxUID)
    for prefix, signatures, kind in _SIGNATURES:
        if syntax.startswith(prefix) and not any(start.startswith(s) for s in signatures):
            raise InvalidInput(f"{cannot}: the compressed data is not a {kind} stream "
                               "(its start marker is missing)")


# Transfer syntax UID prefixes and how their compressed frames begin (SOC + SIZ markers or
# the JP2 signature box for JPEG 2000, ISO/IEC 15444-1; SOI for JPEG and JPEG-LS).
_SIGNATURES = (
    ("1.2.840.10008.1.2.4.9", (b"\xff\x4f\xff\x51", b"\x00\x00\x00\x0cjP  "), "JPEG 2000"),
    ("1.2.840.10008.1.2.4.20", (b"\xff\x4f\xff\x51", b"\x00\x00\x00\x0cjP  "),
     "JPEG 2000"),
    ("1.2.840.10008.1.2.4.5", (b"\xff\xd8",), "JPEG"),
    ("1.2.840.10008.1.2.4.7", (b"\xff\xd8",), "JPEG"),
    ("1.2.840.10008.1.2.4.8", (b"\xff\xd8",), "JPEG-LS"),
)


def _frames(ds: Dataset, calibration: list[tuple[float, float]] | None) -> list[np.ndarray]:
    """The decoded frames: Rescale Slope and Intercept of each frame applied when
    ``calibration`` gives them (Hounsfield units), stored values otherwise."""
    try:
        stored = ds.pixel_array
    except Exception as exc:  # pydicom raises many types; the reason is what the reader needs
        cause = ": the compressed data is corrupt or truncated" if _is_encapsulated(ds) else ""
        raise InvalidInput(f"cannot decode image pixel data ({_syntax_name(ds)}){cause}") from exc
    frames = int(ds.get("NumberOfFrames") or 1)
    expected = 2 if frames == 1 else 3
    if stored.ndim != expected:
        raise InvalidInput(f"unexpected image shape {stored.shape} for {frames} frame(s)")
    stack = stored[None] if frames == 1 else stored
    return [_values(ds, frame, calibration[index] if calibration else None)
            for index, frame in enumerate(stack)]


def _values(ds: Dataset, stored: np.ndarray,
            calibration: tuple[float, float] | None) -> np.ndarray:
    values = stored.astype(np.float32)
    if calibration is not None:
        # Slope/intercept map stored values to output units (Hounsfield units for CT);
        # MONOCHROME1 only changes how they are displayed, not what they mean.
        slope, intercept = calibration
        return values * np.float32(slope) + np.float32(intercept)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        # Invert so that higher always means brighter, within the stored bit depth.
        if int(ds.get("PixelRepresentation", 0)) == 1:
            return -values - 1
        return np.float32(2 ** int(ds.BitsStored) - 1) - values
    return values


def _is_ct(ds: Dataset) -> bool:
    modality = str(ds.get("Modality", "") or "").strip().upper()
    return modality == "CT" or str(ds.get("SOPClassUID", "")).strip() in _CT_STORAGE


def _functional_groups(ds: Dataset, frame: int, sequence: str) -> list[Dataset]:
    """The items of ``sequence`` (a functional group macro) that apply to ``frame`` of an
    enhanced image: the frame's own first, then the shared ones."""
    found = []
    for keyword, index in (("PerFrameFunctionalGroupsSequence", frame),
                           ("SharedFunctionalGroupsSequence", 0)):
        groups = ds.get(keyword)
        if groups and len(groups) > index:
            items = groups[index].get(sequence)
            if items:
                found.append(items[0])
    return found


def _rescale(ds: Dataset, frame: int, *, required: bool) -> tuple[float, float]:
    """Rescale Slope and Intercept: top level, else the functional groups of enhanced images
    (Pixel Value Transformation, PS3.3 C.7.6.16.2.9), shared or of the frame.

    ``required`` (Hounsfield units of a CT): both must be present and usable; otherwise the
    identity applies where none is given. (Rescale Type is not read: scanners and even
    enhanced CT files write ``US`` for values that are Hounsfield units.)
    """
    sources = [ds, *_functional_groups(ds, frame, "PixelValueTransformationSequence")]
    for source in sources:
        if "RescaleSlope" not in source and "RescaleIntercept" not in source:
            continue
        if required:
            for keyword, name in (("RescaleSlope", "Rescale Slope"),
                                  ("RescaleIntercept", "Rescale Intercept")):
                if keyword not in source:
                    raise InvalidInput(f"{name} is missing: the CT's Hounsfield units are "
                                       "unknown")
        slope = _decimal(source.get("RescaleSlope"), "Rescale Slope",
                         None if required else 1.0)
        intercept = _decimal(source.get("RescaleIntercept"), "Rescale Intercept",
                             None if required else 0.0)
        if slope == 0:
            raise InvalidInput("Rescale Slope 0 maps every pixel to the same value")
        return slope, intercept
    if required:
        raise InvalidInput("Rescale Slope and Rescale Intercept are missing: the CT's "
                           "Hounsfield units are unknown")
    return 1.0, 0.0


def _pixel_spacing(ds: Dataset, frame: int) -> tuple[float, float]:
    """Pixel Spacing (row, column) in millimetres: top level, else the Pixel Measures
    functional group of enhanced images. Raises InvalidInput when it is not usable."""
    sources = [ds, *_functional_groups(ds, frame, "PixelMeasuresSequence")]
    source = next((s for s in sources if "PixelSpacing" in s), None)
    if source is None:
        raise InvalidInput("Pixel Spacing is missing: the model needs the images' size "
                           "in millimetres")
    found = dicom_values(source.get("PixelSpacing"))
    if len(found) != 2:
        raise InvalidInput(f"Pixel Spacing has {len(found)} value(s), 2 expected")
    spacing = tuple(_decimal(v, "Pixel Spacing", None) for v in found)
    if not all(value > 0 for value in spacing):
        raise InvalidInput("Pixel Spacing is zero or negative: the images' size in "
                           "millimetres is unknown")
    return spacing[0], spacing[1]


def _decimal(value: object, name: str, default: float | None) -> float:
    """A Decimal String attribute as a finite float; ``default`` when empty (an error when
    there is no default)."""
    found = dicom_values(value)
    if len(found) > 1:
        raise InvalidInput(f"{name} has {len(found)} values, one expected")
    text = found[0].strip() if found else ""
    if text == "":
        if default is None:
            raise InvalidInput(f"{name} is empty: no value to compute with")
        return default
    try:
        number = float(text)
    except ValueError:
        raise InvalidInput(f"{name} is not a number") from None
    if math.isnan(number):
        raise InvalidInput(f"{name} NaN is not a number")
    if math.isinf(number):
        raise InvalidInput(f"{name} is infinite")
    return number


def _syntax_name(ds: Dataset) -> str:
    meta = getattr(ds, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    if uid is None:
        return "transfer syntax unknown"
    uid = UID(str(uid))
    return f"transfer syntax {uid.name}" if uid.name != str(uid) else f"transfer syntax {uid}"
