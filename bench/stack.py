"""The benchmark's own local stack: real Orthanc and Redis, and the service's processes.

Orthanc and Redis are started as ``triage up`` starts them (``triage.servers``), and the
local PostgreSQL of the vigilance records when a section needs it (``start_postgres``, with
durability off: the records are thrown away with the run); the watcher,
the workers and the API are ``python -m triage.cli`` subprocesses. Everything runs on free
ports in a temporary data directory and is stopped by PID.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import redis

from triage.orthanc import OrthancClient
from triage.servers import (
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
from triage.worklist import Worklist

WORKERS = 2
# A worker asked to stop finishes its current study first.
WORKER_STOP_TIMEOUT = 120.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _triage(*args: str) -> list[str]:
    return [sys.executable, "-m", "triage.cli", *args]


class BenchStack:
    """Orthanc, Redis, the watcher, ``WORKERS`` workers and the API of one benchmark run."""

    def __init__(self, data_dir: Path, models_dir: Path, stable_age: int) -> None:
        self.env = {
            "TRIAGE_DATA_DIR": str(data_dir),
            "TRIAGE_MODELS_DIR": str(models_dir),
            "TRIAGE_ORTHANC_HTTP_PORT": str(free_port()),
            "TRIAGE_ORTHANC_DICOM_PORT": str(free_port()),
            "TRIAGE_REDIS_PORT": str(free_port()),
            "TRIAGE_API_PORT": str(free_port()),
            "TRIAGE_STABLE_AGE": str(stable_age),
            "TRIAGE_POSTGRES_PORT": str(free_port()),
            # A change of a version's state reaches the workers within a second.
            "TRIAGE_VIGILANCE_STATES_SECONDS": "1",
        }
        # This process reads the same settings as its children (Settings() from TRIAGE_);
        # the records go to the stack's own PostgreSQL, never to a configured one.
        os.environ.pop("TRIAGE_DATABASE_URL", None)
        os.environ.update(self.env)
        self.settings = Settings()
        self.servers: list[ManagedProcess] = []
        logs = self.settings.log_dir
        self.watcher = ManagedProcess("watcher", _triage("watcher"), logs / "watcher.log")
        self.workers = [ManagedProcess(f"worker-{n}", _triage("worker"),
                                       logs / f"worker-{n}.log") for n in range(1, WORKERS + 1)]
        self.api = ManagedProcess("api", _triage("api"), logs / "api.log")
        self.orthanc: OrthancClient | None = None
        self.redis: redis.Redis | None = None
        self.workers_up = False

    # -- servers ---------------------------------------------------------------------------

    def start_servers(self) -> None:
        self.settings.log_dir.mkdir(parents=True, exist_ok=True)
        orthanc = orthanc_process(self.settings)
        redis_server = redis_process(self.settings)
        self.servers = [orthanc, redis_server]
        orthanc.start()
        redis_server.start()
        wait_for_orthanc(self.settings, orthanc)
        wait_for_redis(self.settings, redis_server)
        self.orthanc = OrthancClient.from_settings(self.settings)
        self.redis = redis.Redis.from_url(self.settings.redis_connection_url)

    def start_postgres(self) -> None:
        """The local PostgreSQL of the vigilance records, migrated; before the service."""
        from triage.vigilance.db import connect, migrate

        postgres = postgres_process(self.settings, fast=True)
        self.servers.append(postgres)
        postgres.start()
        wait_for_postgres(self.settings, postgres)
        with connect(self.settings) as connection:
            migrate(connection)
            connection.commit()

    @property
    def worklist(self) -> Worklist:
        assert self.redis is not None
        return Worklist(self.redis)

    # -- the service's processes -----------------------------------------------------------

    def start_service(self) -> None:
        self.watcher.start()
        self.start_workers()
        self.api.start()
        wait_for_http(f"http://127.0.0.1:{self.settings.api_port}/healthz", self.api)

    def start_workers(self) -> None:
        for worker in self.workers:
            worker.start()
        self.workers_up = True
        self.wait_workers_ready()

    def wait_workers_ready(self, timeout: float = 120.0) -> None:
        """Until every worker has registered with RQ (its models are loaded by then)."""
        from rq import Worker

        deadline = time.monotonic() + timeout
        while len(Worker.all(connection=self.redis)) < len(self.workers):
            for worker in self.workers:
                if not worker.alive():
                    raise RuntimeError(f"{worker.name} exited; see {worker.log_path}")
            if time.monotonic() > deadline:
                raise TimeoutError("workers did not register with RQ")
            time.sleep(0.1)

    def pause_service(self) -> None:
        """Stop the watcher, the workers and the API in place (SIGSTOP to each process
        group, children included); ``resume_service`` continues them."""
        for process in [self.watcher, *self.workers, self.api]:
            if process.pid is not None and process.alive():
                os.killpg(process.pid, signal.SIGSTOP)

    def resume_service(self) -> None:
        for process in [self.watcher, *self.workers, self.api]:
            if process.pid is not None and process.alive():
                os.killpg(process.pid, signal.SIGCONT)

    def stop_workers(self) -> None:
        self.workers_up = False
        for worker in self.workers:
            worker.signal(signal.SIGTERM)
        for worker in self.workers:
            worker.stop(WORKER_STOP_TIMEOUT, already_signalled=True)
        # RQ forgets a worker when it exits cleanly; wait so a restart counts afresh.
        from rq import Worker

        deadline = time.monotonic() + 30
        while Worker.all(connection=self.redis) and time.monotonic() < deadline:
            time.sleep(0.1)

    def cpu_by_process(self) -> dict[str, float]:
        """CPU seconds used so far by each server and service process (with its children,
        e.g. RQ's scheduler), and by this benchmark process itself."""
        from bench.measure import cpu_seconds

        running = [*self.servers, self.watcher, *self.workers, self.api]
        used = cpu_seconds({p.name: p.pid for p in running
                            if p.pid is not None and p.alive()})
        times = os.times()
        used["bench"] = times.user + times.system
        return used

    def worker_pids(self) -> list[int]:
        return [w.pid for w in self.workers if w.pid is not None and w.alive()]

    def stop(self) -> None:
        apps = [self.api, *self.workers, self.watcher]
        for process in apps:
            process.signal(signal.SIGTERM)
        for process in apps:
            process.stop(WORKER_STOP_TIMEOUT if process in self.workers else 20.0,
                         already_signalled=True)
        for process in reversed(self.servers):
            process.stop()
        if self.orthanc is not None:
            self.orthanc.close()

    # -- DICOM in and out ------------------------------------------------------------------

    def storescu(self, files: Sequence[Path]) -> float:
        """C-STORE ``files`` in one association with dcmtk's storescu; returns when the last
        one is acknowledged (wall-clock time, seconds since the epoch)."""
        argv = ["storescu", "-aet", "BENCHSCU", "-aec", self.settings.orthanc_aet,
                "127.0.0.1", str(self.settings.orthanc_dicom_port), *map(str, files)]
        # Nagle's algorithm slows Debian's storescu 10-20x (DESIGN.md, gotchas).
        subprocess.run(argv, check=True, capture_output=True,
                       env={**os.environ, "TCP_NODELAY": "1"})
        return time.time()

    def delete_all_studies(self) -> None:
        """Free Orthanc's disk between sections; the watcher skips deleted studies."""
        assert self.orthanc is not None
        for study in self.orthanc.studies():
            self.orthanc._api.delete_studies_id(study)

    def check_alive(self) -> None:
        """Raise if a server or a service process that should be running has exited."""
        running = [*self.servers, self.watcher, self.api,
                   *(self.workers if self.workers_up else [])]
        for process in running:
            if process.popen is not None and not process.alive():
                raise RuntimeError(f"{process.name} exited; see {process.log_path}")

    def wait_until(self, predicate: Callable[[], bool], timeout: float, what: str,
                   interval: float = 0.05) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
            self.check_alive()
            time.sleep(interval)
