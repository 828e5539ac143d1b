"""Running one model package on one series: decode, preprocess, onnxruntime, per-label findings."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from time import perf_counter

import numpy as np
from pydicom.dataset import Dataset

from triage.errors import InvalidInput, ModelPackageError
from triage.findings import Finding, ModelResult
from triage.manifest import (
    InputMode,
    Manifest,
    Normalisation,
    OutputLabel,
    Preprocessing,
    SliceReduction,
)
from triage.pixels import Volume, decode_series
from triage.registry import ModelPackage


def run_model(package: ModelPackage, datasets: Sequence[Dataset]) -> ModelResult:
    """Analyse one series with ``package``: one Finding per output label of its manifest.

    Per-image modes reduce the images' probabilities per the manifest (maximum or mean); the
    key image is the one with the highest probability. In volume mode the model sees the
    whole series at once and the key image is the middle one. A finding implies its label's
    priority only at or above the threshold.
    """
    series_uids = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets}
    if len(series_uids) > 1:
        raise InvalidInput("images from more than one series were given to one model")
    prep = package.manifest.preprocessing
    started = perf_counter()
    volume = decode_series(datasets, prep.rescale, slice_transform=slice_transform(prep))
    result = infer(package, volume, series_uids.pop())
    return with_timings(result, decode=perf_counter() - started - result.timings["inference"])


def infer(package: ModelPackage, volume: Volume, series_instance_uid: str) -> ModelResult:
    """Run ``package`` on a volume decoded for it (``slice_transform`` of its preprocessing)
    and turn the outputs into findings; ``timings`` has ``inference``."""
    manifest = package.manifest
    started = perf_counter()
    outputs = predict(package, model_input(manifest.preprocessing, volume.pixels))
    inferred = perf_counter()
    findings = findings_from_scores(manifest, outputs, volume.sop_instance_uids,
                                    volume.sop_class_uids)
    return ModelResult(
        model=package.identity,
        series_instance_uid=series_instance_uid,
        input_sop_instance_uids=volume.sop_instance_uids,
        findings=findings,
        timings={"inference": inferred - started},
    )


@dataclass(frozen=True)
class SliceFit:
    """The fit of each decoded slice to the model's ``size`` x ``size`` input
    (``pixels.SliceTransform``): the whole image resized (``resize_square``), or, with
    ``pixel_spacing_mm``, resampled to that pixel size around its centre
    (``resample_to_spacing``)."""

    size: int
    pixel_spacing_mm: float | None = None

    def __call__(self, image: np.ndarray,
                 pixel_spacing: tuple[float, float] | None) -> np.ndarray:
        if self.pixel_spacing_mm is None:
            return resize_square(image, self.size)
        if pixel_spacing is None:
            raise ValueError("a fit in millimetres needs the image's pixel spacing")
        return resample_to_spacing(image, pixel_spacing, self.pixel_spacing_mm, self.size)


def slice_transform(prep: Preprocessing) -> SliceFit:
    """What each decoded slice goes through before stacking: the fit to the model's input."""
    return SliceFit(prep.size, prep.pixel_spacing_mm)


def with_timings(result: ModelResult, **seconds: float) -> ModelResult:
    """``result`` with more timings (seconds by name)."""
    return replace(result, timings={**result.timings, **seconds})


def model_input(prep: Preprocessing, slices: np.ndarray) -> np.ndarray:
    """The input tensor for resized images [N, size, size], per the manifest's preprocessing.

    ``slices`` is never changed; it is copied only where the preprocessing needs new values.
    """
    images = slices.astype(np.float32, copy=False)
    if prep.window is not None:
        low = prep.window.center - prep.window.width / 2
        images = np.clip(images, low, low + prep.window.width)
        images -= np.float32(low)
        images /= np.float32(prep.window.width)
    images = _normalise(images, prep.normalisation)
    if prep.mode is InputMode.STACK:
        # Each image with its neighbours; the first and last are repeated at the ends.
        half = prep.stack_size // 2
        index = np.clip(np.arange(len(images))[:, None] + np.arange(-half, half + 1),
                        0, len(images) - 1)
        return np.ascontiguousarray(images[index])
    if prep.mode is InputMode.VOLUME:
        assert prep.depth is not None  # the manifest validator guarantees it
        positions = np.linspace(0, len(images) - 1, prep.depth)
        below = np.floor(positions).astype(np.intp)
        above = np.minimum(below + 1, len(images) - 1)
        weight = (positions - below).astype(np.float32)[:, None, None]
        resampled = images[below] * (1 - weight) + images[above] * weight
        return np.ascontiguousarray(resampled[None, None])
    if prep.channels == 1:
        return np.ascontiguousarray(images[:, None])
    return np.ascontiguousarray(np.repeat(images[:, None], prep.channels, axis=1))


