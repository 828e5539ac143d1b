"""The key image: a Secondary Capture of the slice with the strongest evidence, with the
finding and "AI result, unverified" burned in, for PACS viewers without SR support.

The text is drawn in a black band added above the image, so it never covers anatomy. The
image goes in a new series of the same study; its UIDs derive from the SR it illustrates.
"""

from __future__ import annotations

import datetime as dt
import io

import numpy as np
import pydicom
from highdicom.sc import SCImage
from PIL import Image, ImageDraw, ImageFont
from pydicom.uid import UID
from pydicom.valuerep import DA, TM

from triage.copying.header import source_header
from triage.findings import Finding, ModelIdentity
from triage.manifest import Rescale
from triage.pixels import decode_instance
from triage.uids import derived_uid, key_image_series_uid

SERIES_NUMBER = 7101
BAND_HEIGHT = 56
# CT is shown in a brain window; other images from their own 1st to 99th percentile.
CT_WINDOW = (40.0, 80.0)


def key_image_uid(sr_uid: str) -> UID:
    return derived_uid("key-image", sr_uid)


def build_key_image(source: pydicom.Dataset, finding: Finding, model: ModelIdentity,
                    sr_uid: str, *, created: dt.datetime | None = None,
                    site_zone: dt.tzinfo = dt.UTC) -> SCImage:
    """A Secondary Capture of ``source`` (the key slice) with the finding burned in.

    Patient and study attributes are copied as for the SR (``triage.copying.header``);
    ``created`` (aware; defaults to now) is written at the same UTC offset as the SR's.
    """
    lines = ["AI RESULT - UNVERIFIED - NOT A DIAGNOSIS",
             f"{finding.concept.meaning}: p={finding.probability:.2f} "
             f"({model.name} {model.version})"]
    pixels = _with_text(_display(source), lines)
    header = source_header(source, site_zone=site_zone, own_texts=[lines[1]], created=created)
    when = header.when
    image = SCImage.from_ref_dataset(
        ref_dataset=header.dataset,
        pixel_array=pixels,
        photometric_interpretation="MONOCHROME2",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=key_image_series_uid(str(header.dataset.StudyInstanceUID)),
        series_number=SERIES_NUMBER,
        sop_instance_uid=key_image_uid(sr_uid),
        instance_number=1,
        manufacturer="Triage",
        patient_orientation=("L", "P"),
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        content_date=when.date(),
        content_time=when.time(),
        specific_character_set=None,  # set by header.finish
    )
    header.pin_times(image)
    # SC Equipment module: highdicom stamps the capture with the process's clock.
    image.DateOfSecondaryCapture, image.TimeOfSecondaryCapture = (
        DA(when.date()), TM(when.time()))
    image.BurnedInAnnotation = "YES"
    # General Series Laterality (Type 2C): present and empty, the anatomy is not paired.
    image.Laterality = ""
    image.SeriesDescription = "AI key image (unverified)"
    if "StudyDescription" in header.dataset:
        image.StudyDescription = header.dataset.StudyDescription
    image.ImageComments = header.text("AI result, unverified: " + lines[1], "LT")
    header.finish(image)
    return image


def render_png(source: pydicom.Dataset, window: tuple[float, float] | None) -> bytes:
    """The slice as a PNG for the study page, in ``window`` (centre, width) when given."""
    out = io.BytesIO()
    Image.fromarray(_display(source, window)).save(out, format="PNG")
    return out.getvalue()


def _display(source: pydicom.Dataset,
             window: tuple[float, float] | None = None) -> np.ndarray:
    """The slice (the first frame of a multi-frame image) as 8-bit greyscale, brighter
    meaning denser, in ``window`` (CT: a brain window by default). Raises InvalidInput as
    the analysis's decoder does."""
    decoded = decode_instance(source, Rescale.HU)
    for error in (decoded.header_error, decoded.pixel_error):
        if error is not None:
            raise error
    values = decoded.frames[0]
    is_ct = str(source.get("Modality", "")).strip().upper() == "CT"
    if window is not None or is_ct:
        centre, width = window or CT_WINDOW
        low, high = centre - width / 2, centre + width / 2
    else:
        low, high = (float(v) for v in np.percentile(values, [1, 99]))
    if not is_ct and str(source.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        values = high + low - values
    scaled = (np.clip(values, low, high) - low) / max(high - low, 1e-6) * 255
    return scaled.astype(np.uint8)


def _with_text(image: np.ndarray, lines: list[str]) -> np.ndarray:
    """``image`` below a black band holding ``lines`` in white."""
    band = Image.new("L", (image.shape[1], BAND_HEIGHT), 0)
    draw = ImageDraw.Draw(band)
    size = max(10, min(18, image.shape[1] // 40))
    font = ImageFont.load_default(size=size)
    for n, line in enumerate(lines):
        draw.text((6, 6 + n * (size + 6)), line, fill=255, font=font)
    return np.vstack([np.asarray(band, dtype=np.uint8), image])
