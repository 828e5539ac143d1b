"""Many small, distinct studies made from real DICOM files, for batch tests."""

from __future__ import annotations

import copy
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file

from triage.uids import derived_uid


def ct_studies(directory: Path, count: int, *, tag: str, **attributes: object
               ) -> list[list[Path]]:
    """``count`` one-image head CT studies (pydicom's CT_small.dcm with new UIDs and
    patients); ``attributes`` are set on every image (e.g. RequestedProcedurePriority)."""
    source = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    studies = []
    for n in range(count):
        ds = copy.deepcopy(source)
        key = f"{tag}-{n}"
        ds.StudyInstanceUID = derived_uid("test-study", key)
        ds.SeriesInstanceUID = derived_uid("test-series", key)
        ds.SOPInstanceUID = derived_uid("test-instance", key)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.PatientName = f"BATCH^{tag.upper()}{n}"
        ds.PatientID = f"{tag}-{n}"
        ds.AccessionNumber = f"ACC{n:05d}"
        ds.BodyPartExamined = "HEAD"
        for keyword, value in attributes.items():
            setattr(ds, keyword, value)
        path = directory / f"{key}.dcm"
        ds.save_as(path, enforce_file_format=True)
        studies.append([path])
    return studies
