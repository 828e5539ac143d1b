"""Model packages: reproducible build, manifest validation, hash check, one session per process."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import yaml
from pydicom.sr.codedict import codes

from triage.errors import ModelPackageError
from triage.manifest import load_manifest
from triage.priority import PriorityClass
from triage.registry import ModelPackage, ModelRegistry

MODELS = Path(__file__).resolve().parents[1] / "models"
HEAD_CT = MODELS / "head-ct-hyperdensity"


def test_build_is_byte_identical_to_the_committed_model(tmp_path: Path) -> None:
    outputs = [tmp_path / "first.onnx", tmp_path / "second.onnx"]
    for output in outputs:
        subprocess.run(
            [sys.executable, str(HEAD_CT / "build_model.py"), str(output)],
            check=True,
            capture_output=True,
        )
    committed = (HEAD_CT / "model.onnx").read_bytes()
    assert outputs[0].read_bytes() == outputs[1].read_bytes() == committed
    assert hashlib.sha256(committed).hexdigest() == load_manifest(HEAD_CT / "manifest.yaml").sha256


def test_model_graph_is_small_and_matches_its_manifest() -> None:
    manifest = load_manifest(HEAD_CT / "manifest.yaml")
    model = onnx.load(HEAD_CT / "model.onnx")
    onnx.checker.check_model(model, full_check=True)
    assert (HEAD_CT / "model.onnx").stat().st_size < 8_000
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [17]
    assert [i.name for i in model.graph.input] == [manifest.preprocessing.input]
    assert {o.output for o in manifest.outputs} <= {o.name for o in model.graph.output}
    assert not model.graph.initializer or all(
        len(t.raw_data) <= 16 for t in model.graph.initializer
    ), "a rule-based model carries constants, not weight tensors"


def test_head_ct_manifest_names_intracranial_hemorrhage_as_critical() -> None:
    manifest = load_manifest(HEAD_CT / "manifest.yaml")
    (label,) = manifest.outputs
    ich = codes.SCT.IntracranialHemorrhage
    assert (label.concept.code_value, label.concept.scheme_designator) == (ich.value, "SCT")
    assert label.priority is PriorityClass.CRITICAL
    assert manifest.regulatory_status == "research-use-only"
    assert manifest.applicability.modalities == ["CT"]


def _write_manifest(folder: Path, **changes: object) -> Path:
    data = yaml.safe_load((HEAD_CT / "manifest.yaml").read_text())
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        target = data
        for part in parents:
            target = target[int(part)] if part.isdigit() else target[part]
        target[leaf] = value
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "manifest.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"outputs__0__threshold": 1.5}, ["outputs.0.threshold", "1.5"]),
        ({"outputs__0__priority": "asap"}, ["outputs.0.priority", "'asap'"]),
        ({"sha256": "not-a-hash"}, ["sha256", "'not-a-hash'"]),
        ({"preprocessing__rescale": "window"}, ["preprocessing.rescale", "'window'"]),
        ({"applicability__min_instances": 50, "applicability__max_instances": 5}, ["50", "5"]),
        ({"runtime__thread": 2}, ["runtime.thread", "Extra inputs are not permitted"]),
    ],
)
def test_manifest_errors_name_file_field_and_value(
    tmp_path: Path, changes: dict[str, object], expected: list[str]
) -> None:
    path = _write_manifest(tmp_path / "bad", **changes)
    with pytest.raises(ModelPackageError) as caught:
        load_manifest(path)
    message = str(caught.value)
    assert message.startswith(str(path))
    for part in expected:
        assert part in message


def test_manifest_that_is_not_yaml_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "manifest.yaml"
    path.write_text("id: [unclosed\n")
    with pytest.raises(ModelPackageError, match="cannot read manifest"):
        load_manifest(path)


def _copy_package(models_dir: Path, name: str) -> Path:
    folder = models_dir / name
    shutil.copytree(HEAD_CT, folder, ignore=shutil.ignore_patterns("__pycache__"))
    return folder


def test_registry_refuses_a_hash_mismatch_and_keeps_the_others(tmp_path: Path) -> None:
    _copy_package(tmp_path, "good")
    tampered = _copy_package(tmp_path, "tampered")
    data = bytearray((tampered / "model.onnx").read_bytes())
    data[-1] ^= 0xFF
    (tampered / "model.onnx").write_bytes(bytes(data))
    broken = tmp_path / "broken"
    _write_manifest(broken, outputs__0__threshold=-1)

    registry = ModelRegistry.load(tmp_path)

    assert [p.folder.name for p in registry.packages] == ["good"]
    assert set(registry.errors) == {"tampered", "broken"}
    assert "does not match manifest sha256" in registry.errors["tampered"]
    assert "outputs.0.threshold" in registry.errors["broken"]
    assert registry.get("head-ct-hyperdensity").folder.name == "good"


def test_session_is_created_once_per_process() -> None:
    first = ModelRegistry.load(MODELS).get("head-ct-hyperdensity")
    second = ModelPackage.load(HEAD_CT)
    assert first is not second
    assert first.session is second.session
    assert first.session.get_providers() == ["CPUExecutionProvider"]
    assert first.session.get_session_options().intra_op_num_threads == 1


def test_identity_names_the_locked_version() -> None:
    identity = ModelPackage.load(HEAD_CT).identity
    manifest = load_manifest(HEAD_CT / "manifest.yaml")
    assert (identity.id, identity.version) == ("head-ct-hyperdensity", manifest.version)
    assert identity.weights_sha256 == manifest.sha256
    assert identity.regulatory_status == "research-use-only"
