"""Decoding and running the head-CT model on real CT slices from pydicom's test data."""

from __future__ import annotations

import copy
import random
import re
import tracemalloc
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from triage.errors import InvalidInput, OutOfScope
from triage.inference import SliceFit, resample_to_spacing, resize_square, run_model
from triage.pixels import decode_series
from triage.priority import PriorityClass
from triage.registry import ModelPackage
from triage.selection import SeriesInfo, select_series

HEAD_CT = Path(__file__).resolve().parents[1] / "models" / "head-ct-hyperdensity"
# A CQ500 supratentorial head CT slice, 512 x 512, 0.48 mm pixels, explicit VR little endian.
SUPRATENTORIAL = "693_UNCR.dcm"
# A skull-base head CT slice, JPEG 2000.
SKULL_BASE = "J2K_pixelrep_mismatch.dcm"
# (row, column) of parenchyma in the left hemisphere of SUPRATENTORIAL, 4 cm inside the skull.
BRAIN = (300, 320)


@pytest.fixture(scope="module")
def package() -> ModelPackage:
    return ModelPackage.load(HEAD_CT)


def _read(name: str) -> Dataset:
    return pydicom.dcmread(get_testdata_file(name))


def _with_blob(ds: Dataset, *, centre: tuple[int, int], diameter_mm: float, hu: float) -> Dataset:
    """A copy of ``ds`` with a disc of ``hu`` (plus CT-like noise) drawn into its pixels."""
    result = copy.deepcopy(ds)
    stored = result.pixel_array.astype(np.int32)
    spacing = float(result.PixelSpacing[0])
    rows, cols = np.mgrid[: stored.shape[0], : stored.shape[1]]
    inside = (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= (diameter_mm / 2 / spacing) ** 2
    noise = np.random.default_rng(7).normal(0, 5, inside.sum())
    value = (hu + noise - float(result.RescaleIntercept)) / float(result.RescaleSlope)
    stored[inside] = np.round(value)
    result.PixelData = stored.astype(result.pixel_array.dtype).tobytes()
    return result


def _mean_hu(ds: Dataset, centre: tuple[int, int], radius_px: int) -> float:
    y, x = centre
    patch = ds.pixel_array[y - radius_px : y + radius_px, x - radius_px : x + radius_px]
    return float(patch.mean()) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def _series_from(ds: Dataset, n: int) -> list[Dataset]:
    """``n`` slices 5 mm apart built from ``ds``, with new UIDs, in shuffled order."""
    series_uid = generate_uid()
    slices = []
    for index in range(n):
        item = copy.deepcopy(ds)
        item.SeriesInstanceUID = series_uid
        item.SOPInstanceUID = generate_uid()
        item.InstanceNumber = index + 1
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        item.ImagePositionPatient = [x, y, z + 5.0 * index]
        slices.append(item)
    random.Random(3).shuffle(slices)
    return slices


def test_real_head_ct_slices_give_a_low_probability(package: ModelPackage) -> None:
    for name in (SUPRATENTORIAL, SKULL_BASE):
        ds = _read(name)
        result = run_model(package, [ds])
        (finding,) = result.findings
        assert finding.probability < 0.05, name
        assert finding.priority is None and not finding.positive
        assert finding.key_sop_instance_uid == ds.SOPInstanceUID
        assert result.input_sop_instance_uids == (ds.SOPInstanceUID,)
        assert set(result.timings) == {"decode", "inference"}


def test_a_15_mm_hyperdense_blob_in_brain_is_critical(package: ModelPackage) -> None:
    ds = _read(SUPRATENTORIAL)
    # The disc replaces brain parenchyma (20-50 HU), not CSF, bone or air.
    assert 20 < _mean_hu(ds, BRAIN, 10) < 50
    result = run_model(package, [_with_blob(ds, centre=BRAIN, diameter_mm=15, hu=65)])
    (finding,) = result.findings
    assert finding.probability > finding.threshold
    assert finding.priority is PriorityClass.CRITICAL
    assert finding.concept.value == "1386000"
    assert finding.key_sop_instance_uid == ds.SOPInstanceUID
    assert result.model.id == "head-ct-hyperdensity"


def test_water_density_blob_is_not_flagged(package: ModelPackage) -> None:
    ds = _read(SUPRATENTORIAL)
    blob = _with_blob(ds, centre=BRAIN, diameter_mm=15, hu=10)
    assert run_model(package, [blob]).findings[0].probability < 0.05


def test_multi_slice_series_reports_the_slice_with_the_blob(package: ModelPackage) -> None:
    series = _series_from(_read(SUPRATENTORIAL), 6)
    by_z = sorted(series, key=lambda ds: float(ds.ImagePositionPatient[2]))
    assert series != by_z, "the series must arrive out of order to test sorting"
    bleeding = by_z[3]
    series[series.index(bleeding)] = _with_blob(bleeding, centre=BRAIN, diameter_mm=15, hu=65)

    result = run_model(package, series)

    assert result.input_sop_instance_uids == tuple(ds.SOPInstanceUID for ds in by_z)
    assert result.series_instance_uid == series[0].SeriesInstanceUID
    (finding,) = result.findings
    assert finding.priority is PriorityClass.CRITICAL
    assert finding.key_sop_instance_uid == bleeding.SOPInstanceUID


def test_batches_give_the_same_result_as_one_pass(package: ModelPackage) -> None:
    series = _series_from(_read(SUPRATENTORIAL), 5)
    small = package.manifest.model_copy(
        update={"runtime": package.manifest.runtime.model_copy(update={"batch_size": 2})}
    )
    batched = ModelPackage(small, package.folder)
    assert run_model(batched, series).findings == run_model(package, series).findings


def test_mr_series_is_out_of_scope(package: ModelPackage) -> None:
    mr = _read("MR_small.dcm")
    info = SeriesInfo(
        series_instance_uid=mr.SeriesInstanceUID,
        modality=mr.Modality,
        sop_class_uid=mr.SOPClassUID,
        body_part=mr.get("BodyPartExamined", ""),
        description=mr.get("SeriesDescription", ""),
        n_instances=1,
    )
    with pytest.raises(OutOfScope, match="no applicable model: modality MR"):
        select_series(package.manifest, [info])


def test_a_file_without_pixel_data_is_invalid_input(package: ModelPackage) -> None:
    ds = _read(SUPRATENTORIAL)
    del ds.PixelData
    with pytest.raises(InvalidInput, match="no pixel data"):
        run_model(package, [ds])


def test_colour_images_are_refused() -> None:
    with pytest.raises(InvalidInput, match="photometric interpretation RGB"):
        decode_series([_read("SC_rgb.dcm")])


def test_undecodable_transfer_syntax_is_named() -> None:
    ds = _read("CT_small.dcm")
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2 video
    with pytest.raises(InvalidInput, match="cannot decode .*MPEG2"):
        decode_series([ds])


def test_images_of_different_sizes_are_refused() -> None:
    with pytest.raises(InvalidInput, match="different sizes.*128x128, 512x512"):
        decode_series([_read("CT_small.dcm"), _read(SUPRATENTORIAL)])


def test_multi_frame_frames_become_slices_in_hounsfield_units() -> None:
    # Enhanced CT keeps its rescale in the functional groups, not at the top level.
    ds = _read("eCT_Supplemental.dcm")
    volume = decode_series([ds], "hu")
    assert volume.pixels.shape == (2, 512, 512)
    assert volume.sop_instance_uids == (ds.SOPInstanceUID, ds.SOPInstanceUID)
    np.testing.assert_allclose(volume.pixels[1], ds.pixel_array[1].astype(np.float32) - 1024)


def test_frame_count_larger_than_the_pixel_data_is_invalid() -> None:
    ds = _read("CT_small.dcm")
    ds.NumberOfFrames = 2
    with pytest.raises(InvalidInput):
        decode_series([ds])


def test_hounsfield_units_and_instance_number_fallback() -> None:
    first, second = _read("CT_small.dcm"), _read("CT_small.dcm")
    for ds, number in ((first, 2), (second, 1)):
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = number
        del ds.ImagePositionPatient
    volume = decode_series([first, second], "hu")
    assert volume.sop_instance_uids == (second.SOPInstanceUID, first.SOPInstanceUID)
    assert volume.pixels.dtype == np.float32 and volume.pixels.shape == (2, 128, 128)
    expected = first.pixel_array * float(first.RescaleSlope) + float(first.RescaleIntercept)
    np.testing.assert_allclose(volume.pixels[1], expected)


def test_raw_values_invert_monochrome1() -> None:
    ds = _read("CT_small.dcm")
    ds.PhotometricInterpretation = "MONOCHROME1"
    raw = decode_series([ds], "raw").pixels[0]
    np.testing.assert_array_equal(raw, -ds.pixel_array.astype(np.float32) - 1)
    hu = decode_series([ds], "hu").pixels[0]
    assert np.corrcoef(raw.ravel(), hu.ravel())[0, 1] < -0.99


def test_resize_averages_2x2_blocks_and_pads_to_square() -> None:
    image = np.arange(16, dtype=np.float32).reshape(4, 4)
    np.testing.assert_allclose(resize_square(image, 2), [[2.5, 4.5], [10.5, 12.5]])
    wide = np.ones((2, 4), dtype=np.float32)
    wide[0, 0] = 0
    padded = resize_square(wide, 4)
    assert padded.shape == (4, 4)
    np.testing.assert_array_equal(padded[[0, 3]], 0)
    np.testing.assert_array_equal(padded[2], 1)


def test_resample_to_spacing_averages_at_half_resolution_around_the_centre() -> None:
    image = np.arange(64, dtype=np.float32).reshape(8, 8)
    # 0.5 mm pixels seen at 1 mm: each output pixel is the mean of a 2 x 2 block.
    half = resample_to_spacing(image, (0.5, 0.5), 1.0, 4)
    np.testing.assert_allclose(half, image.reshape(4, 2, 4, 2).mean(axis=(1, 3)))
    # A window larger than the image holds the image's minimum outside it.
    padded = resample_to_spacing(image + 5, (1.0, 1.0), 1.0, 12)
    np.testing.assert_array_equal(padded[2:10, 2:10], image + 5)
    assert (padded[:2] == 5).all() and (padded[:, 10:] == 5).all()


def test_resample_to_a_fine_spacing_computes_only_the_window() -> None:
    image = np.zeros((4000, 4000), dtype=np.float32)  # 64 MB
    image[2000, 2000] = 1
    tracemalloc.start()
    try:
        window = resample_to_spacing(image, (1.0, 1.0), 0.01, 64)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert window.shape == (64, 64) and window.max() > 0
    # The image at 0.01 mm would be 400,000 pixels square; only the window's rows are made.
    assert peak < 4 * 2**20, f"{peak / 2**20:.1f} MB allocated"


@pytest.mark.parametrize(("spacing", "reason"), [
    (None, "Pixel Spacing is missing"), (["0", "0"], "Pixel Spacing is zero or negative"),
    (["-0.5", "-0.5"], "Pixel Spacing is zero or negative"),
    (["0.5"], "Pixel Spacing has 1 value(s), 2 expected"),
])
def test_a_model_in_millimetres_needs_a_usable_pixel_spacing(spacing, reason) -> None:
    ds = _read("CT_small.dcm")
    if spacing is None:
        del ds.PixelSpacing
    else:
        ds.PixelSpacing = spacing
    with pytest.raises(InvalidInput, match=re.escape(reason)):
        decode_series([ds], "hu", slice_transform=SliceFit(64, pixel_spacing_mm=1.0))
    decode_series([ds], "hu", slice_transform=SliceFit(64))  # a model that does not need it


def test_a_ct_without_rescale_is_never_taken_as_hounsfield_units() -> None:
    ds = _read("CT_small.dcm")
    del ds.RescaleSlope, ds.RescaleIntercept
    with pytest.raises(InvalidInput, match="Rescale Slope and Rescale Intercept are missing"):
        decode_series([ds], "hu")
    decode_series([ds], "raw")  # stored values are what a raw model asks for
    mr = _read("MR_small.dcm")
    assert "RescaleSlope" not in mr
    np.testing.assert_array_equal(decode_series([mr], "hu").pixels[0], mr.pixel_array)


def test_a_raw_model_never_reads_the_rescale() -> None:
    mr = _read("MR_small.dcm")
    mr.RescaleSlope = ["1", "2"]  # unusable, and irrelevant to stored values
    np.testing.assert_array_equal(decode_series([mr], "raw").pixels[0], mr.pixel_array)
