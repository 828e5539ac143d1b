"""The images built from deploy/ (deploy/build-images.sh; built and run by the deployment
tests, not here): Orthanc's container renders the same configuration template as
`triage up`, the same way, for the same settings."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest

from triage.servers import render_orthanc_config
from triage.settings import PROJECT_ROOT, Settings

ENTRYPOINT = PROJECT_ROOT / "deploy" / "orthanc" / "entrypoint.py"
# What a container does differently from a local stack, on purpose.
CONTAINER_ONLY = {"StorageDirectory", "IndexDirectory", "RemoteAccessAllowed", "Plugins"}


def _parse(path: Path) -> dict:
    text = path.read_text()
    return json.loads("\n".join(line for line in text.splitlines()
                                if not line.lstrip().startswith("//")))


def _entrypoint():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("orthanc_entrypoint", ENTRYPOINT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("senders", [None, [{"name": "ct1", "aet": "CT_SCANNER",
                                              "host": "10.1.2.3"}]])
def test_the_orthanc_image_renders_the_same_configuration(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, senders: list | None) -> None:
    for name in ("cert.pem", "key.pem", "ca.pem"):
        (tmp_path / name).write_text("placeholder")
    env = {"TRIAGE_ORTHANC_PASSWORD": "a-real-secret-9", "TRIAGE_ORTHANC_AET": "TRIAGE_AI",
           "TRIAGE_STABLE_AGE": "7", "TRIAGE_DICOM_TLS_CERT": str(tmp_path / "cert.pem"),
           "TRIAGE_DICOM_TLS_KEY": str(tmp_path / "key.pem"),
           "TRIAGE_DICOM_TLS_TRUSTED": str(tmp_path / "ca.pem"),
           "ORTHANC_CONFIG_DIR": str(tmp_path / "image")}
    if senders is not None:
        env["TRIAGE_DICOM_SENDERS"] = json.dumps(senders)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    entrypoint = _entrypoint()
    # In the image the template sits at /usr/share/triage (deploy/orthanc/Dockerfile).
    monkeypatch.setattr(entrypoint, "TEMPLATE",
                        PROJECT_ROOT / "orthanc" / "orthanc.json.template")
    image = _parse(entrypoint.render())
    local = _parse(render_orthanc_config(Settings(
        data_dir=tmp_path / "local", orthanc_password="a-real-secret-9",
        orthanc_aet="TRIAGE_AI", stable_age=7, orthanc_http_port=8042,
        orthanc_dicom_port=4242, dicom_senders=senders or [],
        dicom_tls_cert=tmp_path / "cert.pem", dicom_tls_key=tmp_path / "key.pem",
        dicom_tls_trusted=tmp_path / "ca.pem")))
    assert set(image) == set(local)
    differing = {key for key in local if image[key] != local[key]}
    assert differing <= CONTAINER_ONLY, {k: (image[k], local[k]) for k in differing}
    assert image["RemoteAccessAllowed"] is True and image["DicomTlsEnabled"] is True
    assert set(local["Plugins"]) <= set(image["Plugins"])


def test_the_orthanc_image_carries_the_template_where_its_entrypoint_reads_it() -> None:
    dockerfile = (PROJECT_ROOT / "deploy" / "orthanc" / "Dockerfile").read_text()
    assert f"COPY orthanc/orthanc.json.template {_entrypoint().TEMPLATE}" in dockerfile
    for name in ("deploy/Dockerfile", "deploy/orthanc/Dockerfile", "deploy/redis/Dockerfile",
                 "deploy/postgres/Dockerfile"):
        stages = [line for line in (PROJECT_ROOT / name).read_text().splitlines()
                  if line.startswith("FROM ")]
        # Official base names: a hospital builds from the official image, the tests here
        # from a base made with mmdebstrap and tagged with the same name.
        assert stages[-1] == "FROM debian:bookworm-slim", name


@pytest.mark.parametrize("placeholder", ["changeme", "Password", "orthanc"])
def test_every_image_refuses_placeholder_passwords(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, placeholder: str) -> None:
    """Each entrypoint stops before starting its server when a password is an example value."""
    monkeypatch.setenv("ORTHANC_CONFIG_DIR", str(tmp_path / "image"))
    monkeypatch.setenv("TRIAGE_ORTHANC_PASSWORD", placeholder)
    with pytest.raises(SystemExit) as refused:
        _entrypoint().render()
    assert refused.value.code == 1
    assert not (tmp_path / "image" / "orthanc.json").exists()
    scripts = {
        "postgres": {"POSTGRES_PASSWORD": placeholder, "POSTGRES_USER": "orthanc",
                     "POSTGRES_DB": "orthanc", "PGDATA": str(tmp_path / "pgdata")},
        "redis": {"REDIS_PASSWORD": placeholder},
    }
    for name, env in scripts.items():
        script = PROJECT_ROOT / "deploy" / name / "entrypoint.sh"
        done = subprocess.run(["sh", str(script)], env={"PATH": "/usr/bin:/bin", **env},
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 1, (name, done.stderr)
        assert "placeholder" in done.stderr, (name, done.stderr)
    assert not (tmp_path / "pgdata").exists()
