"""The API over HTTPS with the hospital's certificate (here one from a test CA): pages, API
and the session cookie, which is then marked Secure; plain HTTP is not answered."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from tests.conftest import Servers, free_port
from tests.test_dicom_security import make_pki
from triage.servers import ManagedProcess
from triage.settings import Settings
from triage.tokens import Role, create_token

pytestmark = pytest.mark.servers


def test_the_api_answers_over_https_only(clean_servers: Servers, tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    key, cert = pki.server
    port = free_port()
    env = {**os.environ, "TRIAGE_API_PORT": str(port), "TRIAGE_API_WORKERS": "1",
           "TRIAGE_API_TLS_CERT": str(cert), "TRIAGE_API_TLS_KEY": str(key)}
    api = ManagedProcess("api", [sys.executable, "-m", "triage.cli", "api"],
                         tmp_path / "api.log", env=env)
    api.start()
    base = f"https://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                health = httpx.get(base + "/healthz", verify=str(pki.ca), timeout=2)
                break
            except httpx.TransportError:
                assert api.alive(), (tmp_path / "api.log").read_text()
                assert time.monotonic() < deadline, "the HTTPS API did not start"
                time.sleep(0.2)
        assert health.status_code == 200
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
        with pytest.raises(httpx.ConnectError):  # a certificate nobody here trusts
            httpx.get(base + "/healthz", verify=str(tmp_path / "rogue-ca.crt"), timeout=2)
        token = create_token(clean_servers.redis, role=Role.RADIOLOGIST, owner="dr.tls")
        with httpx.Client(base_url=base, verify=str(pki.ca), timeout=10) as client:
            signed_in = client.post("/login", data={"token": token})
            assert signed_in.status_code == 303
            assert "Secure" in signed_in.headers["set-cookie"]
            assert client.get("/api/v1/worklist").status_code == 200
    finally:
        api.stop()


def test_the_certificate_and_its_key_come_together(tmp_path: Path) -> None:
    cert = tmp_path / "api.crt"
    cert.write_text("-")
    with pytest.raises(ValidationError, match="TRIAGE_API_TLS_KEY"):
        Settings(data_dir=tmp_path, api_tls_cert=cert)
    with pytest.raises(ValidationError, match="does not exist"):
        Settings(data_dir=tmp_path, api_tls_cert=cert, api_tls_key=tmp_path / "missing.key")
    assert Settings(data_dir=tmp_path, api_tls_cert=cert, api_tls_key=cert,
                    api_port=8443).api_base_url == "https://127.0.0.1:8443"
