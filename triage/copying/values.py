"""Values made valid for their Value Representation (PS3.5 6.2) before the service writes them.

What a modality sends is not always valid DICOM: over-long descriptions, impossible dates,
lower-case code strings, control characters, several values where one is expected. The
service never rejects a study for such values, and never repeats them in its own objects: each
function here returns the value as the VR allows it, or ``None`` when nothing valid is left
(the caller then leaves a Type 3 attribute out and writes a Type 2 one empty).

Lengths are counted in bytes of the encoded value, as the validators count them (a UTF-8
"é" takes two of a Long String's 64).
"""

from __future__ import annotations

import datetime as dt
import math
import re
import warnings
from collections.abc import Sequence
from typing import Any

from pydicom.charset import encode_string, python_encoding
from pydicom.multival import MultiValue
from pydicom.valuerep import format_number_as_ds

# Maximum lengths in bytes (PS3.5 Table 6.2-1); PN per component group.
MAX_BYTES = {"AE": 16, "AS": 4, "CS": 16, "DA": 8, "DS": 16, "DT": 26, "IS": 12, "LO": 64,
             "LT": 10240, "PN": 64, "SH": 16, "ST": 1024, "TM": 14}
# Text VRs that allow these control characters (besides ESC, which only encoded bytes hold).
_TEXT_CONTROLS = {"ST": "\r\n\f\t", "LT": "\r\n\f\t", "UT": "\r\n\f\t"}
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\ufffd]")
_CS_INVALID = re.compile(r"[^A-Z0-9 _]")
_AS = re.compile(r"^\d{3}[DWMY]$")
_TM = re.compile(r"^(\d{2})(\d{2})?(\d{2})?(\.\d{1,6})?$")
_DT = re.compile(r"^(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\.\d{1,6})?([+-]\d{4})?$")
_OFFSET = re.compile(r"^([+-])(\d{2})(\d{2})$")
_DS = re.compile(r"^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$")
# Python encodings of the default repertoire alone (no Specific Character Set).
DEFAULT_REPERTOIRE: tuple[str, ...] = ()
# Specific Character Set defined terms (PS3.3 C.12.1.1.2) that pydicom can write.
_SINGLE_BYTE_TERMS = {"ISO_IR 100", "ISO_IR 101", "ISO_IR 109", "ISO_IR 110", "ISO_IR 126",
                      "ISO_IR 127", "ISO_IR 138", "ISO_IR 144", "ISO_IR 148", "ISO_IR 13",
                      "ISO_IR 166"}
_STAND_ALONE_TERMS = {"ISO_IR 192", "GB18030", "GBK"}
_EXTENSION_TERMS = {term for term in python_encoding if term.startswith("ISO 2022 ")}
_DEFAULT_TERMS = {"", "ISO_IR 6", "ISO 2022 IR 6"}


def values(value: Any) -> list[str]:
    """Every value of an element as text (a backslash separates values); none for an absent
    or empty element."""
    if value is None:
        return []
    if isinstance(value, MultiValue | list | tuple):
        return [str(v) for v in value if v is not None and str(v) != ""]
    return [v for v in str(value).split("\\") if v != ""]


def first(value: Any) -> str:
    """The first value of an element: where one value is expected, a sender's extra values
    (``CT HEAD\\WITH CONTRAST``) are left out rather than merged into one."""
    found = values(value)
    return found[0] if found else ""


def without_controls(text: str, vr: str) -> str:
    """``text`` without the characters ``vr`` forbids: control characters (those text VRs
    allow excepted), the replacement character left by bytes that did not decode, and, in
    string VRs, the value delimiter backslash."""
    allowed = _TEXT_CONTROLS.get(vr, "")
    text = _CONTROL.sub(lambda m: m.group() if m.group() in allowed else "", text)
    if vr == "ST":  # allowed in ST, but highdicom refuses it there: kept as a word break
        return text.replace("\\", " ")
    if vr not in _TEXT_CONTROLS:
        text = text.replace("\\", "")
    return text


def encodable(text: str, encodings: Sequence[str]) -> str:
    """``text`` without the characters that ``encodings`` cannot represent."""
    if _encodes(text, encodings):
        return text
    return "".join(ch for ch in text if _encodes(ch, encodings))


