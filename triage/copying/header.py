"""What the service's own objects (the SR, the key image) copy from a source instance.

DESIGN.md, "Never write an invalid object", and the rule of issue 12:

- **Identifiers are copied exactly**, byte for byte: Patient ID, Issuer of Patient ID,
  Accession Number and the UIDs. They tie a result to its patient, study and order (Orthanc
  files an instance under a hash of Patient ID and Study Instance UID; a PACS or RIS matches
  on them), so even an identifier that is invalid for its VR is kept as it is.
- **Everything else** is made valid for its VR (``triage.copying.values``): cut to its length,
  invalid characters removed, an invalid date, time, age or number dropped. Type 2 attributes
  that are absent or dropped are written empty.
- **Character set:** the source's Specific Character Set when DICOM defines it and every text
  the object carries can be written in it (so identifiers keep their bytes and meaning);
  otherwise UTF-8 (``ISO_IR 192``), or none when every text is ASCII.
- **Time zone:** Timezone Offset From UTC applies to every date and time of an instance,
  the copied Study Date and Time included. The source's own offset is copied when it has a
  valid one; otherwise the offset of the site's time zone at the time of the study (so a
  study made in winter and analysed in summer keeps its winter offset), and the service's
  own dates and times are written at that same offset.

The source stays untouched in Orthanc; only the copies are cleaned.
"""

from __future__ import annotations

import datetime as dt
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pydicom.charset import convert_encodings, decode_bytes, encode_string
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import Tag
from pydicom.valuerep import DA, DT, TM

from triage.copying import values

# Copied byte for byte (see the module docstring). Orthanc files an instance under a hash of
# the first and the last; the SR's own Series and SOP Instance UIDs are its own.
IDENTIFIERS = ("PatientID", "IssuerOfPatientID", "AccessionNumber", "StudyInstanceUID")
_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
# Patient, General Study and Patient Study attributes the objects carry, with how each is
# made valid. Type 2 ones are written empty when nothing valid is left.
_TYPE_2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
           "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber")
_PERSON_NAMES = ("PatientName", "ReferringPhysicianName")
_STRINGS = ("StudyID", "StudyDescription", "Manufacturer", "ManufacturerModelName",
            "DeviceSerialNumber", "InstitutionName", "InstitutionalDepartmentName",
            "InstitutionAddress", "StationName")
_MULTI_STRINGS = ("SoftwareVersions", "DeidentificationMethod")
_DATES = ("PatientBirthDate", "StudyDate", "AcquisitionDate")
_TIMES = ("StudyTime", "AcquisitionTime")
_DECIMALS = ("PatientSize", "PatientWeight")
_SEXES = ("M", "F", "O")
_ACQUISITION_EQUIPMENT = "109101"  # DCM, Purpose of Reference (CID 7005)
# Dates before this are taken for placeholders when choosing the UTC offset.
EARLIEST_STUDY = dt.datetime(1970, 1, 1)
_DAY = dt.timedelta(days=1)


