"""`triage up` as a user runs it: the whole local stack, stopped by a signal, resumed."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import httpx
import pytest

from tests.conftest import stack_env
from triage.servers import ManagedProcess

pytestmark = pytest.mark.servers
N_SAMPLES = 4


class UpProcess:
    """``triage up`` in a child process, with the token and URLs it prints."""

    def __init__(self, env: dict[str, str], log: Path, *args: str) -> None:
        self.env = env
        self.process = ManagedProcess("up", [sys.executable, "-m", "triage.cli", "up",
                                             "--workers", "1", *args], log, env=env)
        self.api = f"http://127.0.0.1:{env['TRIAGE_API_PORT']}"
        self.token = ""

    def start(self, timeout: float = 90) -> None:
        self.process.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.alive(), self.process.log_path.read_text()
            match = re.search(r"Admin token:\s+(\S+)", self.process.log_path.read_text())
            if match:
                self.token = match.group(1)
                return
            time.sleep(0.2)
        raise AssertionError("triage up did not print a token")

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.api + path, headers={"Authorization": f"Bearer {self.token}"},
                         timeout=10)

    def worklist(self) -> dict:
        return self.get("/api/v1/worklist").json()

    def wait_terminal(self, count: int, timeout: float = 120) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                items = self.worklist()["items"]
            except httpx.TransportError:
                items = []
            done = [i for i in items if i["status"] in ("analysed", "skipped", "failed")]
            if len(items) == count and len(done) == count:
                return items
            time.sleep(0.5)
        raise AssertionError(f"worklist did not reach {count} terminal studies")

    def pids(self) -> dict[str, int]:
        stack_file = Path(self.env["TRIAGE_DATA_DIR"]) / "stack.json"
        return json.loads(stack_file.read_text())["pids"]

    def stop(self) -> int | None:
        self.process.signal(signal.SIGTERM)
        return self.process.stop(timeout=60)


# Distinctive patient data: none of it may reach a log file.
PRIVATE = {"PatientName": "QZXWVU^KLMNOP", "PatientID": "PID-7Q3Z9X",
           "PatientBirthDate": "19230417", "OtherPatientIDs": "OPID-44J2"}
# The same for values the DICOM libraries warn about, quoting them: a name without a caret,
# a birth date in the wrong format, an over-long ID.
PRIVATE_INVALID = {"PatientName": "QZXWVUSOLO", "PatientBirthDate": "1923-04-18",
                   "PatientID": "PIDX-" + "7Q3Z9" * 14}


def distinctive_study(folder: Path) -> list[Path]:
    from tests.studies import ct_studies

    [paths] = ct_studies(folder.parent, 1, tag="private", **PRIVATE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        [invalid] = ct_studies(folder.parent, 1, tag="invalid", **PRIVATE_INVALID)
    return paths + invalid


def send(env: dict[str, str], files: list[Path]) -> None:
    subprocess.run(["storescu", "-aec", "TRIAGE", "127.0.0.1", env["TRIAGE_ORTHANC_DICOM_PORT"],
                    *map(str, files)], check=True, capture_output=True,
                   env={**os.environ, "TCP_NODELAY": "1"})


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_up_runs_samples_stops_cleanly_and_resumes(tmp_path: Path) -> None:
    env_a = stack_env(tmp_path / "a")
    env_b = stack_env(tmp_path / "b")
    first = UpProcess(env_a, tmp_path / "a.log", "--samples")
    private = distinctive_study(tmp_path / "private")
    other = UpProcess(env_b, tmp_path / "b.log")
    pids: dict[str, int] = {}
    try:
        first.start()
        other.start()  # a second stack, side by side, with its own data and ports
        send(env_a, private)
        items = first.wait_terminal(N_SAMPLES + 2)
        by_name = {i["patient_name"]: i for i in items}
        assert by_name["DEMO^HEADCT PHANTOM"]["priority"] == "critical"
        assert by_name["DEMO^HEADCT NORMAL"]["status"] == "analysed"
        assert by_name["DEMO^MR"]["status"] == "skipped"
        assert "MR" in by_name["DEMO^MR"]["status_reason"]
        assert items[0]["patient_name"] == "DEMO^HEADCT PHANTOM"
        assert any(i["patient_id"] == PRIVATE["PatientID"] for i in items)
        assert by_name[PRIVATE_INVALID["PatientName"]]["status"] == "analysed"
        assert other.worklist()["total"] == 0
        assert other.get("/healthz").json()["status"] == "ok"
        pids = first.pids()
        assert set(pids) == {"orthanc", "redis", "postgres", "watcher-1", "watcher-2", "worker-1",
                             "ris-listener", "api"}
    finally:
        codes = (first.stop(), other.stop())
    assert codes == (0, 0)
    assert all(_gone(pid) for pid in pids.values())
    assert "stack stopped" in first.process.log_path.read_text()
    # No log of the stack names the patient: not the name, the ID or the birth date.
    logs = sorted((tmp_path / "a" / "logs").iterdir()) + [first.process.log_path]
    assert len(logs) >= 6
    for log in logs:
        text = log.read_text(errors="replace")
        for value in (*PRIVATE.values(), *PRIVATE_INVALID.values()):
            assert value not in text, f"{value} in {log.name}"

    again = UpProcess(env_a, tmp_path / "a2.log")
    total = N_SAMPLES + 2
    try:
        again.start()
        resumed = again.worklist()
        assert resumed["total"] == total
        assert [i["study_instance_uid"] for i in resumed["items"]] == [
            i["study_instance_uid"] for i in items]
    finally:
        assert again.stop() == 0
