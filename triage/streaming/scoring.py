"""Scoring decoded images one by one with a streaming model."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from triage.inference import model_input, predict
from triage.manifest import InputMode, SliceReduction
from triage.pixels import DecodedInstance
from triage.registry import ModelPackage
from triage.streaming.cache import ScoredImage


def streams(package: ModelPackage) -> bool:
    """Whether ``package`` analyses images as they arrive (its manifest asks to, and it
    scores images one at a time and reduces by maximum, which the manifest also checks)."""
    prep = package.manifest.preprocessing
    return (prep.streaming and prep.mode is InputMode.SLICE
            and prep.slice_reduction is SliceReduction.MAX)


def usable(decoded: DecodedInstance) -> bool:
    """An image that decoded into exactly one slice. Anything else (a header or pixel
    problem, a multi-frame image) is left to the analysis of the complete series, which
    handles and reports it as it always has."""
    return (decoded.header_error is None and decoded.pixel_error is None
            and len(decoded.frames) == 1)


def score(package: ModelPackage, images: Sequence[tuple[DecodedInstance, str]]
          ) -> list[ScoredImage]:
    """The scores of ``images`` (decoded for ``package``, each with its Orthanc id, all
    ``usable``), in the order given, in batches of the manifest's batch size."""
    if not images:
        return []
    manifest = package.manifest
    names = sorted({label.output for label in manifest.outputs})
    pixels = np.stack([decoded.frames[0] for decoded, _ in images]).astype(np.float32,
                                                                            copy=False)
    outputs = predict(package, model_input(manifest.preprocessing, pixels))
    return [ScoredImage.of(decoded.header, orthanc_id,
                           {name: [float(v) for v in outputs[name][row]] for name in names})
            for row, (decoded, orthanc_id) in enumerate(images)]
