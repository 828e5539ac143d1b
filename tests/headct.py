"""Small head CT studies made from a real head CT slice (pydicom's 693_UNCR.dcm, halved to
256 x 256 to keep hundreds of studies light), for the vigilance tests.

A study can carry a disc of blood-like density (65 HU) of a chosen diameter in one slice: the
head-CT model's probability rises with the diameter (measured: 0.007 without a disc, 0.04 at
5 mm, 0.09 at 6 mm, 0.33 at 6.5 mm, 0.72 at 7 mm, 0.93 at 8 mm, 1.0 at 10 mm), so the test
decides what the model will see, independently of what the truth is said to be (a
sub-threshold bleed, a look-alike).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file

from triage.samples import add_hyperdense_region
from triage.uids import derived_uid


@dataclass(frozen=True)
class HeadCT:
    key: str
    disc_mm: float = 0.0
    slices: int = 2
    manufacturer: str = "ACME Medical"
    model_name: str = "Scanner 64"
    station: str = "CT1"
    institution: str = "General Hospital"
    sex: str = "F"
    age: str = "054Y"
    thickness_mm: float = 5.0
    kernel: str = "H30s"
    kvp: float = 120.0
    # Slices that carry the disc; by default only the middle one.
    bleed_slices: tuple[int, ...] = ()


@cache
def _half_slice() -> pydicom.Dataset:
    source = pydicom.dcmread(get_testdata_file("693_UNCR.dcm"))
    pixels = source.pixel_array[::2, ::2].copy()
    source.PixelData = pixels.tobytes()
    source.Rows, source.Columns = pixels.shape
    source.PixelSpacing = [float(v) * 2 for v in source.PixelSpacing]
    return source


def write_head_ct(directory: Path, study: HeadCT) -> list[Path]:
    """Write ``study`` under ``directory/<key>/``; returns the files."""
    folder = directory / study.key
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = derived_uid("vigilance-study", study.key)
    series_uid = derived_uid("vigilance-series", study.key)
    paths = []
    for index in range(study.slices):
        ds = copy.deepcopy(_half_slice())
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = derived_uid("vigilance-instance", study.key, str(index))
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.PatientName = f"VIGILANCE^{study.key.upper()}"
        ds.PatientID = f"V-{study.key}"
        ds.AccessionNumber = "V" + str(derived_uid("acc", study.key))[-12:]
        ds.PatientSex = study.sex
        ds.PatientAge = study.age
        ds.StudyDescription = "CT HEAD WITHOUT CONTRAST"
        ds.BodyPartExamined = "HEAD"
        ds.Manufacturer = study.manufacturer
        ds.ManufacturerModelName = study.model_name
        ds.StationName = study.station
        ds.InstitutionName = study.institution
        ds.SliceThickness = study.thickness_mm
        ds.ConvolutionKernel = study.kernel
        ds.KVP = study.kvp
        ds.SeriesNumber = 1
        ds.InstanceNumber = index + 1
        x, y, _ = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, index * study.thickness_mm]
        ds.SliceLocation = index * study.thickness_mm
        if study.disc_mm and index in (study.bleed_slices or (study.slices // 2,)):
            add_hyperdense_region(ds, diameter_mm=study.disc_mm)
        path = folder / f"{index:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def study_uid(study: HeadCT) -> str:
    return str(derived_uid("vigilance-study", study.key))
