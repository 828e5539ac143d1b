"""What the service's objects copy from a source: identifiers exactly, everything else valid
for its VR, one character set and one UTC offset (triage/copying/)."""

from __future__ import annotations

import datetime as dt
import io
from zoneinfo import ZoneInfo

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

from tests.test_report import result_for
from tests.validators import dciodvfy_errors
from triage.copying import values
from triage.copying.header import raw_bytes, source_header
from triage.report import build_report

PARIS = ZoneInfo("Europe/Paris")
UTF8 = values.encodings(["ISO_IR 192"])


def ct(**raw: bytes) -> pydicom.Dataset:
    """CT_small's header with elements set to exactly these bytes, as read from a file."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"), stop_before_pixels=True)
    del ds.TimezoneOffsetFromUTC
    if "SpecificCharacterSet" in raw:  # first: pydicom re-encodes values when it changes
        ds.SpecificCharacterSet = raw.pop("SpecificCharacterSet").decode().split("\\")
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    ds = pydicom.dcmread(io.BytesIO(buffer.getvalue()))
    for keyword, value in raw.items():
        tag = Tag(keyword)
        value += b" " * (len(value) % 2)
        ds[tag] = RawDataElement(tag, dictionary_VR(tag), len(value), value, 0, False, True)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)  # raw values are written as they are
    return pydicom.dcmread(io.BytesIO(buffer.getvalue()))


@pytest.mark.parametrize(("text", "limit", "expected"), [
    ("é" * 40, 64, "é" * 32),  # two bytes each in UTF-8: cut at 64 bytes, not characters
    ("a" * 63 + "é", 64, "a" * 63),  # never half a character
    ("short", 64, "short"),
])
def test_fit_counts_encoded_bytes(text: str, limit: int, expected: str) -> None:
    assert values.fit(text, limit, UTF8) == expected


def test_strings_lose_what_their_vr_forbids() -> None:
    assert values.string("  CT\x00 HEAD\x07 ", "LO") == "CT HEAD"
    assert values.string("CT HEAD\\WITH CONTRAST", "LO") == "CT HEAD"  # the first value
    assert values.string("line one\r\nline two\\x", "ST") == "line one\r\nline two x"
    assert values.string("CAFÉ", "SH") == "CAF"  # not in the default repertoire
    assert values.string("CAFÉ", "SH", UTF8) == "CAFÉ"
    assert values.string("\x01\x02", "LO") is None
    assert values.strings(["V1", "", "X" * 70], "LO") == ["V1", "X" * 64]


def test_person_names_keep_their_structure_within_limits() -> None:
    assert values.person_name("DOE^JOHN\\ROE^JANE") == "DOE^JOHN"
    assert values.person_name("A^B^C^D^E^F^G") == "A^B^C^D^E"
    assert values.person_name("A=B=C=D") == "A=B=C"
    assert values.person_name("DOE\x1b^JOHN^^") == "DOE^JOHN"
    assert values.person_name("X" * 80 + "^JOHN") == "X" * 64
    assert values.person_name("") is None


@pytest.mark.parametrize(("function", "value", "expected"), [
    (values.date, "20260115", "20260115"), (values.date, "2026-01-15", None),
    (values.date, "20260230", None), (values.date, "20260115\\20260116", "20260115"),
    (values.time, "101500.123456", "101500.123456"), (values.time, "10:15", None),
    (values.time, "1015", "1015"), (values.time, "246000", None),
    (values.date_time, "20260115101510+0100", "20260115101510+0100"),
    (values.date_time, "20260115101510+9900", None), (values.date_time, "2026-01", None),
    (values.age, "056Y", "056Y"), (values.age, "56Y", None), (values.age, "056y", "056Y"),
    (values.decimal, "1.70", "1.70"), (values.decimal, "1,70", None),
    (values.decimal, "NaN", None), (values.decimal, "1.7000000000000000001", "1.7"),
    (values.decimal, "7_0", None), (values.decimal, "\uff17\uff10", None),
    (values.decimal, "-.5e3", "-.5e3"),
])
def test_dates_times_ages_and_numbers_are_valid_or_dropped(function, value, expected) -> None:
    assert function(value) == expected


def test_code_strings() -> None:
    assert values.code_string(" f ", ("M", "F", "O")) == "F"
    assert values.code_string("FEMALE", ("M", "F", "O")) is None
    assert values.code_string("head-neck") == "HEADNECK"


@pytest.mark.parametrize(("declared", "expected"), [
    ("ISO_IR 100", ["ISO_IR 100"]), (["", "ISO 2022 IR 87"], ["", "ISO 2022 IR 87"]),
    ("ISO-IR 100", None), ("UTF8", None), (["ISO_IR 192", "ISO 2022 IR 87"], None),
    (["ISO_IR 100", "ISO 2022 IR 87"], None), ("", None), (None, None),
])
def test_character_sets_dicom_defines_are_recognised(declared, expected) -> None:
    assert values.character_set(declared) == expected


def test_identifiers_keep_their_bytes_even_when_invalid() -> None:
    long_id = b"7" * 80
    source = ct(PatientID=long_id, AccessionNumber=b"A\\B ")
    header = source_header(source, site_zone=PARIS)
    assert header.identifiers["PatientID"] == long_id
    assert header.identifiers["AccessionNumber"] == b"A\\B "
    sr = build_report(evidence=[source], results=[result_for([source])], inputs_fingerprint="f")
    buffer = io.BytesIO()
    sr.save_as(buffer, enforce_file_format=True)
    written = pydicom.dcmread(io.BytesIO(buffer.getvalue()))
    assert raw_bytes(written, "PatientID") == long_id
    assert raw_bytes(written, "AccessionNumber") == b"A\\B "


def test_an_absent_patient_id_is_written_empty(tmp_path) -> None:
    source = ct()
    for keyword in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex",
                    "AccessionNumber", "StudyID", "ReferringPhysicianName"):
        if keyword in source:
            delattr(source, keyword)
    sr = build_report(evidence=[source], results=[result_for([source])], inputs_fingerprint="f")
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    written = pydicom.dcmread(path)
    assert written.PatientID == "" and written.AccessionNumber == "" and written.StudyID == ""
    assert dciodvfy_errors(path) == []


def test_character_set_is_the_sources_when_it_holds_every_text() -> None:
    latin = ct(PatientName=b"M\xfcLLER^J")  # CT_small says ISO_IR 100
    assert source_header(latin, site_zone=PARIS).character_set == ["ISO_IR 100"]
    # A model name the source's character set cannot write: UTF-8.
    header = source_header(latin, site_zone=PARIS, own_texts=["脳出血"])
    assert header.character_set == ["ISO_IR 192"]
    # An unknown character set: UTF-8, or none when everything is ASCII.
    assert source_header(ct(SpecificCharacterSet=b"LATIN1", PatientName=b"M\xfcLLER"),
                         site_zone=PARIS).character_set == ["ISO_IR 192"]
    assert source_header(ct(SpecificCharacterSet=b"LATIN1"),
                         site_zone=PARIS).character_set is None


def test_non_ascii_identifiers_keep_the_sources_character_set() -> None:
    source = ct(PatientID=b"M\xfcLLER1")
    header = source_header(source, site_zone=PARIS, own_texts=["脳出血"])
    assert header.character_set == ["ISO_IR 100"]  # the ID's bytes keep their meaning


def test_bad_bytes_lose_their_invalid_characters() -> None:
    source = ct(SpecificCharacterSet=b"ISO_IR 192", StudyDescription=b"CAF\xe9 HEAD",
                PatientName=b"DOE\x07^JOHN")
    header = source_header(source, site_zone=PARIS)
    assert header.dataset.StudyDescription == "CAF HEAD"
    assert str(header.dataset.PatientName) == "DOE^JOHN"


@pytest.mark.parametrize(("study_date", "study_time", "offset"), [
    ("20260115", "101500", "+0100"),  # winter
    ("20260715", "101500", "+0200"),  # summer
    ("20261025", "023000", "+0200"),  # the autumn hour that happens twice: its first pass
])
def test_offset_is_the_site_zones_at_the_time_of_the_study(
        study_date: str, study_time: str, offset: str) -> None:
    source = ct(StudyDate=study_date.encode(), StudyTime=study_time.encode())
    header = source_header(source, site_zone=PARIS)
    assert values.offset_text(header.offset, dt.datetime.now(dt.UTC)) == offset


def test_a_winter_study_analysed_in_summer_keeps_its_offset(tmp_path) -> None:
    source = ct(StudyDate=b"20260115", StudyTime=b"101500")
    created = dt.datetime(2026, 7, 1, 12, 0, tzinfo=dt.UTC)
    sr = build_report(evidence=[source], results=[result_for([source])], inputs_fingerprint="f",
                      content_datetime=created, site_zone=PARIS)
    assert sr.TimezoneOffsetFromUTC == "+0100"
    # 12:00 UTC is 13:00 at +0100 (14:00 in Paris that day, at +0200).
    assert (str(sr.ContentDate), str(sr.ContentTime)[:6]) == ("20260701", "130000")
    assert (str(sr.InstanceCreationDate), str(sr.InstanceCreationTime)[:6]) == (
        "20260701", "130000")
    assert (str(sr.StudyDate), str(sr.StudyTime)) == ("20260115", "101500")


def test_the_sources_own_offset_is_copied() -> None:
    source = ct(TimezoneOffsetFromUTC=b"-0500")
    created = dt.datetime(2026, 7, 1, 12, 0, tzinfo=dt.UTC)
    sr = build_report(evidence=[source], results=[result_for([source])], inputs_fingerprint="f",
                      content_datetime=created, site_zone=PARIS)
    assert sr.TimezoneOffsetFromUTC == "-0500"
    assert str(sr.ContentTime).startswith("070000")


def test_an_identifier_invalid_in_its_character_set_keeps_its_bytes() -> None:
    """Latin-1 bytes in a Patient ID declared UTF-8: Orthanc files the SR with the images only
    if the SR has the very same bytes under the same character set."""
    source = ct(SpecificCharacterSet=b"ISO_IR 192", PatientID=b"M\xfcL1")
    sr = build_report(evidence=[source], results=[result_for([source])], inputs_fingerprint="f")
    buffer = io.BytesIO()
    sr.save_as(buffer, enforce_file_format=True)
    written = pydicom.dcmread(io.BytesIO(buffer.getvalue()))
    assert raw_bytes(written, "PatientID") == b"M\xfcL1"
    assert written.SpecificCharacterSet == "ISO_IR 192"


def test_iso_ir_13_holds_half_width_katakana_only() -> None:
    """pydicom writes ISO_IR 13 as JIS X 0201; kanji would become "?"."""
    encodings = values.encodings(["ISO_IR 13"])
    assert values.string("ﾔﾏﾀﾞ山田", "LO", encodings) == "ﾔﾏﾀﾞ"


def test_deidentification_method_codes_are_kept() -> None:
    source = ct()
    source.PatientIdentityRemoved = "YES"
    code = pydicom.Dataset()
    code.CodeValue, code.CodingSchemeDesignator = "113100", "DCM"
    code.CodeMeaning = "Basic Application Confidentiality Profile"
    source.DeidentificationMethodCodeSequence = [code]
    sr = build_report(evidence=[source], results=[result_for([source])], inputs_fingerprint="f")
    assert sr.PatientIdentityRemoved == "YES"
    assert sr.DeidentificationMethodCodeSequence[0].CodeValue == "113100"


def test_a_placeholder_study_date_gives_no_historical_offset() -> None:
    created = dt.datetime(2026, 7, 1, 12, 0, tzinfo=dt.UTC)
    placeholder = ct(StudyDate=b"19000101", SeriesDate=b"19000101", AcquisitionDate=b"")
    header = source_header(placeholder, site_zone=PARIS, created=created)
    assert header.offset == dt.timezone(dt.timedelta(hours=2))  # Paris on 1 July, not +0009
    real_series = ct(StudyDate=b"19000101", SeriesDate=b"20260115")
    header = source_header(real_series, site_zone=PARIS, created=created)
    assert header.offset == dt.timezone(dt.timedelta(hours=1))


def test_identifiers_written_as_un_keep_that_vr() -> None:
    """pydicom's explicit_VR-UN.dcm: a gateway wrote every attribute with the VR UN."""
    source = pydicom.dcmread(get_testdata_file("explicit_VR-UN.dcm"))
    assert source.get_item("PatientID").VR == source.get_item("StudyInstanceUID").VR == "UN"
    sr = build_report(evidence=[source], results=[result_for([source])], inputs_fingerprint="f")
    buffer = io.BytesIO()
    sr.save_as(buffer, enforce_file_format=True)
    written = pydicom.dcmread(io.BytesIO(buffer.getvalue()))
    assert written.get_item("PatientID").VR == "UN"
    assert written.get_item("PatientID").value == b"PANCREAS_0001 "
    assert written.get_item("StudyInstanceUID").VR == "UI"
    assert written.StudyInstanceUID == source.StudyInstanceUID