def fit(text: str, limit: int, encodings: Sequence[str]) -> str:
    """The longest start of ``text`` whose encoding takes at most ``limit`` bytes, never
    cutting a character in two."""
    if _encoded_length(text, encodings) <= limit:
        return text
    low, high = 0, len(text)
    while low < high:  # the longest prefix that fits, by bisection
        middle = (low + high + 1) // 2
        if _encoded_length(text[:middle], encodings) <= limit:
            low = middle
        else:
            high = middle - 1
    return text[:low]


def string(value: Any, vr: str, encodings: Sequence[str] = DEFAULT_REPERTOIRE) -> str | None:
    """A single-valued SH, LO, ST or LT value made valid; ``None`` when nothing is left."""
    if vr in _TEXT_CONTROLS:  # one value, in which a backslash is text
        text = without_controls("" if value is None else str(value), vr).rstrip(" ")
    else:
        text = without_controls(first(value), vr).strip(" ")
    text = fit(encodable(text, encodings), MAX_BYTES[vr], encodings).rstrip(" ")
    return text or None


def strings(value: Any, vr: str, encodings: Sequence[str] = DEFAULT_REPERTOIRE) -> list[str]:
    """A multi-valued SH or LO element made valid: each value as ``string``, empties left out."""
    cleaned = (string(v, vr, encodings) for v in values(value))
    return [v for v in cleaned if v]


def person_name(value: Any, encodings: Sequence[str] = DEFAULT_REPERTOIRE) -> str | None:
    """A PN value made valid: the first name only, at most three component groups
    (alphabetic, ideographic, phonetic) of at most five components, each group at most 64
    bytes."""
    text = without_controls(first(value), "PN")
    groups = []
    for group in text.split("=")[:3]:
        components = [c.strip(" ") for c in group.split("^")[:5]]
        while components and not components[-1]:
            components.pop()
        groups.append(fit(encodable("^".join(components), encodings), MAX_BYTES["PN"],
                          encodings).rstrip("^ "))
    while groups and not groups[-1]:
        groups.pop()
    return "=".join(groups) or None


def code_string(value: Any, allowed: Sequence[str] | None = None) -> str | None:
    """A single CS value: upper case, only the characters CS allows, at most 16; with
    ``allowed`` (an enumeration), only one of those."""
    text = first(value).strip(" ").upper()
    if allowed is not None:
        return text if text in allowed else None
    text = _CS_INVALID.sub("", text)[: MAX_BYTES["CS"]].strip(" ")
    return text or None


def date(value: Any) -> str | None:
    """A DA value (``YYYYMMDD``) that names a real day; anything else is dropped."""
    text = first(value).strip(" ")
    if len(text) != 8 or not text.isdigit():
        return None
    try:
        dt.date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return None
    return text


def time(value: Any) -> str | None:
    """A TM value (``HH[MM[SS[.F{1,6}]]]``) within the day; anything else is dropped."""
    text = first(value).strip(" ")
    match = _TM.match(text)
    if match is None or (match.group(4) and not match.group(3)):
        return None
    hours, minutes, seconds = (int(g) if g else 0 for g in match.groups()[:3])
    if hours > 23 or minutes > 59 or seconds > 60:
        return None
    return text


def date_time(value: Any) -> str | None:
    """A DT value (``YYYY[MM[DD[HH[MM[SS[.F]]]]]][&ZZXX]``) naming a real moment."""
    text = first(value).strip(" ")
    match = _DT.match(text)
    if match is None:
        return None
    year, month, day, hours, minutes, seconds, fraction, offset = match.groups()
    if fraction and not seconds:
        return None
    try:
        dt.date(int(year), int(month or 1), int(day or 1))
    except ValueError:
        return None
    if int(hours or 0) > 23 or int(minutes or 0) > 59 or int(seconds or 0) > 60:
        return None
    if offset and utc_offset(offset) is None:
        return None
    return text


def age(value: Any) -> str | None:
    """An AS value (``nnnD``, ``nnnW``, ``nnnM`` or ``nnnY``); anything else is dropped."""
    text = first(value).strip(" ").upper()
    return text if _AS.match(text) else None


