"""Which installed versions a worker runs, and in which role, with and without the records."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from triage.registry import ModelPackage
from triage.settings import PROJECT_ROOT, Settings
from triage.vigilance.states import VersionStates, assign, version_key

HEAD_CT = PROJECT_ROOT / "models" / "head-ct-hyperdensity"
MODEL = "head-ct-hyperdensity"


def _package(folder: Path, version: str) -> ModelPackage:
    shutil.copytree(HEAD_CT, folder)
    manifest = yaml.safe_load((folder / "manifest.yaml").read_text())
    manifest["version"] = version
    (folder / "manifest.yaml").write_text(yaml.safe_dump(manifest))
    return ModelPackage.load(folder)


def _versions(packages: tuple[ModelPackage, ...]) -> list[str]:
    return [p.manifest.version for p in packages]


@pytest.fixture
def installed(tmp_path: Path) -> list[ModelPackage]:
    return [_package(tmp_path / v, v) for v in ("1.10.0", "1.9.2", "2.0.0-rc1")]


def test_versions_order_naturally() -> None:
    assert sorted(["1.10.0", "1.9.2", "2.0.0-rc2", "2.0.0-rc1", "1.9.10"], key=version_key) == [
        "1.9.2", "1.9.10", "1.10.0", "2.0.0-rc1", "2.0.0-rc2"]


def test_without_records_only_the_lowest_version_runs(installed: list[ModelPackage]) -> None:
    roles = assign(installed, None)
    assert _versions(roles.active) == ["1.9.2"]
    assert roles.shadow == ()


def test_records_decide_the_roles(installed: list[ModelPackage]) -> None:
    states = {(MODEL, "1.9.2"): "retired", (MODEL, "1.10.0"): "active",
              (MODEL, "2.0.0-rc1"): "shadow"}
    roles = assign(installed, states)
    assert _versions(roles.active) == ["1.10.0"]
    assert _versions(roles.shadow) == ["2.0.0-rc1"]
    assert roles.shadow_package(MODEL, "2.0.0-rc1") is not None
    assert roles.shadow_package(MODEL, "1.9.2") is None


def test_an_unregistered_version_waits_unless_it_is_the_only_one(
        installed: list[ModelPackage]) -> None:
    roles = assign(installed, {(MODEL, "1.9.2"): "active"})
    assert _versions(roles.active) == ["1.9.2"] and roles.shadow == ()
    alone = assign(installed[:1], {})
    assert _versions(alone.active) == ["1.10.0"]


def test_a_model_without_an_active_version_runs_nothing_active(
        installed: list[ModelPackage]) -> None:
    roles = assign(installed, {(MODEL, "1.9.2"): "shadow", (MODEL, "1.10.0"): "retired",
                               (MODEL, "2.0.0-rc1"): "retired"})
    assert roles.active == () and _versions(roles.shadow) == ["1.9.2"]


def test_a_worker_registers_its_versions_then_keeps_the_states_when_postgres_goes(
        installed: list[ModelPackage], vigilance_database: Settings,
        vigilance_db: object) -> None:
    now = [0.0]
    states = VersionStates(vigilance_database, installed, clock=lambda: now[0])
    roles = states.roles()  # registers in version order: the lowest becomes active
    assert _versions(roles.active) == ["1.9.2"]
    assert sorted(_versions(roles.shadow)) == ["1.10.0", "2.0.0-rc1"]
    states.settings = Settings(data_dir=vigilance_database.data_dir,
                               database_url="postgresql://triage:x@127.0.0.1:1/none")
    now[0] += vigilance_database.vigilance_states_seconds
    kept = states.roles()  # unreachable: the last states read stay
    assert _versions(kept.active) == ["1.9.2"]
    assert sorted(_versions(kept.shadow)) == ["1.10.0", "2.0.0-rc1"]