def _normalise(images: np.ndarray, how: Normalisation) -> np.ndarray:
    axes = (1, 2)
    if how is Normalisation.MINMAX:
        low = images.min(axis=axes, keepdims=True)
        span = images.max(axis=axes, keepdims=True) - low
        return (images - low) / np.where(span > 0, span, 1)
    if how is Normalisation.ZSCORE:
        mean = images.mean(axis=axes, keepdims=True)
        std = images.std(axis=axes, keepdims=True)
        return (images - mean) / np.where(std > 0, std, 1)
    return images


def predict(package: ModelPackage, tensor: np.ndarray) -> dict[str, np.ndarray]:
    """Outputs [B, K] of every ONNX output the manifest uses, ``batch_size`` items at a time."""
    manifest = package.manifest
    session = package.session
    names = sorted({label.output for label in manifest.outputs})
    _check_signature(manifest, session.get_inputs(), session.get_outputs(), names)
    batch = manifest.runtime.batch_size
    parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for start in range(0, len(tensor), batch):
        feed = np.ascontiguousarray(tensor[start : start + batch], dtype=np.float32)
        try:
            results = session.run(names, {manifest.preprocessing.input: feed})
        except Exception as exc:  # onnxruntime's exception types are not exported
            raise ModelPackageError(f"{manifest.key}: inference failed: {exc}") from exc
        for name, result in zip(names, results, strict=True):
            parts[name].append(np.asarray(result, dtype=np.float32).reshape(len(feed), -1))
    return {name: np.concatenate(chunks) for name, chunks in parts.items()}


def _check_signature(manifest: Manifest, inputs: list, outputs: list, names: list[str]) -> None:
    # A manifest that names tensors the graph lacks is a broken package, not a bad study.
    if manifest.preprocessing.input not in {i.name for i in inputs}:
        raise ModelPackageError(f"{manifest.key}: no model input {manifest.preprocessing.input}")
    missing = sorted(set(names) - {o.name for o in outputs})
    if missing:
        raise ModelPackageError(f"{manifest.key}: no model output {', '.join(missing)}")


def findings_from_scores(manifest: Manifest, outputs: dict[str, np.ndarray],
                         sop_instance_uids: Sequence[str], sop_class_uids: Sequence[str]
                         ) -> tuple[Finding, ...]:
    """One Finding per output label from the model's outputs [N, K] (``predict``), whose
    rows are the images ``sop_instance_uids`` (of ``sop_class_uids``) in patient order."""
    return tuple(_finding(manifest, label, outputs[label.output], sop_instance_uids,
                          sop_class_uids) for label in manifest.outputs)


