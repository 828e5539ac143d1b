"""A corpus of hostile studies built from real DICOM files (pydicom's and pydicom-data's test
files), each with the outcome the service must reach.

Every case is a study of its own, with deterministic Study/Series/SOP Instance UIDs derived from
its name. Cases meant to reach the head-CT model are labelled as axial head CT (Body Part
Examined HEAD, description "CT HEAD", CT Image Storage), so that they exercise the decoder
rather than being skipped by series selection. A case's expected outcome is a worklist status
and a substring of the reason, or ``REFUSED`` for files Orthanc itself refuses at ingest.
"""

from __future__ import annotations

import copy
import io
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache

import numpy as np
import pydicom
from pydicom.data import get_charset_files, get_testdata_file
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.tag import Tag
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
)

from triage.uids import derived_uid

ANALYSED, SKIPPED, FAILED = "analysed", "skipped", "failed"
REFUSED = "refused by Orthanc"


@dataclass(frozen=True)
class HostileCase:
    """One hostile study: its instances (file bytes) and what the service must do with it."""

    name: str
    files: tuple[bytes, ...]
    status: str  # ANALYSED, SKIPPED, FAILED or REFUSED
    reason: str = ""  # a substring the worklist reason must contain ("" when analysed)
    # For analysed cases: the series the model must have used (mixed studies).
    analysed_series: str | None = None
    # For analysed cases: the worklist priority the study must end with.
    priority: str | None = None
    # dciodvfy errors accepted in the service's SR and key image, each named by the
    # attribute it is about: only identifiers the source sent invalid, which are copied as
    # they are (see triage/copying/header.py).
    identifier_errors: tuple[str, ...] = ()
    # The Timezone Offset From UTC the service's objects must declare, where the case is
    # about it.
    utc_offset: str | None = None

    @property
    def study_instance_uid(self) -> str:
        return study_uid(self.name)


def study_uid(case: str) -> str:
    return str(derived_uid("hostile-study", case))


def series_uid(case: str, series: str = "ct") -> str:
    return str(derived_uid("hostile-series", case, series))


# -- building blocks --------------------------------------------------------------------------


@cache
def _source(name: str) -> Dataset:
    path = get_testdata_file(name)
    if not isinstance(path, str):
        raise FileNotFoundError(f"{name}: install the pydicom-data package")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(path)


def _charset_source(name: str) -> Dataset:
    [path] = get_charset_files(name)
    return pydicom.dcmread(path)


def _own(ds: Dataset, case: str, series: str, index: int) -> Dataset:
    """``ds`` re-identified as instance ``index`` of series ``series`` of the case's study."""
    ds.StudyInstanceUID = study_uid(case)
    ds.SeriesInstanceUID = series_uid(case, series)
    ds.SOPInstanceUID = derived_uid("hostile-instance", case, series, str(index))
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.PatientName = f"HOSTILE^{case.upper()}"
    ds.PatientID = f"HOSTILE-{case}"[:64]
    ds.AccessionNumber = f"H{abs(hash_text(case)) % 10**10:010d}"
    ds.StudyID = "1"
    ds.InstanceNumber = index + 1
    return ds


def hash_text(text: str) -> int:
    """A stable (not salted) integer from ``text``."""
    return int(str(derived_uid("hostile-hash", text)).rsplit(".", 1)[-1]) % 2**63


def head_ct(case: str, index: int = 0, *, source: str = "CT_small.dcm",
            series: str = "ct") -> Dataset:
    """An axial head CT slice from a real CT file, ready for the head-CT model."""
    ds = _own(copy.deepcopy(_source(source)), case, series, index)
    ds.Modality = "CT"
    ds.SOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.BodyPartExamined = "HEAD"
    ds.StudyDescription = "CT HEAD"
    ds.SeriesDescription = "CT HEAD AXIAL"
    ds.SeriesNumber = 1
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [-100, -100, index * 5.0]
    ds.SliceThickness = 5
    if "RescaleSlope" not in ds:
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    return ds


