"""Sample studies for the demo and the tests, made from real DICOM files shipped by pydicom.

Each sample gets its own deterministic UIDs, patient and accession, so writing the samples
twice gives the same studies (Orthanc keeps one copy). The positive head CT carries a
synthetic hyperdense region painted into a real head CT slice: a demonstration phantom, not a
patient finding.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.data import get_testdata_file

from triage.uids import derived_uid


@dataclass(frozen=True)
class SampleStudy:
    key: str
    source: str
    slices: int
    patient_name: str
    description: str
    hyperdense_region: bool = False


SAMPLES = (
    SampleStudy("head-ct-normal", "693_UNCR.dcm", 8, "DEMO^HEADCT NORMAL",
                "CT HEAD WITHOUT CONTRAST"),
    SampleStudy("head-ct-hyperdense", "693_UNCR.dcm", 8, "DEMO^HEADCT PHANTOM",
                "CT HEAD WITHOUT CONTRAST", hyperdense_region=True),
    SampleStudy("mr-small", "MR_small.dcm", 3, "DEMO^MR", "MR BRAIN"),
    SampleStudy("chest-cr", "RG1_UNCR.dcm", 1, "DEMO^CHEST", "XR CHEST"),
)


def add_hyperdense_region(ds: pydicom.Dataset, *, diameter_mm: float = 15.0,
                          hu: float = 65.0) -> None:
    """Paint a disc of ``hu`` Hounsfield units into the brain tissue of a CT slice, in place.

    The disc is centred on the brain-tissue pixel (20..45 HU) nearest the centre of mass of
    all brain tissue in the slice.
    """
    pixels = ds.pixel_array.astype(np.float64)
    slope = float(getattr(ds, "RescaleSlope", 1.0))
    intercept = float(getattr(ds, "RescaleIntercept", 0.0))
    values = pixels * slope + intercept
    tissue = np.argwhere((values > 20) & (values < 45))
    if len(tissue) == 0:
        raise ValueError("no brain tissue (20..45 HU) in this slice")
    centre = tissue[np.argmin(((tissue - tissue.mean(axis=0)) ** 2).sum(axis=1))]
    spacing = float(ds.PixelSpacing[0]) if "PixelSpacing" in ds else 0.5
    radius = diameter_mm / spacing / 2
    rows, cols = np.ogrid[: values.shape[0], : values.shape[1]]
    disc = (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius**2
    stored = np.round((hu - intercept) / slope)
    out = ds.pixel_array.copy()
    out[disc] = stored
    ds.PixelData = out.astype(ds.pixel_array.dtype).tobytes()


def build_sample(sample: SampleStudy) -> Iterator[pydicom.Dataset]:
    """The instances of one sample study, with new UIDs derived from its key."""
    path = get_testdata_file(sample.source)
    if not isinstance(path, str):
        raise FileNotFoundError(f"{sample.source}: install the pydicom-data package")
    source = pydicom.dcmread(path)
    study_uid = derived_uid("sample-study", sample.key)
    series_uid = derived_uid("sample-series", sample.key)
    for index in range(sample.slices):
        ds = copy.deepcopy(source)
        sop_uid = derived_uid("sample-instance", sample.key, str(index))
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = sop_uid
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.PatientName = sample.patient_name
        ds.PatientID = "DEMO-" + sample.key.upper()
        ds.AccessionNumber = "D" + hashlib.sha256(sample.key.encode()).hexdigest()[:10].upper()
        ds.StudyDescription = sample.description
        ds.StudyID = "1"
        ds.SeriesNumber = 1
        ds.InstanceNumber = index + 1
        if "ImagePositionPatient" in ds:
            x, y, _ = (float(v) for v in ds.ImagePositionPatient)
            ds.ImagePositionPatient = [x, y, index * 5.0]
            ds.SliceLocation = index * 5.0
        if sample.hyperdense_region and index == sample.slices // 2:
            add_hyperdense_region(ds)
        yield ds


def write_samples(directory: Path) -> list[Path]:
    """Write every sample study under ``directory/<key>/``; returns the study folders."""
    folders = []
    for sample in SAMPLES:
        folder = directory / sample.key
        folder.mkdir(parents=True, exist_ok=True)
        for ds in build_sample(sample):
            ds.save_as(folder / f"{ds.InstanceNumber:04d}.dcm", enforce_file_format=True)
        folders.append(folder)
    return folders