def decimal(value: Any) -> str | None:
    """A DS value: a finite number written in at most 16 characters."""
    text = first(value).strip(" ")
    if not _DS.match(text):  # float() also takes "7_0", "inf" and non-ASCII digits
        return None
    number = float(text)
    if not math.isfinite(number):
        return None
    return text if len(text) <= MAX_BYTES["DS"] else format_number_as_ds(number)


def utc_offset(value: Any) -> dt.timezone | None:
    """Timezone Offset From UTC (``&ZZXX``, -1200 to +1400) as a time zone, else ``None``."""
    match = _OFFSET.match(first(value).strip(" "))
    if match is None:
        return None
    sign, hours, minutes = match.groups()
    delta = dt.timedelta(hours=int(hours), minutes=int(minutes))
    if int(minutes) > 59 or delta > dt.timedelta(hours=14 if sign == "+" else 12):
        return None
    return dt.timezone(delta if sign == "+" else -delta)


def offset_text(zone: dt.tzinfo, at: dt.datetime) -> str:
    """``zone``'s offset at ``at`` as Timezone Offset From UTC (``+0100``)."""
    offset = zone.utcoffset(at) or dt.timedelta(0)
    sign = "-" if offset < dt.timedelta(0) else "+"
    minutes = abs(int(offset.total_seconds())) // 60
    return f"{sign}{minutes // 60:02d}{minutes % 60:02d}"


def character_set(value: Any) -> list[str] | None:
    """The values of a Specific Character Set that DICOM defines and pydicom writes, as they
    are; ``None`` for an absent, empty, unknown or ill-formed one (a stand-alone term used
    with code extensions, an ISO_IR term among ISO 2022 terms)."""
    terms = [str(v).strip(" ") for v in (value if isinstance(value, MultiValue | list | tuple)
                                         else [value]) if v is not None]
    if not terms or not any(terms):
        return None
    if len(terms) == 1:
        term = terms[0]
        return [term] if term in _SINGLE_BYTE_TERMS | _STAND_ALONE_TERMS | _EXTENSION_TERMS \
            else None
    if terms[0] not in _EXTENSION_TERMS | {""}:
        return None
    if not all(term in _EXTENSION_TERMS for term in terms[1:]):
        return None
    return terms


def encodings(charset: Sequence[str] | None) -> tuple[str, ...]:
    """The Python encodings of a Specific Character Set checked by ``character_set``."""
    if not charset:
        return DEFAULT_REPERTOIRE
    return tuple("ascii" if term in _DEFAULT_TERMS else python_encoding[term]
                 for term in charset)


def _encodes(text: str, encodings: Sequence[str]) -> bool:
    try:
        _strict(text, encodings)
    except UnicodeError:
        return False
    return True


def _encoded_length(text: str, encodings: Sequence[str]) -> int:
    return len(_strict(text, encodings))


def _strict(text: str, encodings: Sequence[str]) -> bytes:
    """``text`` encoded as pydicom writes it; raises UnicodeError where pydicom would put
    replacement characters."""
    if text.isascii():
        return text.encode("ascii")
    if not encodings:
        raise UnicodeEncodeError("ascii", text, 0, len(text), "default repertoire only")
    for position, character in enumerate(text):
        if not any(_codec_encodes(character, encoding) for encoding in encodings):
            raise UnicodeEncodeError(encodings[0], text, position, position + 1,
                                     "in none of the character sets")
    if len(encodings) == 1 and encodings[0] != "shift_jis":
        return text.encode(encodings[0])
    with warnings.catch_warnings():  # every character has a character set: none is replaced
        warnings.simplefilter("ignore")
        return encode_string(text, list(encodings))


def _codec_encodes(character: str, encoding: str) -> bool:
    try:
        encoded = character.encode(encoding)
    except UnicodeError:
        return False
    # ISO_IR 13 is JIS X 0201 (one byte a character), which pydicom writes with its own
    # encoder; Python's shift_jis would take kanji that pydicom then writes as "?".
    return len(encoded) == 1 if encoding == "shift_jis" else True
