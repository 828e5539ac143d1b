"""Starting and stopping the local Orthanc, Redis and PostgreSQL from Debian's packages.

Hospitals run Orthanc, Redis and PostgreSQL as containers (docker-compose.yml); on a developer
machine and in CI there is no container engine, so the local stack runs the Debian binaries as
child processes with configuration generated into the data directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from typing import IO

import httpx
import psycopg
import redis
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from triage.errors import TransientError
from triage.orthanc import OrthancClient
from triage.settings import PROJECT_ROOT, Settings

ORTHANC_BINARY = "/usr/sbin/Orthanc"
ORTHANC_PLUGINS = (
    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
    "/usr/share/orthanc/plugins/libOrthancGdcm.so",
)
REDIS_BINARY = "/usr/bin/redis-server"
POSTGRES_BIN = Path("/usr/lib/postgresql/15/bin")
UNSHARE_BINARY = "/usr/bin/unshare"
# The account Debian's postgresql package creates: PostgreSQL's identity when root starts it.
POSTGRES_ACCOUNT = "postgres"
# Durability off: for a throwaway test instance only, never for data anyone keeps.
POSTGRES_FAST_SETTINGS = ("fsync=off", "synchronous_commit=off", "full_page_writes=off")
# sun_path holds 108 bytes: a longer socket path makes PostgreSQL refuse to start.
_MAX_SOCKET_PATH = 107
ORTHANC_TEMPLATE = PROJECT_ROOT / "orthanc" / "orthanc.json.template"
DEFAULT_START_TIMEOUT = 60.0
DEFAULT_STOP_TIMEOUT = 20.0


@dataclass
class ManagedProcess:
    """A child process with its output in a log file; stopped by PID, never by name."""

    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    # What asks it to stop: SIGTERM, or SIGINT for PostgreSQL (SIGTERM would wait for every
    # client to disconnect, SIGINT closes their sessions and shuts down cleanly).
    stop_signal: int = signal.SIGTERM
    popen: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        if self._log is not None:  # a restart: the previous run's handle is done with
            self._log.close()
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            self.argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, **self.env}, cwd=self.cwd,
            # Own process group: Ctrl-C in the terminal reaches the supervisor only, which
            # then stops the children in order.
            start_new_session=True,
        )

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, signum: int) -> None:
        if self.alive():
            assert self.popen is not None
            self.popen.send_signal(signum)

    def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT, *,
             already_signalled: bool = False) -> int | None:
        """``stop_signal`` (unless ``already_signalled``), then SIGKILL after ``timeout``.

        Returns the exit code. A second SIGTERM would turn a worker's warm shutdown into a
        cold one, so a process already asked to stop is only waited for.
        """
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            if not already_signalled:
                self.popen.send_signal(self.stop_signal)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout)
        if self._log:
            self._log.close()
            self._log = None
        return self.popen.returncode


# Orthanc needs a host and port for every modality; senders only call in, so these are never
# dialled (".invalid" cannot resolve: a mistaken C-ECHO/C-STORE to a sender goes nowhere).
_SENDER_NO_HOST = "sender.invalid"
_SENDER_PORT = 104


def dicom_security_values(settings: Settings) -> dict[str, str]:
    """Template values of the DICOM allow-list and of DICOM TLS.

    Without ``TRIAGE_DICOM_SENDERS`` any calling AE title may store (development); with it,
    Orthanc refuses the association of any other AE title (C-ECHO included), and each listed
    sender may store and echo, never query or retrieve.
    """
    senders = settings.dicom_senders
    if not senders and not settings.development:
        raise ValueError("TRIAGE_DICOM_SENDERS must list the modalities/PACS that may store "
                         "outside development")
    with_host = [sender.name for sender in senders if sender.host]
    if with_host and len(with_host) != len(senders):
        missing = ", ".join(sender.name for sender in senders if not sender.host)
        raise ValueError("TRIAGE_DICOM_SENDERS: when one sender gives its host, Orthanc checks "
                         f"the address of all of them; give a host for {missing}")
    names = [sender.name for sender in senders]
    if len(set(names)) != len(names):
        raise ValueError("TRIAGE_DICOM_SENDERS: sender names must be unique")
    modalities = {
        f"sender-{sender.name}": {
            "AET": sender.aet, "Host": sender.host or _SENDER_NO_HOST, "Port": _SENDER_PORT,
            "AllowEcho": True, "AllowStore": True,
            "AllowFind": False, "AllowFindWorklist": False, "AllowGet": False,
            "AllowMove": False, "AllowStorageCommitment": False,
        }
        for sender in senders
    }
    tls_files = (settings.dicom_tls_cert, settings.dicom_tls_key, settings.dicom_tls_trusted)
    tls = all(tls_files)
    if any(tls_files) and not tls:
        raise ValueError("DICOM TLS needs TRIAGE_DICOM_TLS_CERT, TRIAGE_DICOM_TLS_KEY and "
                         "TRIAGE_DICOM_TLS_TRUSTED together")
    paths = [path.expanduser().resolve() if path else None for path in tls_files]
    for path in paths:
        if path is not None and not path.is_file():
            raise ValueError(f"DICOM TLS file not found: {path}")
    cert, key, trusted = (str(path) if path else "" for path in paths)
    open_store = json.dumps(not senders)
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


def render_orthanc_config(settings: Settings) -> Path:
    """Write ``<data dir>/orthanc/orthanc.json`` from the template in ``orthanc/``."""
    root = settings.data_dir / "orthanc"
    storage = root / "db"
    storage.mkdir(parents=True, exist_ok=True)
    plugins = [p for p in ORTHANC_PLUGINS if Path(p).exists()]
    values = {
        "STORAGE_DIR": json.dumps(str(storage)),
        "PLUGINS": json.dumps(plugins),
        "HTTP_PORT": str(settings.orthanc_http_port),
        "DICOM_PORT": str(settings.orthanc_dicom_port),
        "AET": json.dumps(settings.orthanc_aet),
        "USERNAME": json.dumps(settings.orthanc_username),
        "PASSWORD": json.dumps(settings.orthanc_secret),
        "STABLE_AGE": str(settings.stable_age),
        **dicom_security_values(settings),
    }
    text = Template(ORTHANC_TEMPLATE.read_text()).substitute(values)
    path = root / "orthanc.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    return path


def orthanc_process(settings: Settings) -> ManagedProcess:
    config = render_orthanc_config(settings)
    return ManagedProcess(
        name="orthanc",
        argv=[ORTHANC_BINARY, "--logdir=" + str(settings.log_dir), str(config)],
        log_path=settings.log_dir / "orthanc.out",
        # Debian's Orthanc keeps Nagle's algorithm on without this (DESIGN.md, gotchas).
        env={"TCP_NODELAY": "1"},
    )


def redis_process(settings: Settings) -> ManagedProcess:
    directory = settings.data_dir / "redis"
    directory.mkdir(parents=True, exist_ok=True)
    argv = [
        REDIS_BINARY, "--port", str(settings.redis_port), "--bind", "127.0.0.1",
        "--dir", str(directory), "--appendonly", "yes", "--appendfsync", "everysec",
        "--save", "", "--daemonize", "no", "--protected-mode", "yes",
        "--logfile", "",
    ]
    secret = settings.redis_secret
    if secret:
        argv += ["--requirepass", secret]
    return ManagedProcess(name="redis", argv=argv, log_path=settings.log_dir / "redis.log")


def wait_for_orthanc(settings: Settings, process: ManagedProcess | None = None,
                     timeout: float = DEFAULT_START_TIMEOUT) -> None:
    client = OrthancClient.from_settings(settings)
    deadline = time.monotonic() + timeout
    try:
        while True:
            if process is not None and not process.alive():
                raise RuntimeError(f"Orthanc exited at start; see {process.log_path}")
            try:
                client.system()
                return
            except TransientError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
    finally:
        client.close()


def wait_for_http(url: str, process: ManagedProcess | None = None,
                  timeout: float = DEFAULT_START_TIMEOUT) -> None:
    """Wait until ``url`` answers 200 (the API's /healthz)."""
    deadline = time.monotonic() + timeout
    while True:
        if process is not None and not process.alive():
            raise RuntimeError(f"{process.name} exited at start; see {process.log_path}")
        try:
            # Up is up: the certificate of a local HTTPS API is the browser's concern.
            if httpx.get(url, timeout=2, verify=False).status_code == 200:  # noqa: S501
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")
        time.sleep(0.1)


def wait_for_redis(settings: Settings, process: ManagedProcess | None = None,
                   timeout: float = DEFAULT_START_TIMEOUT) -> None:
    connection = redis.Redis.from_url(settings.redis_connection_url)
    deadline = time.monotonic() + timeout
    try:
        while True:
            if process is not None and not process.alive():
                raise RuntimeError(f"Redis exited at start; see {process.log_path}")
            try:
                connection.ping()
                return
            except (redis.ConnectionError, redis.BusyLoadingError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
    finally:
        connection.close()


def _unprivileged(argv: list[str]) -> list[str]:
    """``argv`` as run by a non-root account: PostgreSQL refuses to run as root.

    As root, the command runs in a new user namespace where root is mapped to Debian's
    ``postgres`` account. PostgreSQL then sees a non-root owner of its data directory while the
    files stay root's on disk, so any data directory root can reach works (pytest's private
    temporary directories, /root) without chown. It is no sandbox: like the Orthanc and Redis
    of a stack started as root, it keeps root's access to root's files. ``unshare`` execs the
    command, so the PID is PostgreSQL's own and it is stopped by PID like the other servers.
    """
    if os.geteuid() != 0:
        return argv
    return [UNSHARE_BINARY, "--user", f"--map-user={POSTGRES_ACCOUNT}",
            f"--map-group={POSTGRES_ACCOUNT}", *argv]


def _initdb(settings: Settings, cluster: Path, *, fast: bool) -> None:
    """Create the cluster: superuser ``triage``, UTF-8, the Unix socket trusted (its directory
    is the stack's account's only), TCP asking for the generated password."""
    password_file = cluster.parent / "initdb-password"
    fd = os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(settings.stored_secrets["postgres_password"])
    argv = [str(POSTGRES_BIN / "initdb"), "-D", str(cluster), "-U", "triage",
            f"--pwfile={password_file}", "--auth-local=trust", "--auth-host=scram-sha-256",
            "--encoding=UTF8", "--locale=C.UTF-8"]
    if fast:
        argv.append("--no-sync")
    try:
        result = subprocess.run(_unprivileged(argv), capture_output=True, text=True,
                                timeout=DEFAULT_START_TIMEOUT, check=False)
    finally:
        password_file.unlink()
    if result.returncode != 0:
        raise RuntimeError(f"initdb of {cluster} failed: {result.stderr.strip()}")


def postgres_process(settings: Settings, *, fast: bool = False) -> ManagedProcess:
    """The local PostgreSQL of the service's records, in ``<data dir>/postgres``.

    The cluster is created on first use. It listens on 127.0.0.1 at ``postgres_port`` and on
    a Unix socket in ``<data dir>/postgres/run`` (left out when that path is too long for a
    socket). ``fast`` turns durability off (no fsync): for throwaway test instances only;
    ``triage up`` keeps PostgreSQL's defaults, since a demo stack's records may be kept.
    """
    root = settings.data_dir / "postgres"
    cluster, sockets = root / "data", root / "run"
    sockets.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not (cluster / "PG_VERSION").exists():
        _initdb(settings, cluster, fast=fast)
    socket_path = f"{sockets}/.s.PGSQL.{settings.postgres_port}"
    argv = [str(POSTGRES_BIN / "postgres"), "-D", str(cluster),
            "-p", str(settings.postgres_port),
            "-k", str(sockets) if len(socket_path) <= _MAX_SOCKET_PATH else "",
            "-c", "listen_addresses=127.0.0.1", "-c", "timezone=UTC", "-c", "log_timezone=UTC"]
    for setting in POSTGRES_FAST_SETTINGS if fast else ():
        argv += ["-c", setting]
    return ManagedProcess(name="postgres", argv=_unprivileged(argv), stop_signal=signal.SIGINT,
                          log_path=settings.log_dir / "postgres.log")


def wait_for_postgres(settings: Settings, process: ManagedProcess | None = None,
                      timeout: float = DEFAULT_START_TIMEOUT) -> None:
    """Wait until PostgreSQL accepts connections; for the local one, then create the
    ``triage`` database if it is missing."""
    url = settings.database_connection_url
    target = make_conninfo(url, dbname="postgres") if settings.local_postgres else url
    deadline = time.monotonic() + timeout
    while True:
        if process is not None and not process.alive():
            raise RuntimeError(f"PostgreSQL exited at start; see {process.log_path}")
        try:
            connection = psycopg.connect(target, autocommit=True, connect_timeout=2)
            break
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    with connection:
        if not settings.local_postgres:
            return
        database = str(conninfo_to_dict(url)["dbname"])
        if connection.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                              (database,)).fetchone():
            return
        # Another process of the stack may create it meanwhile.
        with contextlib.suppress(psycopg.errors.DuplicateDatabase):
            connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