@dataclass(frozen=True)
class SourceHeader:
    """The copyable part of a source instance, valid for every VR, with the character set and
    the UTC offset the service's object must declare.

    ``dataset`` is what highdicom is given as the source; ``finish`` then puts the
    identifiers' original bytes, the character set and the offset into the built object.
    """

    dataset: Dataset
    identifiers: dict[str, bytes]
    character_set: list[str] | None
    offset: dt.timezone
    created: dt.datetime  # when the service's object is made (aware)
    # The VR an identifier is written with when the source did not use its own (below).
    identifier_vrs: dict[str, str] = field(default_factory=dict)

    @property
    def encodings(self) -> tuple[str, ...]:
        return values.encodings(self.character_set)

    @property
    def when(self) -> dt.datetime:
        """``created`` as the naive date and time written at this header's offset."""
        return self.created.astimezone(self.offset).replace(tzinfo=None)

    def text(self, value: str, vr: str = "LO") -> str:
        """One of the service's own texts (a model name, a description) made valid in this
        header's character set."""
        return values.string(value, vr, self.encodings) or ""

    def pin_times(self, target: Dataset) -> None:
        """Replace the wall-clock stamps highdicom adds with ``when``, so that a retry
        reproduces the object and every time has one offset.

        The acquisition equipment item keeps the source's acquisition time."""
        when = self.when
        target.InstanceCreationDate = DA(when.date())
        target.InstanceCreationTime = TM(when.time())
        for item in target.get("ContributingEquipmentSequence", []):
            purposes = item.get("PurposeOfReferenceCodeSequence") or []
            acquisition = any(p.get("CodeValue") == _ACQUISITION_EQUIPMENT for p in purposes)
            if "ContributionDateTime" in item and not acquisition:
                item.ContributionDateTime = DT(when)

    def finish(self, target: Dataset) -> None:
        """Write the identifiers' original bytes, the character set and the UTC offset into
        ``target``, an object built from ``dataset``."""
        for keyword, raw in self.identifiers.items():
            tag = Tag(keyword)
            if raw or keyword in _TYPE_2:
                element = DataElement(tag, dictionary_VR(tag), raw)
                if keyword in self.identifier_vrs:
                    # Set after construction: pydicom turns UN into the dictionary's VR.
                    element.VR = self.identifier_vrs[keyword]
                    element.value = raw
                target[tag] = element
            elif keyword in target:
                del target[tag]
        if self.character_set is None:
            if "SpecificCharacterSet" in target:
                del target.SpecificCharacterSet
        else:
            target.SpecificCharacterSet = (self.character_set[0] if len(self.character_set) == 1
                                           else self.character_set)
        target.TimezoneOffsetFromUTC = values.offset_text(self.offset, self.created)


def source_header(source: Dataset, *, site_zone: dt.tzinfo, own_texts: Iterable[str] = (),
                  created: dt.datetime | None = None) -> SourceHeader:
    """The header to copy from ``source``; ``own_texts`` are the texts the service adds to
    the object (model names, code meanings), which the character set must also hold;
    ``created`` (default now; naive means UTC) is when the object is made, whose offset in the
    site zone applies when the source tells nothing usable of when the study was made."""
    if created is None:
        created = dt.datetime.now(dt.UTC)
    elif created.tzinfo is None:
        created = created.replace(tzinfo=dt.UTC)
    identifiers = {keyword: raw_bytes(source, keyword) or b"" for keyword in IDENTIFIERS}
    # A gateway that did not know an attribute's VR writes it as UN. Orthanc (like other
    # readers) then keeps its padding as part of the value, so only the same VR makes the
    # result's identifier read the same. (It needs an explicit VR transfer syntax.)
    # (A UID's padding is insignificant to every reader: the UID keeps its VR.)
    identifier_vrs = {keyword: "UN" for keyword in IDENTIFIERS
                      if keyword in source and keyword != "StudyInstanceUID"
                      and source.get_item(keyword).VR == "UN"}
    declared = values.character_set(source.get("SpecificCharacterSet"))
    texts = _decoded_texts(source)
    own = list(own_texts)
    charset = _character_set(declared, [*texts, *own], identifiers)
    encodings = values.encodings(charset)
    dataset = Dataset()
    if charset is not None:
        dataset.SpecificCharacterSet = charset[0] if len(charset) == 1 else charset
    for keyword in _UIDS:
        if keyword in source:
            setattr(dataset, keyword, str(source.get(keyword, "")).strip(" \0"))
    dataset.Modality = values.code_string(source.get("Modality")) or ""
    for keyword in IDENTIFIERS:
        if identifiers[keyword] or keyword in _TYPE_2:
            # highdicom reads these as text; ``finish`` restores the exact bytes.
            setattr(dataset, keyword, _as_text(identifiers[keyword], encodings))
    _copy_cleaned(source, dataset, encodings)
    return SourceHeader(dataset=dataset, identifiers=identifiers, character_set=charset,
                        identifier_vrs=identifier_vrs, created=created,
                        offset=_offset(source, site_zone, created))


