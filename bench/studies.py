"""Benchmark studies made from real DICOM files shipped by pydicom-data, with new UIDs.

- radiographs: RG1_UNCR.dcm (chest, 1955 x 1841) and RG3_UNCR.dcm (extremity, 1760 x 1760),
  modality CR, one image per study;
- head CT: 693_UNCR.dcm (a real 512 x 512 CT slice) repeated as an axial non-contrast head CT
  series with consecutive positions 5 mm apart, the way a scanner sends a 300-slice series;
  with ``bleed``, the slices given carry a disc of blood-like density (65 HU, ``BLEED_MM``
  across), which the head-CT model scores positive (the score rises with the diameter: 0.007
  without a disc, 0.33 at 6.5 mm, 0.72 at 7 mm, 0.93 at 8 mm, 1.0 from 10 mm).

Every study gets fresh UIDs from a run-specific tag, so each one is new to Orthanc.
"""

from __future__ import annotations

from collections.abc import Container
from functools import cache
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file

from triage.samples import add_hyperdense_region
from triage.uids import derived_uid

RADIOGRAPH_SOURCES = ("RG1_UNCR.dcm", "RG3_UNCR.dcm")
CT_SOURCE = "693_UNCR.dcm"
# Diameter of the bleed drawn into a head CT's slices: well over the model's threshold.
BLEED_MM = 12.0


def _source_path(name: str) -> str:
    path = get_testdata_file(name)
    if not isinstance(path, str):
        raise FileNotFoundError(f"{name}: install the pydicom-data package")
    return path


@cache
def _source(name: str) -> pydicom.Dataset:
    return pydicom.dcmread(_source_path(name))


def _relabel(ds: pydicom.Dataset, key: str, index: int, patient: str) -> None:
    ds.StudyInstanceUID = derived_uid("bench-study", key)
    ds.SeriesInstanceUID = derived_uid("bench-series", key)
    ds.SOPInstanceUID = derived_uid("bench-instance", key, str(index))
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientName = f"BENCH^{patient}"
    ds.PatientID = f"BENCH-{key}"[:64]
    ds.AccessionNumber = derived_uid("bench-acc", key)[-16:]
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = index + 1


def radiograph(directory: Path, key: str, n: int = 0, *, stat: bool = False) -> list[Path]:
    """One single-image CR study (RG1 or RG3 by ``n``); ``stat`` sets Requested Procedure
    Priority STAT."""
    ds = _source(RADIOGRAPH_SOURCES[n % len(RADIOGRAPH_SOURCES)])
    _relabel(ds, key, 0, "RADIOGRAPH")
    ds.Modality = "CR"
    ds.StudyDescription = "XR CHEST" if n % 2 == 0 else "XR EXTREMITY"
    if stat:
        ds.RequestedProcedurePriority = "STAT"
    elif "RequestedProcedurePriority" in ds:
        del ds.RequestedProcedurePriority
    path = directory / f"{key}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return [path]


@cache
def _ct_pixels(bleed: bool) -> bytes:
    """The CT slice's pixel data, with the bleed drawn in or not (each made once)."""
    ds = pydicom.dcmread(_source_path(CT_SOURCE))  # a copy of its own to draw into
    if bleed:
        add_hyperdense_region(ds, diameter_mm=BLEED_MM)
    return bytes(ds.PixelData)


def head_ct(directory: Path, key: str, slices: int,
            bleed: Container[int] = ()) -> list[Path]:
    """A ``slices``-image axial head CT series in its own folder; the slices whose index is
    in ``bleed`` show a bleed the head-CT model finds."""
    ds = _source(CT_SOURCE)
    folder = directory / key
    folder.mkdir(parents=True, exist_ok=True)
    x, y, _ = (float(v) for v in ds.ImagePositionPatient)
    paths = []
    for index in range(slices):
        _relabel(ds, key, index, "HEADCT")
        ds.Modality = "CT"
        ds.BodyPartExamined = "HEAD"
        ds.StudyDescription = "CT HEAD WITHOUT CONTRAST"
        ds.SeriesDescription = "AXIAL 5MM"
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [x, y, index * 5.0]
        ds.SliceLocation = index * 5.0
        ds.SliceThickness = 5.0
        ds.PixelData = _ct_pixels(index in bleed)
        path = folder / f"{index:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
