"""Every image in pydicom's and pydicom-data's test files goes through the whole pipeline:
each ends analysed or skipped with a reason, whatever its transfer syntax, and no worker dies."""

from __future__ import annotations

import io
import warnings
from collections import Counter

import pydicom
import pytest
from pydicom.data import get_testdata_files

from tests.conftest import Servers
from tests.test_pipeline import watch_until
from triage.errors import PermanentError
from triage.uids import derived_uid
from triage.watcher import Watcher
from triage.workers import run_worker
from triage.worklist import StudyStatus, Worklist

pytestmark = pytest.mark.servers


def image_files() -> list[tuple[str, str, pydicom.Dataset]]:
    """(name, path, dataset) of every test file with pixel data, a storage class, a syntax."""
    found = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in sorted(get_testdata_files()):
            try:
                ds = pydicom.dcmread(path)
            except Exception:  # noqa: BLE001 - files that are not DICOM at all
                continue
            meta = getattr(ds, "file_meta", None)
            if ("PixelData" in ds and "SOPClassUID" in ds and meta is not None
                    and "TransferSyntaxUID" in meta):
                found.append((path.rsplit("/", 1)[-1], path, ds))
    return found


def as_own_study(name: str, path: str, ds: pydicom.Dataset) -> bytes:
    """The file with new study, series and instance UIDs (many test files share them).

    A file pydicom cannot write back (a few have malformed elements) is sent as it is.
    """
    ds.StudyInstanceUID = derived_uid("syntax-study", name)
    ds.SeriesInstanceUID = derived_uid("syntax-series", name)
    ds.SOPInstanceUID = derived_uid("syntax-instance", name)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds.save_as(buffer, enforce_file_format=True)
    except (TypeError, ValueError, AttributeError):
        with open(path, "rb") as handle:
            return handle.read()
    return buffer.getvalue()


def test_every_transfer_syntax_ends_analysed_or_skipped(clean_servers: Servers) -> None:
    servers = clean_servers
    files = image_files()
    syntaxes = Counter(ds.file_meta.TransferSyntaxUID.name for _, _, ds in files)
    assert len(syntaxes) >= 10, syntaxes  # the sweep really covers the compressed syntaxes
    studies, refused = set(), []
    for name, path, ds in files:
        try:
            studies.add(servers.orthanc.store(as_own_study(name, path, ds))["ParentStudy"])
        except PermanentError:
            refused.append(name)  # Orthanc itself rejects a few deliberately broken files
    stored = len(studies)
    assert len(refused) <= 5, refused
    assert stored >= len(files) - 15, (stored, len(files))

    watcher = Watcher(servers.settings, servers.orthanc, servers.redis)
    watch_until(servers, watcher, stored)
    assert run_worker(burst=True)

    items, total = Worklist(servers.redis).page(1000)
    assert total == stored
    outcomes = Counter(i.status for i in items)
    failed = [(i.study_description, i.status_reason) for i in items
              if i.status is StudyStatus.FAILED]
    assert failed == []
    assert set(outcomes) <= {StudyStatus.ANALYSED, StudyStatus.SKIPPED}
    assert outcomes[StudyStatus.ANALYSED] >= 1
    print(f"\n{stored} studies, refused by Orthanc: {refused}; {dict(outcomes)}")
    for reason, n in Counter(i.status_reason for i in items).most_common():
        print(f"  {n:3d} {reason}")
    assert all(i.status_reason for i in items if i.status is StudyStatus.SKIPPED)