def encode(ds: Dataset, syntax: str | None = None) -> bytes:
    """``ds`` as a DICOM file (Part 10), in ``syntax`` when given."""
    if syntax is not None:
        ds.file_meta.TransferSyntaxUID = syntax
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _series(case: str, n: int = 2, change: Callable[[Dataset], None] | None = None,
            **kwargs: object) -> tuple[bytes, ...]:
    """``n`` head CT slices, each changed by ``change``."""
    files = []
    for index in range(n):
        ds = head_ct(case, index, **kwargs)  # type: ignore[arg-type]
        if change is not None:
            change(ds)
        files.append(encode(ds))
    return tuple(files)


def _raw(ds: Dataset, keyword: str, vr: str, value: bytes) -> None:
    """Set an element to raw bytes, bypassing pydicom's validation (deliberately bad values)."""
    tag = Tag(keyword)
    ds[tag] = RawDataElement(tag, vr, len(value), value, 0, False, True)


def _other(case: str, name: str, series: str, index: int = 0, **changes: object) -> Dataset:
    ds = _own(copy.deepcopy(_source(name)), case, series, index)
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    return ds


def _j2k_frame() -> bytes:
    ds = _source("J2K_pixelrep_mismatch.dcm")
    return next(generate_frames(ds.PixelData, number_of_frames=1))


def _j2k_head_ct(case: str, frame: bytes) -> bytes:
    ds = _own(copy.deepcopy(_source("J2K_pixelrep_mismatch.dcm")), case, "ct", 0)
    ds.StudyDescription = "CT HEAD"
    ds.BodyPartExamined = "HEAD"
    ds.PixelData = encapsulate([frame])
    return encode(ds)


# -- the cases --------------------------------------------------------------------------------


def _changed(**values: object) -> Callable[[Dataset], None]:
    def change(ds: Dataset) -> None:
        for keyword, value in values.items():
            if value is None:
                if keyword in ds:
                    delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
    return change


