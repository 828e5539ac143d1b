"""The compose stack of the repository, driven for the deployment tests: docker-compose 1.29
against `podman system service` (as DESIGN.md measured), on the images deploy/build-images.sh
built.

Podman without systemd never runs healthchecks by itself: deploy/compose/healthcheck-loop.sh
runs them, as deploy/README.md tells podman users to. Every server is started here and
stopped by its PID.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

from tests.conftest import free_port  # noqa: F401 - the suite's own, used by the deploy tests

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
PROBE = Path(__file__).with_name("probe.py")
HEALTHCHECK_LOOP = ROOT / "deploy" / "compose" / "healthcheck-loop.sh"


def wait_until(predicate: Callable[[], object], *, timeout: float, what: str,
               every: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


class Engine:
    """`podman system service` on a socket of its own, with the project's podman settings."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.socket = directory / "podman.sock"
        conf = (ROOT / "deploy" / "containers.conf").read_text()
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        if hard != resource.RLIM_INFINITY and hard < 20000:  # as build-images.sh does
            conf = conf.replace("nofile=20000:20000", f"nofile={hard}:{hard}")
        self.conf = directory / "containers.conf"
        self.conf.write_text(conf)
        self.env = {**os.environ, "CONTAINERS_CONF": str(self.conf),
                    "DOCKER_HOST": f"unix://{self.socket}", "COMPOSE_HTTP_TIMEOUT": "300"}
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = (self.directory / "podman-service.log").open("wb")
        self.process = subprocess.Popen(
            ["podman", "system", "service", "--time=0", f"unix://{self.socket}"],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(self.socket.exists, timeout=30, what="the podman service socket")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)

    def podman(self, *argv: str, check: bool = True, timeout: float = 120,
               input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        done = subprocess.run(["podman", *argv], env=self.env, capture_output=True,
                              timeout=timeout, input=input)
        if check and done.returncode != 0:
            raise AssertionError(f"podman {' '.join(argv)}: {done.returncode}\n"
                                 f"{done.stderr.decode(errors='replace')[-3000:]}")
        return done


class Stack:
    """One compose project of docker-compose.yml with its own .env file."""

    def __init__(self, engine: Engine, project: str, env_file: Path) -> None:
        self.engine = engine
        self.project = project
        self.env_file = env_file
        self.health_loop: subprocess.Popen[bytes] | None = None

    # -- compose --------------------------------------------------------------------------

    @property
    def compose_command(self) -> list[str]:
        return ["docker-compose", "-f", str(COMPOSE_FILE), "-p", self.project,
                "--env-file", str(self.env_file)]

    def compose(self, *argv: str, timeout: float = 600,
                check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([*self.compose_command, *argv], env=self.engine.env,
                              capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise AssertionError(f"docker-compose {' '.join(argv)}: {done.returncode}\n"
                                 f"{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
        return done

    def start_health_loop(self) -> None:
        if self.health_loop is None or self.health_loop.poll() is not None:
            self.health_loop = subprocess.Popen(
                ["sh", str(HEALTHCHECK_LOOP), self.project], env=self.engine.env,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def stop_health_loop(self) -> None:
        if self.health_loop is not None and self.health_loop.poll() is None:
            os.killpg(self.health_loop.pid, signal.SIGTERM)
            self.health_loop.wait(10)
        self.health_loop = None

    def up(self, workers: int = 3, timeout: float = 420) -> None:
        self.start_health_loop()
        self.compose("up", "-d", "--scale", f"worker={workers}", timeout=timeout)
        self.wait_healthy(workers=workers)

    def down(self, *extra: str) -> None:
        self.compose("down", "--timeout", "30", *extra, check=False)
        self.stop_health_loop()
        # podman may keep the project network after `down` (DESIGN.md).
        self.engine.podman("network", "rm", "-f", f"{self.project}_default", check=False)

    # -- containers -----------------------------------------------------------------------

    def containers(self, service: str, *, all_states: bool = False) -> list[str]:
        argv = ["ps", "-q", "--no-trunc",
                "--filter", f"label=com.docker.compose.project={self.project}",
                "--filter", f"label=com.docker.compose.service={service}"]
        if all_states:
            argv.insert(1, "-a")
        return self.engine.podman(*argv).stdout.decode().split()

    def container(self, service: str) -> str:
        found = self.containers(service)
        assert found, f"no running {service} container"
        return found[0]

    def inspect(self, container: str) -> dict[str, Any]:
        return json.loads(self.engine.podman("inspect", container).stdout)[0]

    def health(self, container: str) -> str:
        state = self.inspect(container)["State"]
        health = state.get("Health") or state.get("Healthcheck") or {}
        return str(health.get("Status", "none"))

    def wait_healthy(self, *, workers: int, timeout: float = 300) -> None:
        expected = {"postgres": 1, "orthanc": 1, "redis": 1, "api": 1, "watcher": 2,
                    "worker": workers, "ris-listener": 1}

        def all_healthy() -> bool:
            for service, count in expected.items():
                found = self.containers(service)
                if len(found) != count or any(self.health(c) != "healthy" for c in found):
                    return False
            return True

        wait_until(all_healthy, timeout=timeout, what=f"every service of {self.project} "
                   f"healthy ({expected})", every=2)

    def hostname(self, container: str) -> str:
        return str(self.inspect(container)["Config"]["Hostname"])

    def logs(self, container: str) -> str:
        done = self.engine.podman("logs", container, check=False)
        return (done.stdout + done.stderr).decode(errors="replace")

    def exec(self, service: str, *argv: str, input: bytes | None = None,
             timeout: float = 120) -> bytes:
        return self.engine.podman("exec", "-i", self.container(service), *argv, input=input,
                                  timeout=timeout).stdout

    # -- the stack's state, read from inside (Orthanc's REST API and Redis are unpublished)

    def probe(self, query: str) -> Any:
        # aardvark-dns may fail a lookup while containers join the network (seen after
        # `up --scale`): a read that could not connect is tried again.
        for attempt in range(5):
            done = self.engine.podman("exec", "-i", self.container("api"), "python", "-", query,
                                      input=PROBE.read_bytes(), check=False, timeout=120)
            if done.returncode == 0:
                return json.loads(done.stdout)
            if b"ConnectionError" not in done.stderr and b"ConnectError" not in done.stderr:
                break
            time.sleep(1 + attempt)
        raise AssertionError(f"probe {query}: {done.returncode}\n"
                             f"{done.stderr.decode(errors='replace')[-3000:]}")

    def cursor_sampler(self, errors: IO[str]) -> subprocess.Popen[str]:
        """A process printing the watcher cursor every 50 ms (stop it with .kill()); what
        it says on stderr goes to ``errors``, for the test's message."""
        process = subprocess.Popen(
            ["podman", "exec", "-i", self.container("api"), "python", "-", "cursor"],
            env=self.engine.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=errors, text=True)
        assert process.stdin is not None
        process.stdin.write(PROBE.read_text())
        process.stdin.close()
        return process

    def psql(self, sql: str, database: str = "orthanc") -> list[str]:
        out = self.exec("postgres", "psql", "-U", "postgres", "-d", database, "-Atc", sql)
        return out.decode().split()

    def published_ports(self, container: str) -> set[int]:
        ports = self.inspect(container)["NetworkSettings"].get("Ports") or {}
        return {int(key.split("/")[0]) for key, bound in ports.items() if bound}


def write_env(path: Path, values: dict[str, str]) -> None:
    """An .env file as deploy/env.example asks for (single quotes keep JSON literal)."""
    path.write_text("".join(f"{key}='{value}'\n" for key, value in values.items()))
    path.chmod(0o600)


def terminal(items: Sequence[dict[str, Any]], studies: Sequence[str]) -> bool:
    by_study = {i["study"]: i["status"] for i in items}
    return all(by_study.get(uid) in TERMINAL for uid in studies)


TERMINAL = {"analysed", "skipped", "failed"}
