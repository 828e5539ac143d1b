#!/usr/bin/python3
"""Renders orthanc/orthanc.json.template for the container, then runs Orthanc as PID 1.

The template is the one `triage up` renders (triage/servers.py, render_orthanc_config): the
placeholders are filled the same way (string.Template, JSON-encoded values) from the variables
of the same names as the service's settings:

  TRIAGE_ORTHANC_PASSWORD (or TRIAGE_ORTHANC_PASSWORD_FILE, a secret)   required
  TRIAGE_ORTHANC_USERNAME (triage)  TRIAGE_ORTHANC_AET (TRIAGE)  TRIAGE_STABLE_AGE (5)
  TRIAGE_DICOM_SENDERS  JSON list of {"name", "aet", "host"?}: only they may echo and store;
                        unset: any AE title may (as in development)
  TRIAGE_DICOM_TLS_CERT, TRIAGE_DICOM_TLS_KEY, TRIAGE_DICOM_TLS_TRUSTED   files, all or none

What differs from a local `triage up`: the ports are fixed (8042 REST, 4242 DICOM; publish
them as needed), the storage is the volume /var/lib/orthanc/db, the REST API accepts remote
callers (other containers; authentication stays on), and with POSTGRES_HOST set the index
lives in PostgreSQL (POSTGRES_PORT 5432, POSTGRES_DB orthanc, POSTGRES_USER orthanc,
POSTGRES_PASSWORD or POSTGRES_PASSWORD_FILE). The configuration is written to
$ORTHANC_CONFIG_DIR/orthanc.json (mode 0600), never to the image.

`orthanc-entrypoint healthcheck`: exit 0 when GET /system answers with the credentials.
"""

from __future__ import annotations

import base64
import json
import os
import re
import sys
import urllib.request
from pathlib import Path
from string import Template

TEMPLATE = Path("/usr/share/triage/orthanc.json.template")
PLUGIN_DIR = Path("/usr/share/orthanc/plugins")
PLUGINS = ("libOrthancDicomWeb.so", "libOrthancGdcm.so")
POSTGRES_INDEX = "libOrthancPostgreSQLIndex.so"
STORAGE_DIR = "/var/lib/orthanc/db"
HTTP_PORT, DICOM_PORT = 8042, 4242
# As triage/servers.py: senders only call in, this host and port are never dialled.
SENDER_NO_HOST, SENDER_PORT = "sender.invalid", 104


def fail(message: str) -> None:
    print(f"orthanc-entrypoint: {message}", file=sys.stderr)
    sys.exit(1)


# Refused as passwords: what an example file or a tutorial would hold.
PLACEHOLDERS = {"changeme", "change-me", "password", "secret", "orthanc", "postgres"}


def secret(name: str, default: str | None = None) -> str | None:
    path = os.environ.get(name + "_FILE")
    value = Path(path).read_text().strip() if path else os.environ.get(name, default)
    if value and value.lower() in PLACEHOLDERS:
        fail(f"{name} is a placeholder; set a real one")
    return value


def dicom_security_values() -> dict[str, str]:
    """The DICOM allow-list and TLS values, as triage/servers.py dicom_security_values."""
    senders = json.loads(os.environ.get("TRIAGE_DICOM_SENDERS") or "[]")
    for sender in senders:
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,32}", str(sender.get("name", ""))) \
                or not sender.get("aet"):
            fail("TRIAGE_DICOM_SENDERS: each sender needs a name (letters, digits, - _) and aet")
    with_host = [s for s in senders if s.get("host")]
    if with_host and len(with_host) != len(senders):
        fail("TRIAGE_DICOM_SENDERS: when one sender gives its host, all of them must")
    modalities = {
        f"sender-{s['name']}": {
            "AET": s["aet"], "Host": s.get("host") or SENDER_NO_HOST, "Port": SENDER_PORT,
            "AllowEcho": True, "AllowStore": True,
            "AllowFind": False, "AllowFindWorklist": False, "AllowGet": False,
            "AllowMove": False, "AllowStorageCommitment": False,
        }
        for s in senders
    }
    tls_files = [os.environ.get(f"TRIAGE_DICOM_TLS_{k}", "") for k in ("CERT", "KEY", "TRUSTED")]
    tls = all(tls_files)
    if any(tls_files) and not tls:
        fail("DICOM TLS needs TRIAGE_DICOM_TLS_CERT, TRIAGE_DICOM_TLS_KEY and "
             "TRIAGE_DICOM_TLS_TRUSTED together")
    for path in filter(None, tls_files):
        if not Path(path).is_file():
            fail(f"DICOM TLS file not found: {path}")
    open_store = json.dumps(not senders)
    cert, key, trusted = tls_files
    return {
        "DICOM_ALWAYS_ALLOW_ECHO": open_store,
        "DICOM_ALWAYS_ALLOW_STORE": open_store,
        "DICOM_CHECK_HOST": json.dumps(bool(with_host)),
        "DICOM_MODALITIES": json.dumps(modalities, indent=4),
        "DICOM_TLS_ENABLED": json.dumps(tls),
        "DICOM_TLS_CERTIFICATE": json.dumps(cert),
        "DICOM_TLS_PRIVATE_KEY": json.dumps(key),
        "DICOM_TLS_TRUSTED": json.dumps(trusted),
    }


