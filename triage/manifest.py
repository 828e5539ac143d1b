"""The manifest of a model package (``models/<id>/manifest.yaml``) and its validation.

A manifest locks a model version: who made it, what it is for, its regulatory status, the
SHA-256 of its weights, which series it applies to, how pixels are prepared, and which coded
finding each output is, with the threshold and the priority that finding implies
(DESIGN.md, "Models").
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from triage.errors import ModelPackageError
from triage.findings import CodedConcept
from triage.priority import PriorityClass

MANIFEST_NAME = "manifest.yaml"

_UID = Annotated[str, Field(pattern=r"^[0-9]+(\.[0-9]+)*$", max_length=64)]
_NAME = Annotated[str, Field(min_length=1, max_length=64)]


class _Strict(BaseModel):
    # Unknown keys are refused so that a typo in a manifest cannot silently drop a setting.
    model_config = ConfigDict(extra="forbid", frozen=True)


class Rescale(StrEnum):
    """How stored pixel values are turned into model input."""

    HU = "hu"  # Rescale Slope/Intercept applied (PS3.3 C.11.1.1.2): Hounsfield units for CT
    RAW = "raw"  # stored values, MONOCHROME1 inverted so that higher is brighter


class SliceReduction(StrEnum):
    """How per-slice probabilities become one probability per series."""

    MAX = "max"
    MEAN = "mean"


class InputMode(StrEnum):
    """How a series becomes model input."""

    SLICE = "slice"  # each image on its own: [N, channels, size, size]
    STACK = "stack"  # each image with its neighbours as channels: [N, stack_size, size, size]
    VOLUME = "volume"  # the series resampled to ``depth`` images: [1, 1, depth, size, size]


class Normalisation(StrEnum):
    """Per-image intensity normalisation, after the window."""

    NONE = "none"
    MINMAX = "minmax"  # to 0..1
    ZSCORE = "zscore"  # mean 0, standard deviation 1


class Window(_Strict):
    """A value window: values are clipped to centre +- width/2 and mapped to 0..1."""

    center: float
    width: float = Field(gt=0)


class Range(_Strict):
    """An inclusive numeric range; either end may be left open."""

    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min}) exceeds max ({self.max})")
        return self

    def __contains__(self, value: float) -> bool:
        return (self.min is None or value >= self.min) and (self.max is None or value <= self.max)

    def __str__(self) -> str:
        low = "" if self.min is None else f"{self.min:g}"
        high = "" if self.max is None else f"{self.max:g}"
        return f"{low}-{high}" if low and high else (f">= {low}" if low else f"<= {high}")


class Orientation(StrEnum):
    """Which image planes a model accepts (Image Orientation (Patient), PS3.3 C.7.6.2.1.1)."""

    ANY = "any"
    AXIAL = "axial"


class Applicability(_Strict):
    """Which series a model may analyse (its intended use, in DICOM attributes).

    ``body_parts`` match Body Part Examined and ``descriptions`` match the study or series
    description (shell-style patterns, case-insensitive); when either list is given, a series
    must match one of them. A series that fails a series selector (slice thickness, image
    type, orientation) can still be chosen when ``fallback_largest`` is set: then the largest
    series of the right modality and storage class is analysed.
    """

    modalities: list[Annotated[str, Field(pattern=r"^[A-Z0-9_]{1,16}$")]] = Field(min_length=1)
    sop_class_uids: list[_UID] = Field(default_factory=list)
    body_parts: list[_NAME] = Field(default_factory=list)
    descriptions: list[_NAME] = Field(default_factory=list)
    min_instances: int = Field(default=1, ge=1)
    max_instances: int = Field(default=10_000, ge=1)
    slice_thickness_mm: Range | None = None
    image_type: list[_NAME] = Field(
        default_factory=list, description="values Image Type must contain, e.g. ORIGINAL"
    )
    orientation: Orientation = Orientation.ANY
    patient_age_years: Range | None = None
    fallback_largest: bool = False

    @model_validator(mode="after")
    def _range(self) -> Applicability:
        if self.min_instances > self.max_instances:
            raise ValueError(
                f"min_instances ({self.min_instances}) exceeds max_instances ({self.max_instances})"
            )
        return self


class Preprocessing(_Strict):
    """How a series becomes the model input tensor (see ``InputMode``)."""

    input: _NAME
    size: int = Field(ge=8, le=2048)
    rescale: Rescale
    pixel_spacing_mm: float | None = Field(
        default=None, gt=0, le=100,
        description="Resample each image to this pixel size (mm) around its centre instead "
        "of resizing the whole image to `size`; images without a usable Pixel Spacing are "
        "then not analysed")
    window: Window | None = None
    normalisation: Normalisation = Normalisation.NONE
    channels: Literal[1, 3] = 1
    mode: InputMode = InputMode.SLICE
    stack_size: int = Field(default=3, ge=3, le=31)
    depth: int | None = Field(default=None, ge=2, le=1024)
    slice_reduction: SliceReduction = SliceReduction.MAX
    streaming: bool = Field(
        default=False, description="Analyse images as they arrive, before the study is "
        "complete (triage.streaming). Only for models that see one image at a time and "
        "reduce by maximum: each image's score then never depends on the others, and a "
        "positive part of a series stays positive when the series is complete")

    @model_validator(mode="after")
    def _mode_settings(self) -> Preprocessing:
        if self.streaming and (self.mode is not InputMode.SLICE
                               or self.slice_reduction is not SliceReduction.MAX):
            raise ValueError("streaming needs mode slice and slice_reduction max (a score of "
                             f"one image alone, reduced by maximum); got mode {self.mode}, "
                             f"slice_reduction {self.slice_reduction}")
        if self.mode is InputMode.STACK and self.stack_size % 2 == 0:
            raise ValueError(f"stack_size must be odd, got {self.stack_size}")
        if self.mode is InputMode.VOLUME and self.depth is None:
            raise ValueError("mode volume needs depth (the number of images the model takes)")
        if self.channels == 3 and self.mode is not InputMode.SLICE:
            raise ValueError(f"channels 3 (greyscale repeated) needs mode slice, got {self.mode}")
        return self


class Concept(_Strict):
    """A coded concept as in a DICOM Code Sequence (PS3.3 8.8)."""

    code_value: Annotated[str, Field(min_length=1, max_length=64)]
    scheme_designator: Annotated[str, Field(min_length=1, max_length=16)]
    code_meaning: Annotated[str, Field(min_length=1, max_length=64)]

    def coded(self) -> CodedConcept:
        return CodedConcept(self.code_value, self.scheme_designator, self.code_meaning)


class OutputLabel(_Strict):
    """One finding the model reports: a column of one ONNX output."""

    label: _NAME
    output: _NAME
    index: int = Field(default=0, ge=0)
    concept: Concept
    threshold: float = Field(ge=0.0, le=1.0)
    priority: PriorityClass


class ExecutionProvider(StrEnum):
    """onnxruntime execution providers a manifest may ask for, in order of preference."""

    CUDA = "CUDAExecutionProvider"
    CPU = "CPUExecutionProvider"


class Runtime(_Strict):
    """onnxruntime settings of the model's session.

    Providers that this machine lacks are passed over; the CPU is always the last resort.
    """

    providers: list[ExecutionProvider] = Field(default_factory=lambda: [ExecutionProvider.CPU])
    threads: int = Field(default=1, ge=1, le=64)
    batch_size: int = Field(default=8, ge=1, le=1024)


class Manifest(_Strict):
    """The whole ``manifest.yaml`` of a model package."""

    id: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]{0,63}$")]
    version: Annotated[str, Field(pattern=r"^[0-9A-Za-z][0-9A-Za-z.+-]{0,31}$")]
    name: _NAME
    manufacturer: _NAME
    description: Annotated[str, Field(min_length=1)]
    intended_use: Annotated[str, Field(min_length=1)]
    regulatory_status: _NAME
    onnx_file: Annotated[str, Field(pattern=r"^[^/\\]+\.onnx$")]
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    applicability: Applicability
    preprocessing: Preprocessing
    outputs: list[OutputLabel] = Field(min_length=1)
    runtime: Runtime = Field(default_factory=Runtime)
    display_window: Window | None = Field(
        default=None, description="The window the key image is shown in on the study page "
        "(e.g. a brain window for head CT); unset: the preprocessing window, else the "
        "image's own 1st to 99th percentile")

    @model_validator(mode="after")
    def _unique_labels(self) -> Manifest:
        labels = [o.label for o in self.outputs]
        duplicates = sorted({label for label in labels if labels.count(label) > 1})
        if duplicates:
            raise ValueError(f"duplicate output labels: {', '.join(duplicates)}")
        return self

    @property
    def key(self) -> str:
        """``id@version``, how the model is named in job ids and SR UIDs."""
        return f"{self.id}@{self.version}"


def load_manifest(path: str | Path) -> Manifest:
    """Read and validate a manifest; any problem raises ModelPackageError naming file and field."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ModelPackageError(f"{path}: cannot read manifest: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelPackageError(f"{path}: manifest must be a mapping, got {type(data).__name__}")
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        raise ModelPackageError(f"{path}: {_describe(exc)}") from exc


def _describe(exc: ValidationError) -> str:
    """One line per problem: ``field.path: message (got value)``."""
    lines = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"]) or "(top level)"
        # Our own validators already put the offending values in the message.
        got = "" if error["type"] == "value_error" else f" (got {_short(error.get('input'))})"
        lines.append(f"{where}: {error['msg']}{got}")
    return "; ".join(lines)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
