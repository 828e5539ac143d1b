"""Series selection from a model's applicability, and the reasons given when none fits."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.uid import CTImageStorage, EnhancedCTImageStorage, MRImageStorage

from triage.errors import OutOfScope
from triage.manifest import Applicability, Manifest, load_manifest
from triage.selection import SeriesInfo, select_series

HEAD_CT = Path(__file__).resolve().parents[1] / "models" / "head-ct-hyperdensity"


def _manifest(min_instances: int = 1, max_instances: int = 2000) -> Manifest:
    manifest = load_manifest(HEAD_CT / "manifest.yaml")
    scope = Applicability(
        modalities=manifest.applicability.modalities,
        sop_class_uids=manifest.applicability.sop_class_uids,
        min_instances=min_instances,
        max_instances=max_instances,
    )
    return manifest.model_copy(update={"applicability": scope})


def _series(uid: str, modality: str, n: int, sop_class: str = CTImageStorage) -> SeriesInfo:
    return SeriesInfo(uid, modality, sop_class, "HEAD", f"Jane Doe {uid}", n)


def test_largest_applicable_series_wins() -> None:
    chosen = select_series(
        _manifest(),
        [
            _series("1.1", "CT", 3),
            _series("1.2", "CT", 40),
            _series("1.3", "MR", 400, MRImageStorage),
            _series("1.4", "CT", 900, EnhancedCTImageStorage),
            _series("1.5", "SR", 1, "1.2.840.10008.5.1.4.1.1.88.34"),
        ],
    )
    assert chosen.series_instance_uid == "1.2"


def test_series_outside_the_instance_range_are_skipped() -> None:
    chosen = select_series(
        _manifest(min_instances=10, max_instances=100),
        [_series("1.1", "CT", 5), _series("1.2", "CT", 30), _series("1.3", "CT", 500)],
    )
    assert chosen.series_instance_uid == "1.2"


def test_equal_sizes_choose_reproducibly() -> None:
    series = [_series("1.9", "CT", 30), _series("1.10", "CT", 30)]
    assert select_series(_manifest(), series) == select_series(_manifest(), series[::-1])


@pytest.mark.parametrize(
    ("series", "limits", "reason"),
    [
        (
            [_series("1.1", "MR", 100, MRImageStorage)],
            (1, 2000),
            "no applicable model: modality MR",
        ),
        (
            [_series("1.1", "MR", 9, MRImageStorage), _series("1.2", "US", 9, "1.2.3")],
            (1, 2000),
            "no applicable model: modality MR, US",
        ),
        (
            [_series("1.1", "CT", 3), _series("1.2", "CT", 8)],
            (20, 2000),
            "head-ct-hyperdensity needs at least 20 images, largest CT series has 8",
        ),
        (
            [_series("1.1", "CT", 3000)],
            (1, 2000),
            "head-ct-hyperdensity accepts at most 2000 images, smallest CT series has 3000",
        ),
        (
            [_series("1.1", "CT", 5), _series("1.2", "CT", 3000)],
            (10, 2000),
            "head-ct-hyperdensity needs 10 to 2000 images, CT series have 5, 3000",
        ),
        (
            [_series("1.1", "CT", 100, EnhancedCTImageStorage)],
            (1, 2000),
            "head-ct-hyperdensity does not accept this image type",
        ),
        ([], (1, 2000), "no images in the study"),
    ],
)
def test_out_of_scope_reasons_are_plain_and_free_of_patient_data(
    series: list[SeriesInfo], limits: tuple[int, int], reason: str
) -> None:
    with pytest.raises(OutOfScope) as caught:
        select_series(_manifest(*limits), series)
    message = str(caught.value)
    assert message.startswith(reason)
    assert "Jane" not in message and "1.1" not in message
