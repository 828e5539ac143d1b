"""The model packages a worker can run, each verified against its manifest's SHA-256.

Weights are loaded once per process, never per study (DESIGN.md, "Models"): sessions live in a
module-level cache keyed by the ONNX file and its verified hash.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field
from pathlib import Path

import onnxruntime as ort

from triage.errors import ModelPackageError
from triage.findings import ModelIdentity
from triage.manifest import MANIFEST_NAME, ExecutionProvider, Manifest, load_manifest

_SESSIONS: dict[tuple[str, str], ort.InferenceSession] = {}
_SESSIONS_LOCK = threading.Lock()


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class ModelPackage:
    """A model folder whose weights match its manifest."""

    manifest: Manifest
    folder: Path

    @classmethod
    def load(cls, folder: str | Path) -> ModelPackage:
        """Validate the manifest of ``folder`` and check the weights' hash against it."""
        folder = Path(folder).resolve()
        manifest = load_manifest(folder / MANIFEST_NAME)
        onnx_path = folder / manifest.onnx_file
        if not onnx_path.is_file():
            raise ModelPackageError(f"{onnx_path}: model file named in the manifest is missing")
        actual = sha256_of(onnx_path)
        if actual != manifest.sha256:
            raise ModelPackageError(
                f"{onnx_path}: SHA-256 {actual} does not match manifest sha256 {manifest.sha256}"
            )
        return cls(manifest, folder)

    @property
    def onnx_path(self) -> Path:
        return self.folder / self.manifest.onnx_file

    @property
    def identity(self) -> ModelIdentity:
        m = self.manifest
        return ModelIdentity(
            id=m.id,
            version=m.version,
            name=m.name,
            manufacturer=m.manufacturer,
            weights_sha256=m.sha256,
            regulatory_status=m.regulatory_status,
        )

    @property
    def session(self) -> ort.InferenceSession:
        """The process-wide onnxruntime session of this model (created on first use)."""
        return self._cached_session(str(self.onnx_path))

    def _cached_session(self, name: str) -> ort.InferenceSession:
        key = (name, self.manifest.sha256)
        with _SESSIONS_LOCK:
            session = _SESSIONS.get(key)
            if session is None:
                session = _SESSIONS[key] = _create_session(self.onnx_path, self.manifest)
        return session


@dataclass(frozen=True)
class BackgroundPackage(ModelPackage):
    """A package run as background work (a shadow trial), with an onnxruntime session of its
    own: created by the low-priority thread that first uses it, so the session's threads
    inherit that thread's CPU priority, and never shared with the package's active runs."""

    @property
    def session(self) -> ort.InferenceSession:
        return self._cached_session(f"background:{self.onnx_path}")


def _create_session(onnx_path: Path, manifest: Manifest) -> ort.InferenceSession:
    # Read the bytes and hash them again: the file may have changed since the package loaded,
    # and the session must run exactly the weights the manifest names.
    data = onnx_path.read_bytes()
    if hashlib.sha256(data).hexdigest() != manifest.sha256:
        raise ModelPackageError(f"{onnx_path}: file changed after it was verified")
    options = ort.SessionOptions()
    options.intra_op_num_threads = manifest.runtime.threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(data, options, providers=providers(manifest))
    except Exception as exc:  # onnxruntime raises its own, unexported exception types
        raise ModelPackageError(f"{onnx_path}: onnxruntime cannot load the model: {exc}") from exc


def providers(manifest: Manifest) -> list[str]:
    """The manifest's execution providers this machine has, CPU always last."""
    available = set(ort.get_available_providers())
    wanted = [p.value for p in manifest.runtime.providers if p.value in available]
    cpu = ExecutionProvider.CPU.value
    return [p for p in wanted if p != cpu] + [cpu]


@dataclass
class ModelRegistry:
    """Every valid package under a models directory, and why the others were refused."""

    packages: list[ModelPackage] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, models_dir: str | Path) -> ModelRegistry:
        """Load ``models_dir/*/manifest.yaml``; a bad package is refused, the others kept."""
        registry = cls()
        for manifest_path in sorted(Path(models_dir).glob(f"*/{MANIFEST_NAME}")):
            folder = manifest_path.parent
            try:
                registry.packages.append(ModelPackage.load(folder))
            except ModelPackageError as exc:
                registry.errors[folder.name] = str(exc)
        return registry

    def get(self, model_id: str) -> ModelPackage:
        """The package of ``model_id``; KeyError when it is absent or was refused."""
        for package in self.packages:
            if package.manifest.id == model_id:
                return package
        raise KeyError(model_id)
