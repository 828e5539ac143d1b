"""Fixtures that start real Orthanc and Redis servers on free ports, stopped by PID."""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
import uvicorn
from psycopg import sql

from triage import jobs
from triage.api.app import create_app
from triage.orthanc import OrthancClient
from triage.servers import (
    ManagedProcess,
    orthanc_process,
    postgres_process,
    redis_process,
    wait_for_orthanc,
    wait_for_postgres,
    wait_for_redis,
)
from triage.settings import Settings
from triage.vigilance.db import connect, migrate

# tests/deploy builds the container images and drives the compose stack: `make test-deploy`
# runs them (after `make test`, in .ci/run), with TRIAGE_TEST_DEPLOY=1.
collect_ignore = [] if os.environ.get("TRIAGE_TEST_DEPLOY") == "1" else ["deploy"]

STABLE_AGE = 1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stack_env(data_dir: Path, **extra: str) -> dict[str, str]:
    """``TRIAGE_`` variables of a stack on free ports in ``data_dir``."""
    return {
        "TRIAGE_DATA_DIR": str(data_dir),
        "TRIAGE_ORTHANC_HTTP_PORT": str(free_port()),
        "TRIAGE_ORTHANC_DICOM_PORT": str(free_port()),
        "TRIAGE_REDIS_PORT": str(free_port()),
        "TRIAGE_POSTGRES_PORT": str(free_port()),
        "TRIAGE_API_PORT": str(free_port()),
        "TRIAGE_RIS_LISTEN_PORT": str(free_port()),
        "TRIAGE_STABLE_AGE": str(STABLE_AGE),
        "TRIAGE_WATCHER_POLL_SECONDS": "0.2",
        **extra,
    }


class Servers:
    """A running Orthanc and Redis, and the settings that reach them."""

    def __init__(self, data_dir: Path) -> None:
        self.env = stack_env(data_dir)
        os.environ.update(self.env)
        self.settings = Settings()
        self.orthanc_process = orthanc_process(self.settings)
        self.redis_process = redis_process(self.settings)

    def start(self) -> None:
        self.orthanc_process.start()
        self.redis_process.start()
        wait_for_orthanc(self.settings, self.orthanc_process)
        wait_for_redis(self.settings, self.redis_process)
        self.orthanc = OrthancClient.from_settings(self.settings)
        self.redis = redis.Redis.from_url(self.settings.redis_connection_url)

    def stop(self) -> None:
        for process in (self.orthanc_process, self.redis_process):
            process.stop()

    def reset(self) -> None:
        """Empty Orthanc and Redis between tests."""
        for study in self.orthanc.studies():
            self.orthanc._api.delete_studies_id(study)
        self.redis.flushall()
        jobs.context.cache_clear()

    def wait_until(self, predicate: Callable[[], bool], timeout: float = 60,
                   what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.1)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    saved = dict(os.environ)
    running = Servers(tmp_path_factory.mktemp("stack"))
    running.start()
    try:
        yield running
    finally:
        running.stop()
        jobs.context.cache_clear()
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture
def clean_servers(servers: Servers) -> Servers:
    servers.reset()
    os.environ.update(servers.env)
    return servers


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's Chromium under Playwright, one per test module (tests/browser.py)."""
    from playwright.sync_api import sync_playwright

    from tests.browser import launch

    with sync_playwright() as playwright:
        chromium = launch(playwright)
        yield chromium
        chromium.close()


__all__ = ["ManagedProcess", "Servers", "free_port", "serve_api", "stack_env"]


@contextmanager
def serve_api(settings: Settings) -> Iterator[str]:
    """The API and pages of ``settings`` served by uvicorn on a free port, in a thread of the
    test process; yields the base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture
def live_api(clean_servers: Servers) -> Iterator[str]:
    """The API served by uvicorn on a free port, in a thread of the test process."""
    with serve_api(clean_servers.settings) as base:
        yield base


@pytest.fixture(scope="module")
def redis_settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """A Redis of the module's own (for the API's tokens and the audit trail), without
    Orthanc."""
    settings = Settings(data_dir=tmp_path_factory.mktemp("redis-only"), redis_port=free_port())
    process = redis_process(settings)
    process.start()
    try:
        wait_for_redis(settings, process)
        yield settings
    finally:
        process.stop()


# -- PostgreSQL of the vigilance records ---------------------------------------------------

@pytest.fixture(scope="session")
def postgres_local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """A local PostgreSQL as ``triage up`` starts it (durability off: a throwaway instance),
    in a data directory private to root (pytest's)."""
    settings = Settings(data_dir=tmp_path_factory.mktemp("pg") / "var", database_url=None,
                        postgres_port=free_port())
    process = postgres_process(settings, fast=True)
    process.start()
    try:
        wait_for_postgres(settings, process)
        yield settings
    finally:
        process.stop()


@pytest.fixture
def vigilance_database(postgres_local: Settings) -> Iterator[Settings]:
    """Settings of a fresh, empty database of the local server, given as a configured URL."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_local.database_connection_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = postgres_local.database_connection_url.rsplit("/", 1)[0] + f"/{name}"
    yield Settings(data_dir=postgres_local.data_dir, database_url=url)
    with psycopg.connect(postgres_local.database_connection_url, autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def vigilance_db(vigilance_database: Settings) -> Iterator[psycopg.Connection]:
    """A connection to a fresh database with every migration applied."""
    with connect(vigilance_database) as connection:
        migrate(connection)
        connection.commit()
        yield connection