def render() -> Path:
    password = secret("TRIAGE_ORTHANC_PASSWORD")
    if not password:
        fail("set TRIAGE_ORTHANC_PASSWORD (or TRIAGE_ORTHANC_PASSWORD_FILE)")
    stable_age = os.environ.get("TRIAGE_STABLE_AGE", "5")
    if not stable_age.isdigit():
        fail("TRIAGE_STABLE_AGE: a whole number of seconds")
    postgres_host = os.environ.get("POSTGRES_HOST")
    plugins = [str(PLUGIN_DIR / name) for name in PLUGINS]
    if postgres_host:
        plugins.append(str(PLUGIN_DIR / POSTGRES_INDEX))
    values = {
        "STORAGE_DIR": json.dumps(STORAGE_DIR),
        "PLUGINS": json.dumps(plugins),
        "HTTP_PORT": str(HTTP_PORT),
        "DICOM_PORT": str(DICOM_PORT),
        "AET": json.dumps(os.environ.get("TRIAGE_ORTHANC_AET", "TRIAGE")),
        "USERNAME": json.dumps(os.environ.get("TRIAGE_ORTHANC_USERNAME", "triage")),
        "PASSWORD": json.dumps(password),
        "STABLE_AGE": stable_age,
        **dicom_security_values(),
    }
    text = Template(TEMPLATE.read_text()).substitute(values)
    # Orthanc's JSON allows // comments (whole lines in the template); Python's does not.
    config = json.loads("\n".join(line for line in text.splitlines()
                                  if not line.lstrip().startswith("//")))
    # The container's differences from a local stack.
    config["RemoteAccessAllowed"] = True
    if postgres_host:
        postgres_password = secret("POSTGRES_PASSWORD")
        if not postgres_password:
            fail("POSTGRES_HOST is set: set POSTGRES_PASSWORD (or POSTGRES_PASSWORD_FILE)")
        config["PostgreSQL"] = {
            "EnableIndex": True,
            "EnableStorage": False,
            "Host": postgres_host,
            "Port": int(os.environ.get("POSTGRES_PORT", "5432")),
            "Database": os.environ.get("POSTGRES_DB", "orthanc"),
            "Username": os.environ.get("POSTGRES_USER", "orthanc"),
            "Password": postgres_password,
            # One Orthanc per database (the stack runs one): keep the exclusive lock.
            "Lock": True,
        }
    directory = Path(os.environ.get("ORTHANC_CONFIG_DIR", "/tmp/orthanc"))
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = directory / "orthanc.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(config, handle, indent=2)
    return path


def healthcheck() -> int:
    path = Path(os.environ.get("ORTHANC_CONFIG_DIR", "/tmp/orthanc")) / "orthanc.json"
    config = json.loads(path.read_text())
    user, password = next(iter(config["RegisteredUsers"].items()))
    request = urllib.request.Request(f"http://127.0.0.1:{config['HttpPort']}/system")
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=4) as response:
            return 0 if response.status == 200 else 1
    except OSError:
        return 1


def main() -> None:
    if sys.argv[1:2] == ["healthcheck"]:
        sys.exit(healthcheck())
    config = render()
    os.environ.setdefault("TCP_NODELAY", "1")
    os.execv("/usr/sbin/Orthanc", ["Orthanc", *sys.argv[1:], str(config)])


if __name__ == "__main__":
    main()
