"""``triage up``: the whole local stack as child processes of one supervisor.

Orthanc, Redis and PostgreSQL come from Debian's packages (each unless an external one is
configured), and the migrations of the service's records are applied at start; the watcher, the
workers and the API are ``triage`` subcommands; two watchers run, one leading through its
lease. SIGINT/SIGTERM stop every child (application processes first, servers last). A child that
dies unexpectedly is restarted.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from pathlib import Path

from triage.servers import (
    DEFAULT_STOP_TIMEOUT,
    ManagedProcess,
    orthanc_process,
    postgres_process,
    redis_process,
    wait_for_http,
    wait_for_orthanc,
    wait_for_postgres,
    wait_for_redis,
)
from triage.settings import Settings
from triage.vigilance.db import connect, migrate

log = logging.getLogger(__name__)

STACK_FILE = "stack.json"
RESTART_DELAY = 2.0
MAX_RESTART_DELAY = 60.0
# A worker asked to stop finishes the study it is analysing; past this it is killed and RQ
# runs the study again later.
WORKER_STOP_TIMEOUT = 120.0
WATCHERS = 2


def _triage(*args: str) -> list[str]:
    return [sys.executable, "-m", "triage.cli", *args]


class Stack:
    """The processes of one local stack, started and stopped in order."""

    def __init__(self, settings: Settings, workers: int) -> None:
        self.settings = settings
        self.servers: list[ManagedProcess] = []
        self.apps: list[ManagedProcess] = []
        self.n_workers = workers
        self.stopping = threading.Event()

    def start(self) -> None:
        settings = self.settings
        settings.log_dir.mkdir(parents=True, exist_ok=True)
        if settings.local_orthanc:
            orthanc = orthanc_process(settings)
            orthanc.start()
            self.servers.append(orthanc)
            wait_for_orthanc(settings, orthanc)
        if settings.local_redis:
            redis_server = redis_process(settings)
            redis_server.start()
            self.servers.append(redis_server)
            wait_for_redis(settings, redis_server)
        if settings.local_postgres:
            postgres = postgres_process(settings)
            postgres.start()
            self.servers.append(postgres)
            wait_for_postgres(settings, postgres)
        with connect(settings) as connection:
            applied = migrate(connection)
        if applied:
            log.info("database migrations applied: %s", ", ".join(applied))
        logs = settings.log_dir
        # Two watchers: one leads, the other takes over within the lease time if it dies.
        for n in range(1, WATCHERS + 1):
            self.apps.append(ManagedProcess(f"watcher-{n}",
                                            _triage("watcher", "--name", f"watcher-{n}"),
                                            logs / f"watcher-{n}.log"))
        for n in range(1, self.n_workers + 1):
            self.apps.append(ManagedProcess(f"worker-{n}", _triage("worker"),
                                            logs / f"worker-{n}.log"))
        # Orders from the RIS (HL7 v2 over MLLP); it admits only TRIAGE_RIS_SENDERS.
        self.apps.append(ManagedProcess("ris-listener", _triage("ris-listener"),
                                        logs / "ris-listener.log"))
        api = ManagedProcess("api", _triage("api"), logs / "api.log")
        self.apps.append(api)
        for process in self.apps:
            process.start()
        scheme = "https" if settings.api_tls_cert else "http"
        wait_for_http(f"{scheme}://127.0.0.1:{settings.api_port}/healthz", api)
        self._write_stack_file()

    def _write_stack_file(self) -> None:
        info = {
            "pids": {p.name: p.pid for p in [*self.servers, *self.apps]},
            "orthanc_url": self.settings.orthanc_base_url,
            "orthanc_dicom_port": self.settings.orthanc_dicom_port,
            "api_url": self.settings.api_base_url,
            "mllp": f"{self.settings.ris_listen_host}:{self.settings.ris_listen_port}",
        }
        (self.settings.data_dir / STACK_FILE).write_text(json.dumps(info, indent=2))

    def supervise(self) -> None:
        """Restart children that die, until ``stop()`` is requested."""
        restarts: dict[str, int] = {}
        while not self.stopping.wait(0.5):
            for process in [*self.servers, *self.apps]:
                if process.alive() or self.stopping.is_set():
                    continue
                count = restarts[process.name] = restarts.get(process.name, 0) + 1
                code = process.popen.returncode if process.popen else None
                delay = min(RESTART_DELAY * 2 ** (count - 1), MAX_RESTART_DELAY)
                log.warning("%s exited (%s); restart %d in %.0f s; see %s", process.name,
                            code, count, delay, process.log_path)
                if self.stopping.wait(delay):
                    return
                process.start()
                self._write_stack_file()

    def stop(self) -> None:
        """Stop the applications (workers finish their current study), then the servers."""
        self.stopping.set()
        for process in reversed(self.apps):
            process.signal(signal.SIGTERM)
        for process in reversed(self.apps):
            timeout = WORKER_STOP_TIMEOUT if process.name.startswith("worker") else None
            process.stop(timeout or DEFAULT_STOP_TIMEOUT, already_signalled=True)
        for process in reversed(self.servers):
            process.stop()
        stack_file = self.settings.data_dir / STACK_FILE
        stack_file.unlink(missing_ok=True)


def install_signal_handlers(stack: Stack) -> None:
    def handler(signum: int, _frame: object) -> None:
        log.info("signal %d: stopping the stack", signum)
        stack.stopping.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def stack_file(settings: Settings) -> Path:
    return settings.data_dir / STACK_FILE
