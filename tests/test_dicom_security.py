"""Who may send to Orthanc over DICOM: the senders' allow-list and DICOM TLS with client
certificates, against real Orthancs configured by the project's own template and started by
its own code, on free ports."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from pydantic import ValidationError

from tests.conftest import stack_env
from tests.senders import storescu_as
from tests.studies import ct_studies
from triage.orthanc import OrthancClient
from triage.servers import dicom_security_values, orthanc_process, wait_for_orthanc
from triage.settings import Settings

pytestmark = pytest.mark.servers

# Distinctive patient data sent by refused senders: none of it may reach Orthanc's log.
PATIENT_NAME = "QUIXOTEZ^PRIVATEPATIENT"
PATIENT_ID = "PIDQZX48151623"
SENDERS = [
    {"name": "ct-1", "aet": "LISTED", "host": "127.0.0.1"},
    {"name": "pacs", "aet": "ELSEWHERE", "host": "192.0.2.10"},  # TEST-NET: never this host
]


@dataclass
class RunningOrthanc:
    settings: Settings
    client: OrthancClient

    def log_text(self) -> str:
        return "\n".join(path.read_text(errors="replace")
                         for path in self.settings.log_dir.iterdir() if path.is_file())

    def has_study(self, study: list[Path]) -> bool:
        uid = pydicom.dcmread(study[0], stop_before_pixels=True).StudyInstanceUID
        return self.client.lookup_study(str(uid)) is not None


@contextmanager
def running_orthanc(data_dir: Path, **extra: str) -> Iterator[RunningOrthanc]:
    saved = dict(os.environ)
    os.environ.update(stack_env(data_dir, **extra))
    try:
        settings = Settings()
        process = orthanc_process(settings)
        process.start()
        try:
            wait_for_orthanc(settings, process)
            client = OrthancClient.from_settings(settings)
            try:
                yield RunningOrthanc(settings, client)
            finally:
                client.close()
        finally:
            process.stop()
    finally:
        os.environ.clear()
        os.environ.update(saved)


# -- certificates ---------------------------------------------------------------------------

@dataclass
class Pki:
    ca: Path
    server: tuple[Path, Path]   # key, certificate
    client: tuple[Path, Path]   # signed by ``ca``
    rogue: tuple[Path, Path]    # signed by another CA, unknown to Orthanc


def _write_key(path: Path) -> rsa.RSAPrivateKey:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.TraditionalOpenSSL,
                                       serialization.NoEncryption()))
    path.chmod(0o600)
    return key


def _certificate(subject: str, key: rsa.RSAPrivateKey, issuer: x509.Name | None = None,
                 issuer_key: rsa.RSAPrivateKey | None = None, *, ca: bool = False
                 ) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer or name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False,
            encipher_only=False, decipher_only=False), critical=True)
    else:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


def _issue(directory: Path, name: str, ca_cert: x509.Certificate,
           ca_key: rsa.RSAPrivateKey) -> tuple[Path, Path]:
    key_path, cert_path = directory / f"{name}.key", directory / f"{name}.crt"
    key = _write_key(key_path)
    cert = _certificate(name, key, ca_cert.subject, ca_key)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


def make_pki(directory: Path) -> Pki:
    cas = {}
    for name in ("hospital-ca", "rogue-ca"):
        key = _write_key(directory / f"{name}.key")
        cert = _certificate(name, key, ca=True)
        (directory / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        cas[name] = (cert, key)
    return Pki(ca=directory / "hospital-ca.crt",
               server=_issue(directory, "orthanc", *cas["hospital-ca"]),
               client=_issue(directory, "modality", *cas["hospital-ca"]),
               rogue=_issue(directory, "rogue", *cas["rogue-ca"]))


# -- fixtures -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> list[list[Path]]:
    return ct_studies(tmp_path_factory.mktemp("dicomsec-studies"), 6, tag="dicomsec",
                      PatientName=PATIENT_NAME, PatientID=PATIENT_ID)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def allow_list_orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningOrthanc]:
    with running_orthanc(tmp_path_factory.mktemp("allow-list"),
                         TRIAGE_DICOM_SENDERS=json.dumps(SENDERS),
                         TRIAGE_DEVELOPMENT="false",
                         TRIAGE_ORTHANC_PASSWORD="a-real-test-password") as orthanc:
        yield orthanc


@pytest.fixture(scope="module")
def tls_orthanc(tmp_path_factory: pytest.TempPathFactory, pki: Pki
                ) -> Iterator[RunningOrthanc]:
    with running_orthanc(tmp_path_factory.mktemp("tls"),
                         TRIAGE_DICOM_SENDERS=json.dumps([{"name": "ct-1", "aet": "LISTED"}]),
                         TRIAGE_DICOM_TLS_CERT=str(pki.server[1]),
                         TRIAGE_DICOM_TLS_KEY=str(pki.server[0]),
                         TRIAGE_DICOM_TLS_TRUSTED=str(pki.ca)) as orthanc:
        yield orthanc


# -- the allow-list -------------------------------------------------------------------------

def test_only_listed_senders_store_and_refusals_carry_no_patient_data(
        allow_list_orthanc: RunningOrthanc, studies: list[list[Path]]) -> None:
    orthanc = allow_list_orthanc
    settings = orthanc.settings
    listed = storescu_as(settings, studies[0], "LISTED")
    assert listed.returncode == 0, listed.stderr
    assert orthanc.has_study(studies[0])

    unlisted = storescu_as(settings, studies[1], "INTRUDER")
    assert unlisted.returncode != 0
    assert "Calling AE Title Not Recognized" in unlisted.stderr
    # Listed, but calling from another address than the one given for it.
    wrong_host = storescu_as(settings, studies[2], "ELSEWHERE")
    assert wrong_host.returncode != 0
    assert not orthanc.has_study(studies[1]) and not orthanc.has_study(studies[2])
    assert len(orthanc.client.studies()) == 1

    log = orthanc.log_text()
    # Orthanc logs the refusal by AE title and address ...
    assert "Rejected association for remote AET INTRUDER on IP 127.0.0.1" in log
    assert "Rejected association for remote AET ELSEWHERE on IP 127.0.0.1" in log
    # ... and no patient data (the association is refused before any data set is sent).
    for secret in (PATIENT_ID, *PATIENT_NAME.split("^")):
        assert secret not in log


def test_echo_from_listed_senders_only_and_no_query_retrieve(
        allow_list_orthanc: RunningOrthanc) -> None:
    settings = allow_list_orthanc.settings
    port = str(settings.orthanc_dicom_port)

    def scu(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*argv, "-aec", settings.orthanc_aet, "127.0.0.1", port],
                              capture_output=True, text=True, timeout=30)

    assert scu("echoscu", "-aet", "LISTED").returncode == 0
    assert scu("echoscu", "-aet", "INTRUDER").returncode != 0
    find = scu("findscu", "-S", "-k", "QueryRetrieveLevel=STUDY", "-k", "PatientName=*",
               "-aet", "LISTED")
    # findscu exits 0 even then: Orthanc aborts the association at the C-FIND request.
    assert "Find Failed" in find.stderr, find.stderr
    assert "The DICOM command Find is not allowed" in allow_list_orthanc.log_text()


# -- DICOM TLS with client certificates -----------------------------------------------------

def test_mutual_tls_accepts_only_trusted_client_certificates(
        tls_orthanc: RunningOrthanc, pki: Pki, studies: list[list[Path]]) -> None:
    orthanc = tls_orthanc
    settings = orthanc.settings
    trusted = storescu_as(settings, studies[3], "LISTED", host="localhost",
                          tls=(*pki.client, pki.ca))
    assert trusted.returncode == 0, trusted.stderr
    assert orthanc.has_study(studies[3])

    refused = {
        "rogue CA": storescu_as(settings, studies[4], "LISTED", tls=(*pki.rogue, pki.ca)),
        "no client certificate": storescu_as(settings, studies[4], "LISTED",
                                             tls=(None, None, pki.ca)),
        "plain DICOM": storescu_as(settings, studies[4], "LISTED"),
        # TLS does not replace the allow-list: a trusted certificate, an unknown AE title.
        "unlisted AE": storescu_as(settings, studies[5], "INTRUDER",
                                   tls=(*pki.client, pki.ca)),
    }
    for what, result in refused.items():
        assert result.returncode != 0, f"{what} was accepted"
    assert "Calling AE Title Not Recognized" in refused["unlisted AE"].stderr
    assert not orthanc.has_study(studies[4]) and not orthanc.has_study(studies[5])
    assert len(orthanc.client.studies()) == 1

    log = orthanc.log_text()
    assert "certificate verify failed" in log
    assert "peer did not return a certificate" in log
    for secret in (PATIENT_ID, *PATIENT_NAME.split("^")):
        assert secret not in log


# -- configuration errors, before Orthanc starts --------------------------------------------

def _settings(tmp_path: Path, **fields: object) -> Settings:
    """Settings from ``fields`` alone (a running Orthanc's fixture may have set the
    environment)."""
    defaults: dict[str, object] = {"development": True, "dicom_senders": [],
                                   "dicom_tls_cert": None, "dicom_tls_key": None,
                                   "dicom_tls_trusted": None}
    return Settings(data_dir=tmp_path, **{**defaults, **fields})  # type: ignore[arg-type]


def test_configuration_mistakes_are_refused(tmp_path: Path, pki: Pki) -> None:
    with pytest.raises(ValueError, match="TRIAGE_DICOM_SENDERS must list"):
        dicom_security_values(_settings(tmp_path, development=False))
    with pytest.raises(ValueError, match="give a host for b"):
        dicom_security_values(_settings(tmp_path, dicom_senders=[
            {"name": "a", "aet": "A", "host": "10.0.0.1"}, {"name": "b", "aet": "B"}]))
    with pytest.raises(ValueError, match="unique"):
        dicom_security_values(_settings(tmp_path, dicom_senders=[
            {"name": "a", "aet": "A"}, {"name": "a", "aet": "B"}]))
    with pytest.raises(ValueError, match="together"):
        dicom_security_values(_settings(tmp_path, dicom_tls_cert=pki.server[1]))
    with pytest.raises(ValueError, match="not found"):
        dicom_security_values(_settings(tmp_path, dicom_tls_cert=pki.server[1],
                                        dicom_tls_key=tmp_path / "missing.key",
                                        dicom_tls_trusted=pki.ca))
    with pytest.raises(ValidationError, match="an IP address"):
        _settings(tmp_path, dicom_senders=[{"name": "a", "aet": "A", "host": "ct1.example"}])
    with pytest.raises(ValidationError):
        _settings(tmp_path, dicom_senders=[{"name": "a", "aet": "AN_AE_TITLE_TOO_LONG"}])


def test_development_default_keeps_any_sender(tmp_path: Path) -> None:
    values = dicom_security_values(_settings(tmp_path))
    assert values["DICOM_ALWAYS_ALLOW_STORE"] == "true"
    assert values["DICOM_TLS_ENABLED"] == "false"
    assert json.loads(values["DICOM_MODALITIES"]) == {}
