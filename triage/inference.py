"""Running one model package on one series: decode, preprocess, onnxruntime, per-label findings."""

from __future__ import annotations

from collections.abc import Sequence
from time import perf_counter

import numpy as np
from pydicom.dataset import Dataset

from triage.errors import InvalidInput, ModelPackageError
from triage.findings import Finding, ModelResult
from triage.manifest import Manifest, OutputLabel
from triage.pixels import Volume, decode_series
from triage.registry import ModelPackage


def run_model(package: ModelPackage, datasets: Sequence[Dataset]) -> ModelResult:
    """Analyse one series with ``package``: one Finding per output label of its manifest.

    The series probability of a label is the maximum over slices; the key image is the slice
    that reached it. A finding implies its label's priority only at or above the threshold.
    """
    manifest = package.manifest
    series_uids = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets}
    if len(series_uids) > 1:
        raise InvalidInput("images from more than one series were given to one model")
    size = manifest.preprocessing.size

    started = perf_counter()
    volume = decode_series(
        datasets,
        manifest.preprocessing.rescale,
        slice_transform=lambda image: resize_square(image, size),
    )
    decoded = perf_counter()
    outputs = predict(package, volume.pixels)
    inferred = perf_counter()

    findings = tuple(_finding(label, outputs[label.output], volume) for label in manifest.outputs)
    return ModelResult(
        model=package.identity,
        series_instance_uid=series_uids.pop(),
        input_sop_instance_uids=volume.sop_instance_uids,
        findings=findings,
        timings={"decode": decoded - started, "inference": inferred - decoded},
    )


def predict(package: ModelPackage, slices: np.ndarray) -> dict[str, np.ndarray]:
    """Per-slice outputs [N, K] of every ONNX output the manifest uses, batch by batch."""
    manifest = package.manifest
    session = package.session
    names = sorted({label.output for label in manifest.outputs})
    _check_signature(manifest, session.get_inputs(), session.get_outputs(), names)
    batch = manifest.runtime.batch_size
    parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for start in range(0, len(slices), batch):
        feed = np.ascontiguousarray(slices[start : start + batch, None], dtype=np.float32)
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


def _finding(label: OutputLabel, scores: np.ndarray, volume: Volume) -> Finding:
    if label.index >= scores.shape[1]:
        raise ModelPackageError(
            f"output {label.output} has {scores.shape[1]} columns, label {label.label} "
            f"uses column {label.index}"
        )
    per_slice = scores[:, label.index]
    if not np.all(np.isfinite(per_slice)):
        raise ModelPackageError(f"output {label.output} is not a finite probability")
    key = int(np.argmax(per_slice))
    probability = float(per_slice[key])
    return Finding(
        concept=label.concept.coded(),
        probability=probability,
        threshold=label.threshold,
        priority=label.priority if probability >= label.threshold else None,
        key_sop_instance_uid=volume.sop_instance_uids[key],
        key_sop_class_uid=volume.sop_class_uids[key],
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


def _linear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of linear interpolation, pixel centres aligned."""
    centre = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    centre = np.clip(centre, 0, n_in - 1)
    low = np.floor(centre).astype(np.intp)
    high = np.minimum(low + 1, n_in - 1)
    return low, high, (centre - low).astype(np.float32)
