"""The attribute sweep of the hostile corpus: every attribute the service reads or copies,
sent absent, empty, over-long, in the wrong format, multi-valued where one value is expected,
and badly encoded, each case with the outcome the service must reach.

Each case is one axial head CT slice with a synthetic hyperdense region (the demo phantom, a
real CT slice of pydicom-data with a painted disc), so an analysed case ends ``critical`` and
the service writes both its SR and its burned-in key image. Values are written as raw bytes,
exactly as a modality would send them.

Identifiers are copied into the service's objects as they are, even when invalid; a case
whose identifier is invalid lists the dciodvfy errors that this causes, by attribute name.
The stack runs with the site time zone ``SITE_TIMEZONE``; each analysed case says which UTC
offset the service's objects must declare.

Run as a script to write the corpus for other tools (``storescu +sd`` a folder of it):
``python -m tests.hostile_attributes OUTPUT_DIR`` writes one folder per case and
``expected.json`` with each case's expected outcome.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import sys
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import asdict
from functools import cache
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import pydicom
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from tests.hostile import ANALYSED, SKIPPED, HostileCase, _own, encode, study_uid
from triage.samples import SAMPLES, build_sample

SITE_TIMEZONE = "Europe/Paris"
WINTER, SUMMER = "+0100", "+0200"  # Europe/Paris in January and in July


def site_offset_now() -> str:
    """The site zone's UTC offset now (``+0100``)."""
    offset = dt.datetime.now(ZoneInfo(SITE_TIMEZONE)).utcoffset() or dt.timedelta(0)
    minutes = int(offset.total_seconds()) // 60
    return f"{'-' if minutes < 0 else '+'}{abs(minutes) // 60:02d}{abs(minutes) % 60:02d}"

# What every case starts from: valid values of everything the sweep changes.
_NORMAL: dict[str, object] = {
    "SpecificCharacterSet": "ISO_IR 100",
    "PatientBirthDate": "19700101", "PatientSex": "F", "PatientAge": "056Y",
    "PatientSize": "1.70", "PatientWeight": "65", "IssuerOfPatientID": "GENERAL HOSPITAL",
    "StudyDate": "20260115", "StudyTime": "101500", "SeriesDate": "20260115",
    "SeriesTime": "101500", "AcquisitionDate": "20260115", "AcquisitionTime": "101510",
    "AcquisitionDateTime": "20260115101510", "ReferringPhysicianName": "REFERRER^ANNA",
    "StudyDescription": "CT HEAD WITHOUT CONTRAST", "SeriesDescription": "HEAD 5mm",
    "BodyPartExamined": "HEAD", "Manufacturer": "GE MEDICAL SYSTEMS",
    "ManufacturerModelName": "LightSpeed VCT", "StationName": "CT01",
    "InstitutionName": "General Hospital", "InstitutionalDepartmentName": "Radiology",
    "InstitutionAddress": "1 Hospital Road", "DeviceSerialNumber": "SN12345",
    "SoftwareVersions": "LightSpeedverrel", "WindowCenter": "40", "WindowWidth": "80",
}
_LONG_LO = b"X" * 70  # over 64
_LATIN1_NAME = b"M\xfcLLER^J\xf6RG"  # Latin-1 bytes
_UTF8_NAME = "MÜLLER^JÖRG".encode()
_ISO2022_NAME = b"YAMADA^TARO=\x1b$B;3ED\x1b(B^\x1b$BB@O:\x1b(B"  # JIS X 0208 with escapes