def _pixels(length: Callable[[int], int]) -> Callable[[Dataset], None]:
    def change(ds: Dataset) -> None:
        data = bytes(ds.PixelData)
        wanted = length(len(data))
        ds.PixelData = (data * (wanted // max(len(data), 1) + 1))[:wanted]
    return change


def _rgb(ds: Dataset) -> None:
    grey = ds.pixel_array.astype(np.int32)
    scaled = ((grey - grey.min()) * 255 // max(int(np.ptp(grey)), 1)).astype(np.uint8)
    ds.PixelData = np.repeat(scaled[..., None], 3, axis=2).tobytes()
    ds.SamplesPerPixel, ds.PlanarConfiguration = 3, 0
    ds.PhotometricInterpretation = "RGB"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0


def _palette(ds: Dataset) -> None:
    source = _source("OBXXXX1A.dcm")
    grey = ds.pixel_array.astype(np.int32)
    ds.PixelData = ((grey - grey.min()) % 256).astype(np.uint8).tobytes()
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.PhotometricInterpretation = "PALETTE COLOR"
    for colour in ("Red", "Green", "Blue"):
        for part, vr in (("PaletteColorLookupTableDescriptor", "US"),
                         ("PaletteColorLookupTableData", "OW")):
            keyword = f"{colour}{part}"
            ds.add_new(keyword, vr, source[keyword].value)


def _one_bit(ds: Dataset) -> None:
    bits = ds.pixel_array > 0
    ds.PixelData = np.packbits(bits.ravel(), bitorder="little").tobytes()
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 1, 0, 0


def _float_pixels(ds: Dataset) -> None:
    values = ds.pixel_array.astype(np.float32) - 1024
    del ds.PixelData
    ds.FloatPixelData = values.tobytes()
    ds.BitsAllocated = 32
    for keyword in ("BitsStored", "HighBit", "PixelRepresentation"):
        delattr(ds, keyword)


def _multi_frame(ds: Dataset) -> None:
    ds.NumberOfFrames = 3
    ds.PixelData = bytes(ds.PixelData) * 3


def _no_position_number(ds: Dataset) -> None:
    _raw(ds, "ImagePositionPatient", "DS", b"abc\\def\\1 ")


def _bad_slope(value: bytes) -> Callable[[Dataset], None]:
    def change(ds: Dataset) -> None:
        _raw(ds, "RescaleSlope", "DS", value)
    return change


def _charset_name(charset_file: str) -> Callable[[Dataset], None]:
    def change(ds: Dataset) -> None:
        source = _charset_source(charset_file)
        ds.SpecificCharacterSet = source.SpecificCharacterSet
        ds.PatientName = source.PatientName
    return change


def _invalid_name_bytes(ds: Dataset) -> None:
    ds.SpecificCharacterSet = "ISO_IR 192"
    _raw(ds, "PatientName", "PN", b"BAD\xff\xfe^NAME\xc3(")


def _cases() -> Iterator[HostileCase]:  # noqa: PLR0915 - a flat list of cases reads best
    yield HostileCase("baseline-head-ct", _series("baseline-head-ct", 3), ANALYSED)

    # Files cut short, and pixel data that does not match the declared image.
    name = "truncated-in-header"
    yield HostileCase(name, (encode(head_ct(name))[:300],), REFUSED)
    name = "truncated-in-pixel-data"
    # DCMTK refuses a file that ends inside a declared element; see the next case.
    yield HostileCase(name, (encode(head_ct(name))[:-10000],), REFUSED)
    yield HostileCase("missing-pixel-data",
                      _series("missing-pixel-data", change=_changed(PixelData=None)),
                      SKIPPED, "no pixel data")
    yield HostileCase("pixel-data-shorter-than-declared",
                      _series("pixel-data-shorter-than-declared",
                              change=_pixels(lambda n: n // 2)),
                      SKIPPED, "pixel data is shorter than Rows x Columns")
    yield HostileCase("zero-length-pixel-data",
                      _series("zero-length-pixel-data", change=_pixels(lambda n: 0)),
                      SKIPPED, "pixel data is empty")
    yield HostileCase("pixel-data-longer-than-declared",
                      _series("pixel-data-longer-than-declared",
                              change=_pixels(lambda n: n + 4096)), ANALYSED)
    yield HostileCase("absurd-dimensions",
                      _series("absurd-dimensions", change=_changed(Rows=60000, Columns=60000)),
                      SKIPPED, "image dimensions 60000 x 60000 exceed the limit")
    yield HostileCase("absurd-number-of-frames",
                      _series("absurd-number-of-frames", change=_changed(NumberOfFrames=50000)),
                      SKIPPED, "pixel data is shorter than Rows x Columns x frames")
    yield HostileCase("zero-rows",
                      _series("zero-rows", change=_changed(Rows=0)),
                      SKIPPED, "image dimensions 0 x 128")
    yield HostileCase("missing-rows",
                      _series("missing-rows", change=_changed(Rows=None)),
                      SKIPPED, "no Rows")
    yield HostileCase("bits-stored-above-bits-allocated",
                      _series("bits-stored-above-bits-allocated",
                              change=_changed(BitsStored=24, HighBit=23)),
                      SKIPPED, "Bits Stored 24")
    yield HostileCase("invalid-pixel-representation",
                      _series("invalid-pixel-representation",
                              change=_changed(PixelRepresentation=2)),
                      SKIPPED, "Pixel Representation 2")
    yield HostileCase("monochrome-with-three-samples",
                      _series("monochrome-with-three-samples",
                              change=_changed(SamplesPerPixel=3)),
                      SKIPPED, "Samples per Pixel 3")

    # Compressed streams.
    frame = _j2k_frame()
    yield HostileCase("jpeg2000-head-ct", (_j2k_head_ct("jpeg2000-head-ct", frame),), ANALYSED)
    yield HostileCase("corrupt-jpeg2000-header",
                      (_j2k_head_ct("corrupt-jpeg2000-header",
                                    frame[:2] + bytes(range(256)) * 4 + frame[1026:]),),
                      SKIPPED, "the compressed data is not a JPEG 2000 stream")
    yield HostileCase("corrupt-jpeg2000-tile-data",
                      (_j2k_head_ct("corrupt-jpeg2000-tile-data",
                                    frame[:200] + bytes(len(frame) - 200)),),
                      # OpenJPEG rejects it, Pillow decodes it without complaint: nothing
                      # in the file tells a damaged image from a real one, so it is analysed.
                      ANALYSED)
    yield HostileCase("truncated-jpeg2000-stream",
                      (_j2k_head_ct("truncated-jpeg2000-stream", frame[:200]),),
                      SKIPPED, "cannot decode image pixel data (transfer syntax JPEG 2000 "
                      "Image Compression (Lossless Only)): the compressed data is corrupt")
    name = "native-pixels-labelled-jpeg"
    ds = head_ct(name)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([bytes(ds.PixelData)])
    yield HostileCase(name, (encode(ds),), SKIPPED, "the compressed data is not a JPEG stream")
    name = "fewer-fragments-than-frames"
    ds = head_ct(name)
    ds.file_meta.TransferSyntaxUID = str(_source("J2K_pixelrep_mismatch.dcm")
                                         .file_meta.TransferSyntaxUID)
    ds.PixelData, ds.NumberOfFrames = encapsulate([frame]), 40
    ds.Rows = ds.Columns = 512
    yield HostileCase(name, (encode(ds),), SKIPPED,
                      "1 compressed fragment(s) for 40 frames")

    # UIDs.
    name = "missing-sop-instance-uid"
    ds = head_ct(name)
    del ds.SOPInstanceUID
    yield HostileCase(name, (encode(ds),), REFUSED)
    name = "missing-study-instance-uid"
    ds = head_ct(name)
    del ds.StudyInstanceUID
    yield HostileCase(name, (encode(ds),), REFUSED)
    name = "invalid-sop-instance-uid"
    ds = head_ct(name)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.abc.04"
    yield HostileCase(name, (encode(ds),), SKIPPED, "invalid SOP Instance UID")
    name = "invalid-series-instance-uid"
    ds = head_ct(name)
    ds.SeriesInstanceUID = f"{series_uid(name)}.{'9' * 70}"
    yield HostileCase(name, (encode(ds),), SKIPPED, "invalid Series Instance UID")

    # Non-image and foreign objects inside an image study; mixed modalities.
    name = "foreign-sr-in-ct-study"
    yield HostileCase(name, (*_series(name, 2), encode(_other(name, "test-SR.dcm", "sr"))),
                      ANALYSED, analysed_series=series_uid(name))
    name = "rt-plan-in-ct-study"
    yield HostileCase(name, (*_series(name, 2), encode(_other(name, "rtplan.dcm", "rt"))),
                      ANALYSED, analysed_series=series_uid(name))
    name = "mixed-ct-and-mr"
    mr = [encode(_other(name, "MR_small.dcm", "mr", i, BodyPartExamined="HEAD",
                        StudyDescription="CT HEAD")) for i in range(3)]
    yield HostileCase(name, (*_series(name, 2), *mr), ANALYSED,
                      analysed_series=series_uid(name))
    name = "foreign-sr-only"
    yield HostileCase(name, (encode(_other(name, "test-SR.dcm", "sr")),), SKIPPED,
                      "modality SR")
    name = "rgb-secondary-capture-only"
    yield HostileCase(name, (encode(_other(name, "SC_rgb.dcm", "sc")),), SKIPPED,
                      "modality OT")
    name = "enhanced-ct-multi-frame"
    ds = _other(name, "eCT_Supplemental.dcm", "ct", BodyPartExamined="HEAD",
                StudyDescription="CT HEAD")
    yield HostileCase(name, (encode(ds),), SKIPPED, "does not accept this image type")
    yield HostileCase("inconsistent-image-sizes",
                      (*_series("inconsistent-image-sizes", 1),
                       encode(head_ct("inconsistent-image-sizes", 1, source="693_UNCR.dcm"))),
                      SKIPPED, "images of different sizes in one series: 128x128, 512x512")

    # Pixel formats.
    yield HostileCase("multi-frame-ct-image",
                      _series("multi-frame-ct-image", 1, change=_multi_frame), ANALYSED)
    yield HostileCase("rgb-ct", _series("rgb-ct", change=_rgb), SKIPPED,
                      "unsupported photometric interpretation RGB")
    yield HostileCase("palette-color-ct", _series("palette-color-ct", change=_palette),
                      SKIPPED, "unsupported photometric interpretation PALETTE COLOR")
    yield HostileCase("one-bit-pixels", _series("one-bit-pixels", change=_one_bit), SKIPPED,
                      "Bits Allocated 1")
    yield HostileCase("float-pixel-data", _series("float-pixel-data", change=_float_pixels),
                      SKIPPED, "floating-point pixel data")
    yield HostileCase("tiny-3x3-image",
                      _series("tiny-3x3-image", change=lambda ds: _crop(ds, 3, 3)), ANALYSED)
    yield HostileCase("one-row-image",
                      _series("one-row-image", change=lambda ds: _crop(ds, 1, 128)), ANALYSED)

    # Transfer syntaxes.
    name = "explicit-big-endian"
    files = []
    for index in range(2):
        ds = head_ct(name, index, source="MR_small_bigendian.dcm")
        files.append(encode(ds, ExplicitVRBigEndian))
    yield HostileCase(name, tuple(files), ANALYSED)
    name = "deflated"
    ds = head_ct(name, source="image_dfl.dcm")
    yield HostileCase(name, (encode(ds, DeflatedExplicitVRLittleEndian),), ANALYSED)
    name = "corrupt-deflate-stream"
    data = encode(head_ct(name), DeflatedExplicitVRLittleEndian)
    cut = len(data) // 2
    yield HostileCase(name, (data[:cut] + bytes(200) + data[cut + 200:],), REFUSED)

    # Geometry and rescale.
    yield HostileCase("missing-image-position",
                      _series("missing-image-position", 3,
                              change=_changed(ImagePositionPatient=None)), ANALYSED)
    yield HostileCase("non-numeric-image-position",
                      _series("non-numeric-image-position", 3, change=_no_position_number),
                      ANALYSED)
    yield HostileCase("missing-image-orientation",
                      _series("missing-image-orientation",
                              change=_changed(ImageOrientationPatient=None)),
                      SKIPPED, "needs axial images")
    yield HostileCase("nan-rescale-slope", _series("nan-rescale-slope", change=_bad_slope(b"NaN ")),
                      SKIPPED, "Rescale Slope NaN")
    yield HostileCase("zero-rescale-slope", _series("zero-rescale-slope",
                                                    change=_bad_slope(b"0 ")),
                      SKIPPED, "Rescale Slope 0")
    yield HostileCase("non-numeric-rescale-slope",
                      _series("non-numeric-rescale-slope", change=_bad_slope(b"one ")),
                      SKIPPED, "Rescale Slope is not a number")
    yield HostileCase("infinite-rescale-intercept",
                      _series("infinite-rescale-intercept",
                              change=lambda ds: _raw(ds, "RescaleIntercept", "DS", b"1e999 ")),
                      SKIPPED, "Rescale Intercept is infinite")

    # Character sets of names.
    yield HostileCase("name-iso-2022-ir-87", _series("name-iso-2022-ir-87",
                                                     change=_charset_name("chrH32.dcm")),
                      ANALYSED)
    yield HostileCase("name-iso-ir-192", _series("name-iso-ir-192",
                                                 change=_charset_name("chrX1.dcm")), ANALYSED)
    yield HostileCase("name-gb18030", _series("name-gb18030",
                                              change=_charset_name("chrX2.dcm")), ANALYSED)
    yield HostileCase("name-invalid-bytes-for-charset",
                      _series("name-invalid-bytes-for-charset", change=_invalid_name_bytes),
                      ANALYSED)


def _crop(ds: Dataset, rows: int, columns: int) -> None:
    ds.PixelData = np.ascontiguousarray(ds.pixel_array[:rows, :columns]).tobytes()
    ds.Rows, ds.Columns = rows, columns


def hostile_cases() -> list[HostileCase]:
    """Every case, in a fixed order, with unique names and study UIDs."""
    cases = list(_cases())
    names = [c.name for c in cases]
    assert len(set(names)) == len(names), "case names must be unique"
    return cases


__all__ = ["ANALYSED", "FAILED", "REFUSED", "SKIPPED", "HostileCase", "head_ct",
           "hostile_cases"]