def raw_bytes(ds: Dataset, keyword: str) -> bytes | None:
    """The value of ``keyword`` in ``ds`` as stored in the file, ``None`` when absent.

    Reading it does not decode the element. An element that something else already decoded
    (read as text) is encoded again in the dataset's character set, which gives back the
    stored bytes of any valid value but not of bytes that were invalid in that character
    set: read identifiers with this function or ``identifier_text`` only.
    """
    tag = tag_for_keyword(keyword)
    if tag is None or tag not in ds:
        return None
    value = ds.get_item(tag).value
    if value is None:
        return b""
    if isinstance(value, bytes):
        return value
    text = "\\".join(str(v) for v in value) if isinstance(value, MultiValue) else str(value)
    if text.isascii():
        return text.encode("ascii")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return encode_string(text, convert_encodings(ds.get("SpecificCharacterSet")))


def identifier_text(ds: Dataset, keyword: str) -> str:
    """An identifier as text, as Orthanc compares it (instances of one study may write the
    same Patient ID in different character sets), without decoding the element in ``ds``,
    which would lose the bytes that ``raw_bytes`` must copy. Empty when absent."""
    raw = (raw_bytes(ds, keyword) or b"").rstrip(b" \0")
    if raw.isascii():
        return raw.decode("ascii")
    with warnings.catch_warnings():  # undecodable bytes: replaced, the same way each time
        warnings.simplefilter("ignore")
        encodings = convert_encodings(_read(ds, "SpecificCharacterSet"))
        return decode_bytes(raw, encodings, set())


def _copy_cleaned(source: Dataset, target: Dataset, encodings: tuple[str, ...]) -> None:
    """Every copied attribute but the identifiers and UIDs, each made valid for its VR."""
    cleaned: dict[str, Any] = {}
    for keyword in _PERSON_NAMES:
        cleaned[keyword] = values.person_name(_read(source, keyword), encodings)
    for keyword in _STRINGS:
        vr = "SH" if keyword in ("StudyID", "StationName") else (
            "ST" if keyword == "InstitutionAddress" else "LO")
        cleaned[keyword] = values.string(_read(source, keyword), vr, encodings)
    for keyword in _MULTI_STRINGS:
        cleaned[keyword] = values.strings(_read(source, keyword), "LO", encodings) or None
    for keyword in _DATES:
        cleaned[keyword] = values.date(_read(source, keyword))
    for keyword in _TIMES:
        cleaned[keyword] = values.time(_read(source, keyword))
    for keyword in _DECIMALS:
        cleaned[keyword] = values.decimal(_read(source, keyword))
    cleaned["AcquisitionDateTime"] = values.date_time(_read(source, "AcquisitionDateTime"))
    cleaned["PatientAge"] = values.age(_read(source, "PatientAge"))
    cleaned["PatientSex"] = values.code_string(_read(source, "PatientSex"), _SEXES)
    cleaned["PatientIdentityRemoved"] = values.code_string(
        _read(source, "PatientIdentityRemoved"), ("YES", "NO"))
    for keyword, value in cleaned.items():
        if value is not None:
            setattr(target, keyword, value)
        elif keyword in _TYPE_2:
            setattr(target, keyword, "")
    codes = _codes(_read(source, "DeidentificationMethodCodeSequence"), encodings)
    if codes:
        target.DeidentificationMethodCodeSequence = codes


def _codes(items: Any, encodings: tuple[str, ...]) -> list[Dataset]:
    """Code Sequence items (PS3.3 8.8) made valid; an item without a usable code value,
    scheme or meaning is left out."""
    found = []
    for item in items or []:
        code = Dataset()
        for keyword, vr in (("CodeValue", "SH"), ("CodingSchemeDesignator", "SH"),
                            ("CodeMeaning", "LO")):
            value = values.string(_read(item, keyword), vr, encodings)
            if value is None:
                break
            setattr(code, keyword, value)
        else:
            found.append(code)
    return found