@cache
def _bleed_slice() -> bytes:
    """The slice of the hyperdense demo study that carries the synthetic region, at half its
    resolution (2 x 2 pixels averaged, the pixel spacing doubled): what the model sees of it
    is the same, and the corpus is a quarter of the size."""
    sample = next(s for s in SAMPLES if s.hyperdense_region)
    ds = list(build_sample(sample))[sample.slices // 2]
    pixels = ds.pixel_array.astype(np.float64)
    half = pixels.reshape(pixels.shape[0] // 2, 2, pixels.shape[1] // 2, 2).mean(axis=(1, 3))
    ds.PixelData = np.round(half).astype(ds.pixel_array.dtype).tobytes()
    ds.Rows, ds.Columns = half.shape
    ds.PixelSpacing = [f"{float(v) * 2:.6f}" for v in ds.PixelSpacing]
    return encode(ds)


def attribute_case(name: str, *, raw: Mapping[str, bytes] = {},  # noqa: B006 - never mutated
                   absent: tuple[str, ...] = (), values: Mapping[str, object] = {},  # noqa: B006
                   unknown_vr: tuple[str, ...] = (), status: str = ANALYSED, reason: str = "",
                   identifier_errors: tuple[str, ...] = (),
                   utc_offset: str | None = WINTER) -> HostileCase:
    """One case: the normal slice with ``values`` set (the character set among them),
    ``absent`` attributes removed, then ``raw`` attributes set to exactly these bytes, with
    the VR UN for those in ``unknown_vr`` (as a gateway without a dictionary writes them)."""
    ds = _own(pydicom.dcmread(io.BytesIO(_bleed_slice())), name, "ct", 0)
    for keyword, value in {**_NORMAL, **values}.items():
        setattr(ds, keyword, value)
    for keyword in absent:
        if keyword in ds:
            delattr(ds, keyword)
    # Read back, so that the raw values below are written as they are: pydicom re-encodes
    # raw values only when the character set changed since the file was read.
    ds = pydicom.dcmread(io.BytesIO(encode(ds)))
    for keyword, value in raw.items():
        tag = Tag(keyword)
        vr = "UN" if keyword in unknown_vr else dictionary_VR(tag)
        pad = b"\0" if dictionary_VR(tag) == "UI" else b" "
        value += pad * (len(value) % 2)  # elements have an even length
        ds[tag] = RawDataElement(tag, vr, len(value), value, 0, False, True)
    return HostileCase(name, (encode(ds),), status, reason,
                       priority="critical" if status == ANALYSED else None,
                       identifier_errors=identifier_errors,
                       utc_offset=utc_offset if status == ANALYSED else None)


def _item(**attributes: object) -> Dataset:
    item = Dataset()
    for keyword, value in attributes.items():
        setattr(item, keyword, value)
    return item


def _ok(name: str, keyword: str, value: bytes) -> HostileCase:
    return attribute_case(name, raw={keyword: value})


def _sweep_copied() -> Iterator[HostileCase]:
    """Attributes the SR and the key image copy: made valid there, the study analysed."""
    strings = {  # keyword: (VR limit exceeded, a value with a control character)
        "StudyDescription": (b"CT HEAD " * 12, b"CT\x00HEAD\x07"),
        "ReferringPhysicianName": (b"REFERRER" * 10 + b"^ANNA", b"REF\x1b^ANNA"),
        "StudyID": (b"S" * 20, b"S\t1"),
        "Manufacturer": (b"M" * 100, b"GE\x0bMEDICAL"),
        "ManufacturerModelName": (_LONG_LO, b"MODEL\r\n"),
        "StationName": (b"STATION" * 4, b"CT\x7f01"),
        "InstitutionName": (b"GENERAL HOSPITAL " * 6, b"GENERAL\x1cHOSPITAL"),
        "InstitutionalDepartmentName": (_LONG_LO, b"RAD\x00"),
        "InstitutionAddress": (b"ROAD " * 230, b"1 ROAD\x00"),
        "DeviceSerialNumber": (_LONG_LO, b"SN\x01"),
        "SoftwareVersions": (_LONG_LO + b"\\" + _LONG_LO, b"V1\x02\\V2"),
        "PatientName": (b"LONGFAMILYNAME" * 6 + b"^JOHN", b"DOE\x07^JOHN"),
    }
    for keyword, (long, control) in strings.items():
        stem = keyword.lower()
        yield attribute_case(f"{stem}-absent", absent=(keyword,))
        yield _ok(f"{stem}-empty", keyword, b"")
        yield _ok(f"{stem}-over-long", keyword, long)
        yield _ok(f"{stem}-control-characters", keyword, control)
        yield _ok(f"{stem}-multi-valued", keyword, b"FIRST\\SECOND")
        yield attribute_case(f"{stem}-latin1-bytes-declared-utf8", raw={keyword: b"CAF\xe9 X"},
                             values={"SpecificCharacterSet": "ISO_IR 192"})
        yield attribute_case(f"{stem}-utf8-bytes-declared-latin1",
                             raw={keyword: "CAFÉ X".encode()})
    yield _ok("patientname-too-many-components", "PatientName", b"A^B^C^D^E^F^G")
    yield _ok("patientname-too-many-groups", "PatientName", b"A=B=C=D=E")
    yield _ok("patientname-single-component", "PatientName", b"UNKNOWN")
    yield _ok("patientname-iso2022-escapes-undeclared", "PatientName", _ISO2022_NAME)
    yield attribute_case("patientname-iso2022-declared-empty-first-value",
                         raw={"PatientName": _ISO2022_NAME},
                         values={"SpecificCharacterSet": ["", "ISO 2022 IR 87"]})
    yield attribute_case("patientname-latin1-without-character-set",
                         raw={"PatientName": _LATIN1_NAME}, absent=("SpecificCharacterSet",))

    dates = (("empty", b""), ("dashed", b"2026-01-15"), ("impossible", b"20261345"),
             ("over-long", b"202601150"), ("multi-valued", b"20260115\\20260116"),
             ("year-only", b"2026"), ("letters", b"JAN 2026"))
    times = (("empty", b""), ("colons", b"10:15:00"), ("impossible", b"256100"),
             ("seven-fraction-digits", b"101500.1234567"), ("multi-valued", b"101500\\101600"))
    for keywords, variants in ((("PatientBirthDate", "StudyDate", "AcquisitionDate"), dates),
                               (("StudyTime", "AcquisitionTime"), times)):
        for keyword in keywords:
            stem = keyword.lower()
            for label, value in variants:
                yield _ok(f"{stem}-{label}", keyword, value)
            yield attribute_case(f"{stem}-absent", absent=(keyword,))
    for label, value in (("iso-format", b"2026-01-15T10:15:10"), ("impossible", b"20261315"),
                         ("bad-offset", b"20260115101510+9900")):
        yield _ok(f"acquisitiondatetime-{label}", "AcquisitionDateTime", value)
    for label, value in (("empty", b""), ("lower-case", b"f "), ("word", b"FEMALE"),
                         ("unknown-letter", b"X "), ("multi-valued", b"M\\F ")):
        yield _ok(f"patientsex-{label}", "PatientSex", value)
    yield attribute_case("patientsex-absent", absent=("PatientSex",))
    for label, value in (("no-unit", b"56"), ("two-digits", b"56Y "), ("words", b"56 YEARS"),
                         ("over-long", b"0056Y "), ("multi-valued", b"056Y\\057Y"),
                         ("lower-case", b"056y")):
        yield _ok(f"patientage-{label}", "PatientAge", value)
    for keyword in ("PatientSize", "PatientWeight"):
        stem = keyword.lower()
        for label, value in (("comma", b"1,70"), ("nan", b"NaN "), ("infinite", b"1e999 "),
                             ("over-long", b"1.7000000000000000001 "),
                             ("multi-valued", b"1.70\\1.80")):
            yield _ok(f"{stem}-{label}", keyword, value)
    yield _ok("patientidentityremoved-lower-case", "PatientIdentityRemoved", b"yes ")


def _sweep_identifiers() -> Iterator[HostileCase]:
    """Identifiers: copied byte for byte; an invalid one is the only error accepted."""
    for keyword, limit in (("PatientID", 64), ("IssuerOfPatientID", 64),
                           ("AccessionNumber", 16)):
        stem = keyword.lower()
        yield attribute_case(f"{stem}-absent", absent=(keyword,))
        yield _ok(f"{stem}-empty", keyword, b"")
        yield attribute_case(f"{stem}-over-long", raw={keyword: b"7" * (limit + 10)},
                             identifier_errors=(keyword,))
        yield attribute_case(f"{stem}-multi-valued", raw={keyword: b"ID1\\ID2 "},
                             identifier_errors=(keyword,))
        yield attribute_case(f"{stem}-control-character", raw={keyword: b"ID\t42"},
                             identifier_errors=(keyword,))
        yield _ok(f"{stem}-latin1", keyword, b"M\xfcLLER1")
        yield attribute_case(f"{stem}-latin1-bytes-declared-utf8", raw={keyword: b"M\xfcL1"},
                             values={"SpecificCharacterSet": "ISO_IR 192"},
                             identifier_errors=(keyword,))
    # Non-ASCII identifiers in a source without a character set DICOM defines: the result
    # declares none either, so that it is read as the source is (the bytes are then invalid
    # in the default repertoire: the identifier errors of the case).
    yield attribute_case("patientid-latin1-without-character-set",
                         raw={"PatientID": b"M\xfcLLER1"}, absent=("SpecificCharacterSet",),
                         identifier_errors=("PatientID",))
    yield attribute_case("accessionnumber-latin1-misspelled-character-set",
                         raw={"AccessionNumber": b"\xc9L2"},
                         values={"SpecificCharacterSet": "ISO-IR 100"},
                         identifier_errors=("AccessionNumber",))
    # Identifiers a gateway wrote with the VR UN: Orthanc then keeps their padding, so the
    # service's objects keep the VR to be filed with the images.
    name = "identifiers-written-as-un"
    yield attribute_case(name, unknown_vr=("PatientID", "AccessionNumber", "StudyInstanceUID",
                                           "PatientName"),
                         raw={"PatientID": b"UN-PATIENT-12", "AccessionNumber": b"UN7",
                              "StudyInstanceUID": study_uid(name).encode(),
                              "PatientName": b"UNKNOWN^VR"})
    # The unidentified trauma patient: nothing but the images.
    yield attribute_case("unidentified-patient",
                         absent=("PatientID", "PatientName", "PatientBirthDate", "PatientSex",
                                 "PatientAge", "AccessionNumber", "StudyID",
                                 "ReferringPhysicianName", "IssuerOfPatientID"))


def _sweep_character_sets() -> Iterator[HostileCase]:
    for label, charset in (("misspelled", b"ISO-IR 100"), ("python-name", b"latin1"),
                           ("utf8-alias", b"UTF8"), ("lower-case", b"iso_ir 100"),
                           ("stand-alone-with-extension", b"ISO_IR 192\\ISO 2022 IR 87"),
                           ("empty-first-value-then-latin1", b"\\ISO 2022 IR 100"),
                           ("over-long", b"ISO_IR 100" * 3), ("empty", b"")):
        yield attribute_case(f"specificcharacterset-{label}",
                             raw={"SpecificCharacterSet": charset, "PatientName": _LATIN1_NAME})
    yield attribute_case("specificcharacterset-absent", absent=("SpecificCharacterSet",))
    yield attribute_case("specificcharacterset-utf8-name", raw={"PatientName": _UTF8_NAME},
                         values={"SpecificCharacterSet": "ISO_IR 192"})
    yield attribute_case("specificcharacterset-gb18030-name",
                         raw={"PatientName": "王^小明".encode("gb18030")},
                         values={"SpecificCharacterSet": "GB18030"})


def _sweep_time_zones() -> Iterator[HostileCase]:
    yield attribute_case("timezone-source-offset", values={"TimezoneOffsetFromUTC": "-0500"},
                         utc_offset="-0500")
    yield attribute_case("timezone-summer-study", values={
        "StudyDate": "20260715", "SeriesDate": "20260715", "AcquisitionDate": "20260715",
        "AcquisitionDateTime": "20260715101510"}, utc_offset=SUMMER)
    for label, value in (("out-of-range", b"+2500"), ("no-sign", b"0100"),
                         ("colon", b"+01:00"), ("empty", b"")):
        yield _ok(f"timezone-offset-{label}", "TimezoneOffsetFromUTC", value)
    yield attribute_case("timezone-offset-multi-valued",
                         raw={"TimezoneOffsetFromUTC": b"-0300\\+0100 "}, utc_offset="-0300")
    # Nothing says when the study was made: the site's offset when the result is made.
    yield attribute_case("timezone-no-study-date", absent=(
        "StudyDate", "SeriesDate", "AcquisitionDate", "AcquisitionDateTime"),
        utc_offset=site_offset_now())
    yield attribute_case("timezone-placeholder-dates", values={
        "StudyDate": "19000101", "SeriesDate": "19000101", "AcquisitionDate": "19000101",
        "AcquisitionDateTime": "19000101000000"}, utc_offset=site_offset_now())
    yield attribute_case("timezone-placeholder-study-date-real-series-date",
                         values={"StudyDate": "19000101"})


def _sweep_read() -> Iterator[HostileCase]:
    """Attributes that model selection, calibration, priority and (later) vigilance read."""
    for keyword, long in (("BodyPartExamined", b"HEAD" * 10), ("ImageType", _LONG_LO),
                          ("SeriesDescription", _LONG_LO), ("SliceThickness", b"5." + b"0" * 20),
                          ("PixelSpacing", b"0.4785160000000001\\0.478516"),
                          ("WindowCenter", b"40.00000000000000001"),
                          ("WindowWidth", b"80.00000000000000001"), ("KVP", b"120." + b"0" * 20),
                          ("ConvolutionKernel", b"K" * 30),
                          ("RequestedProcedurePriority", b"STAT" * 5)):
        stem = keyword.lower()
        yield attribute_case(f"{stem}-absent", absent=(keyword,))
        yield _ok(f"{stem}-empty", keyword, b"")
        yield _ok(f"{stem}-over-long", keyword, long)
        yield _ok(f"{stem}-not-a-number-or-code", keyword, b"a,b?\\c;d ")
    yield _ok("institutionaldepartmentname-emergency", "InstitutionalDepartmentName",
              b"EMERGENCY ROOM\\RADIOLOGY")
    yield _ok("bodypartexamined-lower-case", "BodyPartExamined", b"head")
    yield _ok("imagetype-many-values", "ImageType", b"ORIGINAL\\PRIMARY\\AXIAL\\HELIX\\X\\Y")
    for keyword, value in (("PixelSpacing", b"0\\0"), ("PixelSpacing", b"0.5 "),
                           ("PixelSpacing", b"-0.5\\-0.5"), ("SliceThickness", b"0 "),
                           ("SliceThickness", b"5\\5 "), ("WindowCenter", b"40\\400 "),
                           ("WindowWidth", b"80\\2000"), ("KVP", b"120\\140 "),
                           ("ConvolutionKernel", b"STANDARD\\FC21"),
                           ("RequestedProcedurePriority", b"stat"),
                           ("RequestedProcedurePriority", b"STAT\\HIGH "),
                           ("InstanceNumber", b"abc "), ("SeriesNumber", b"1.5 "),
                           ("Modality", b"ct")):
        label = value.decode("latin-1").strip().replace("\\", "-").replace(" ", "")
        yield _ok(f"{keyword.lower()}-{label}", keyword, value)
    # Where the emergency department shows (the clinical priority floor reads these).
    for keyword in ("RequestingService", "CurrentPatientLocation"):
        stem = keyword.lower()
        yield _ok(f"{stem}-over-long", keyword, b"EMERGENCY DEPARTMENT " * 4)
        yield _ok(f"{stem}-multi-valued", keyword, b"EMERGENCY\\ICU ")
        yield _ok(f"{stem}-control-characters", keyword, b"ED\x00\x07")
    # Request attributes and other patient, study and series attributes the objects do not
    # copy: whatever they hold never reaches the SR.
    yield attribute_case("requestattributes-over-long-values", values={
        "RequestAttributesSequence": [_item(RequestedProcedureID="R" * 40,
                                            ScheduledProcedureStepID="S" * 40,
                                            RequestedProcedureDescription="D" * 90)]})
    yield attribute_case("requestattributes-empty-item",
                         values={"RequestAttributesSequence": [_item()]})
    for keyword, value in (("OtherPatientIDs", b"O" * 80 + b"\\X"),
                           ("PatientComments", b"NOTE\x00\x01" * 3),
                           ("SeriesDate", b"2026-01-15"), ("SeriesTime", b"25:00"),
                           ("ProtocolName", b"P" * 80), ("OperatorsName", b"A^B\\C^D\x07")):
        yield _ok(f"{keyword.lower()}-invalid", keyword, value)
    yield attribute_case("seriesdate-fallback-for-the-offset", values={
        "SeriesDate": "20260715", "AcquisitionDate": "20260715"},
        absent=("StudyDate",), utc_offset=SUMMER)
    # Calibration: never analysed on guessed Hounsfield units.
    yield attribute_case("rescale-both-absent", absent=("RescaleSlope", "RescaleIntercept"),
                         status=SKIPPED, reason="Rescale Slope and Rescale Intercept are missing")
    yield attribute_case("rescaleslope-absent", absent=("RescaleSlope",), status=SKIPPED,
                         reason="Rescale Slope is missing")
    yield attribute_case("rescaleintercept-absent", absent=("RescaleIntercept",),
                         status=SKIPPED, reason="Rescale Intercept is missing")
    yield attribute_case("rescaleslope-empty", raw={"RescaleSlope": b""}, status=SKIPPED,
                         reason="Rescale Slope is empty")
    yield attribute_case("rescaleintercept-empty", raw={"RescaleIntercept": b""},
                         status=SKIPPED, reason="Rescale Intercept is empty")
    yield attribute_case("rescaleslope-multi-valued", raw={"RescaleSlope": b"1\\2 "},
                         status=SKIPPED, reason="Rescale Slope has 2 values")
    yield attribute_case("rescaleintercept-comma", raw={"RescaleIntercept": b"-1024,0 "},
                         status=SKIPPED, reason="Rescale Intercept is not a number")
    yield _ok("rescaleintercept-over-long", "RescaleIntercept", b"-1024.00000000000001")
    # Geometry and plane, as selection reads them.
    yield attribute_case("imageorientation-five-values",
                         raw={"ImageOrientationPatient": b"1\\0\\0\\0\\1 "}, status=SKIPPED,
                         reason="needs axial images")
    yield attribute_case("modality-absent", absent=("Modality",), status=SKIPPED,
                         reason="modality unknown")


def attribute_cases() -> list[HostileCase]:
    """Every case of the sweep, in a fixed order, with unique names."""
    cases = [*_sweep_copied(), *_sweep_identifiers(), *_sweep_character_sets(),
             *_sweep_time_zones(), *_sweep_read()]
    names = [c.name for c in cases]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    assert not duplicated, f"case names must be unique: {duplicated}"
    return cases


def write_corpus(directory: Path) -> None:
    """Every case as a folder of DICOM files, and ``expected.json``."""
    expected = {}
    for case in attribute_cases():
        folder = directory / case.name
        folder.mkdir(parents=True, exist_ok=True)
        for index, data in enumerate(case.files):
            (folder / f"{index:04d}.dcm").write_bytes(data)
        outcome = asdict(case)
        del outcome["files"]
        expected[case.name] = {"study_instance_uid": case.study_instance_uid, **outcome}
    (directory / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m tests.hostile_attributes OUTPUT_DIR")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_corpus(Path(sys.argv[1]))