def _finding(manifest: Manifest, label: OutputLabel, scores: np.ndarray,
             sop_instance_uids: Sequence[str], sop_class_uids: Sequence[str]) -> Finding:
    if label.index >= scores.shape[1]:
        raise ModelPackageError(
            f"output {label.output} has {scores.shape[1]} columns, label {label.label} "
            f"uses column {label.index}"
        )
    per_item = scores[:, label.index]
    if not np.all(np.isfinite(per_item)):
        raise ModelPackageError(f"output {label.output} is not a finite probability")
    if manifest.preprocessing.mode is InputMode.VOLUME:
        key, probability = len(sop_instance_uids) // 2, float(per_item[0])
    else:
        key = int(np.argmax(per_item))
        reduce = manifest.preprocessing.slice_reduction
        probability = float(per_item[key] if reduce is SliceReduction.MAX else per_item.mean())
    return Finding(
        concept=label.concept.coded(),
        probability=probability,
        threshold=label.threshold,
        priority=label.priority if probability >= label.threshold else None,
        key_sop_instance_uid=sop_instance_uids[key],
        key_sop_class_uid=sop_class_uids[key],
    )


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """``image`` padded to a square with its minimum value, then resized to ``size`` x ``size``.

    Padding keeps the anatomy's aspect ratio; the minimum (air, for CT) adds nothing the model
    counts. Resampling is bilinear at pixel centres, which for a 2:1 reduction averages 2 x 2
    blocks.
    """
    rows, cols = image.shape
    side = max(rows, cols)
    if rows != cols:
        square = np.full((side, side), image.min(), dtype=np.float32)
        top, left = (side - rows) // 2, (side - cols) // 2
        square[top : top + rows, left : left + cols] = image
        image = square
    if side == size:
        return image.astype(np.float32, copy=False)
    low, high, weight = _linear_taps(side, size)
    image = image[low] * (1 - weight[:, None]) + image[high] * weight[:, None]
    image = image[:, low] * (1 - weight[None, :]) + image[:, high] * weight[None, :]
    return image.astype(np.float32, copy=False)


def resample_to_spacing(image: np.ndarray, pixel_spacing: tuple[float, float],
                        target_mm: float, size: int) -> np.ndarray:
    """The ``size`` x ``size`` window around ``image``'s centre, resampled (bilinear) so that
    each pixel is ``target_mm`` wide; outside the image it holds the image's minimum.

    Only the window is computed, so a fine target on a large image allocates ``size``
    squared values, not the whole image at the new spacing.
    """
    background = float(image.min())
    rows, inside_rows = _centred_taps(image.shape[0], size, target_mm / pixel_spacing[0])
    cols, inside_cols = _centred_taps(image.shape[1], size, target_mm / pixel_spacing[1])
    low, high, weight = rows
    image = image[low] * (1 - weight[:, None]) + image[high] * weight[:, None]
    low, high, weight = cols
    image = image[:, low] * (1 - weight[None, :]) + image[:, high] * weight[None, :]
    image[~inside_rows, :] = background
    image[:, ~inside_cols] = background
    return image.astype(np.float32, copy=False)


def _centred_taps(n_in: int, n_out: int, step: float
                  ) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], np.ndarray]:
    """Linear-interpolation taps of ``n_out`` samples ``step`` source pixels apart, centred
    on the source, and which samples fall inside it."""
    centre = (np.arange(n_out, dtype=np.float64) + 0.5 - n_out / 2) * step + n_in / 2 - 0.5
    inside = (centre >= -0.5) & (centre <= n_in - 0.5)
    centre = np.clip(centre, 0, n_in - 1)
    low = np.floor(centre).astype(np.intp)
    high = np.minimum(low + 1, n_in - 1)
    return (low, high, (centre - low).astype(np.float32)), inside


def _linear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of linear interpolation, pixel centres aligned."""
    centre = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    centre = np.clip(centre, 0, n_in - 1)
    low = np.floor(centre).astype(np.intp)
    high = np.minimum(low + 1, n_in - 1)
    return low, high, (centre - low).astype(np.float32)


def self_test(package: ModelPackage) -> dict[str, float]:
    """Run the model once on a blank input; returns each label's probability.

    Raises ModelPackageError when the graph and the manifest disagree (names, columns) or
    when an output is not a probability in 0..1.
    """
    manifest = package.manifest
    size = manifest.preprocessing.size
    count = manifest.preprocessing.depth or 1
    blank = np.zeros((count, size, size), dtype=np.float32)
    outputs = predict(package, model_input(manifest.preprocessing, blank))
    probabilities = {}
    for label in manifest.outputs:
        scores = outputs[label.output]
        if label.index >= scores.shape[1]:
            raise ModelPackageError(f"output {label.output} has no column {label.index} "
                                    f"for label {label.label}")
        value = float(scores[0, label.index])
        if not 0.0 <= value <= 1.0:
            raise ModelPackageError(f"output {label.output} gave {value}, not a probability")
        probabilities[label.label] = value
    return probabilities