def _read(source: Dataset, keyword: str) -> Any:
    """The decoded value of ``keyword``; ``None`` when absent or when its bytes do not parse
    as its VR (pydicom warns; the value is dropped like any other invalid one)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return source.get(keyword)
    except Exception:  # noqa: BLE001 - pydicom raises several types for unparsable values
        return None


def _decoded_texts(source: Dataset) -> list[str]:
    texts = []
    for keyword in (*_PERSON_NAMES, *_STRINGS, *_MULTI_STRINGS):
        texts += values.values(_read(source, keyword))
    return texts


def _character_set(declared: list[str] | None, texts: list[str],
                   identifiers: dict[str, bytes]) -> list[str] | None:
    """The source's character set when it is valid and holds every text, else UTF-8, or no
    character set when everything is ASCII.

    Identifiers that are not ASCII keep their meaning only where they are read as the source
    is read: in the source's own character set, or, when the source declares none that DICOM
    defines, with none declared (readers then apply the same default to both; the other
    texts are then kept to ASCII)."""
    cleaned = [values.without_controls(t, "ST") for t in texts]
    identifiers_ascii = all(raw.isascii() for raw in identifiers.values())
    if declared is not None:
        encodings = values.encodings(declared)
        if not identifiers_ascii or all(values.encodable(t, encodings) == t for t in cleaned):
            return declared
    if not identifiers_ascii or all(t.isascii() for t in cleaned):
        return None
    return ["ISO_IR 192"]


def _as_text(raw: bytes, encodings: tuple[str, ...]) -> str:
    """An identifier's bytes as text for highdicom (replaced by the bytes afterwards)."""
    text = raw.decode(encodings[0] if len(encodings) == 1 else "latin-1", errors="replace")
    return text.rstrip(" \0")


def _offset(source: Dataset, site_zone: dt.tzinfo, created: dt.datetime) -> dt.timezone:
    """The source's Timezone Offset From UTC, else the site zone's offset at the study, else
    (no plausible study date) at ``created`` (aware); in whole minutes, as DICOM writes it."""
    declared = values.utc_offset(_read(source, "TimezoneOffsetFromUTC"))
    if declared is not None:
        return declared
    study = _study_moment(source, created.astimezone(site_zone).replace(tzinfo=None))
    if study is None:
        # No date, or only a modality clock's placeholder (19000101): zones then had offsets
        # in seconds (local mean time) that say nothing of this study.
        offset = created.astimezone(site_zone).utcoffset()
    else:
        # A wall-clock time the site zone passes twice (autumn) is taken at its first pass.
        offset = site_zone.utcoffset(study.replace(fold=0))
    minutes = round((offset or dt.timedelta(0)).total_seconds() / 60)
    return dt.timezone(dt.timedelta(minutes=minutes))


def _study_moment(source: Dataset, latest: dt.datetime) -> dt.datetime | None:
    """When the study was made, in the site's wall-clock time: the first plausible one of
    Study, Series and Acquisition Date (with its time), from 1970 to a day after ``latest``."""
    for date_keyword, time_keyword in (("StudyDate", "StudyTime"), ("SeriesDate", "SeriesTime"),
                                       ("AcquisitionDate", "AcquisitionTime")):
        date = values.date(_read(source, date_keyword))
        if date is None:
            continue
        time = values.time(_read(source, time_keyword)) or "000000"
        hours, minutes, seconds = int(time[:2]), int(time[2:4] or 0), int(time[4:6] or 0)
        moment = dt.datetime(int(date[:4]), int(date[4:6]), int(date[6:]), hours, minutes,
                             min(seconds, 59))
        if EARLIEST_STUDY <= moment <= latest + _DAY:
            return moment
    return None
