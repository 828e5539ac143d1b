"""The watcher against resources deleted under it: it never stops following the change log.

Orthanc leaves out of ``/tools/bulk-content`` the ids it does not know, but when a resource is
deleted while it reads the others it fails the whole call with 404 (seen in the benchmark,
where studies are deleted while the watcher polls). That race cannot be produced on demand,
so these tests make one call answer with the 404 Orthanc gives for a deleted resource; every
other request goes to the real Orthanc.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Servers
from tests.senders import storescu
from tests.test_pipeline import write_study
from triage.errors import PermanentError
from triage.watcher import Watcher
from triage.worklist import Worklist

pytestmark = pytest.mark.servers


def _changes(servers: Servers, kind: str) -> list[str]:
    return [c.resource_id for c in servers.orthanc.changes(0, 1000).changes
            if c.change_type == kind]


def test_bulk_content_reads_one_by_one_when_a_resource_vanishes_mid_call(
        clean_servers: Servers, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    servers = clean_servers
    storescu(servers.settings, write_study(tmp_path / "a", "head-ct-normal"))
    storescu(servers.settings, write_study(tmp_path / "b", "head-ct-hyperdense"))
    series = _changes(servers, "NewSeries")
    studies = _changes(servers, "NewStudy")
    assert len(series) == len(studies) == 2
    gone = servers.orthanc.series(series[0])["ParentStudy"]
    servers.orthanc._api.delete_studies_id(gone)
    [kept] = [s for s in studies if s != gone]

    api = servers.orthanc._api
    real = api.post_tools_bulk_content
    asked: list[list[str]] = []

    def racing(*args: Any, json: dict[str, Any], **kwargs: Any) -> Any:
        asked.append(list(json["Resources"]))
        if len(json["Resources"]) > 1:  # as Orthanc answers when one vanishes mid-call
            return api.get_series_id(series[0])
        return real(*args, json=json, **kwargs)

    monkeypatch.setattr(api, "post_tools_bulk_content", racing)
    found = servers.orthanc.bulk_content(series, level="Study")
    assert [study["ID"] for study in found] == [kept]
    assert asked == [series, [series[0]], [series[1]]]


def test_a_failed_lookup_of_arrivals_never_stops_the_watcher(
        clean_servers: Servers, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    servers = clean_servers
    watcher = Watcher(servers.settings, servers.orthanc, servers.redis)
    storescu(servers.settings, write_study(tmp_path / "a", "head-ct-normal"))

    def failing(*_args: Any, **_kwargs: Any) -> list[dict[str, Any]]:
        raise PermanentError("Orthanc refused POST /tools/bulk-content (400)")

    monkeypatch.setattr(watcher.orthanc, "bulk_content", failing)
    assert watcher.poll_once() == 0  # the arrivals are lost, the change log is not
    assert watcher.arrivals.waiting == 0
    monkeypatch.undo()
    # Orthanc's own announcement still queues the study.
    servers.wait_until(lambda: watcher.poll_once() >= 0 and Worklist(servers.redis).page()[1]
                       == 1, timeout=servers.settings.stable_age + 10,
                       what="the study queued on Orthanc's announcement")


def test_late_instances_a_failed_lookup_missed_are_still_queued(
        clean_servers: Servers, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A study queued a moment ago gets more images while the lookup of arrivals fails:
    Orthanc's next announcement of it must not be skipped as already queued."""
    servers = clean_servers
    worklist = Worklist(servers.redis)
    watcher = Watcher(servers.settings, servers.orthanc, servers.redis)
    files = write_study(tmp_path / "a", "head-ct-normal")
    assert len(files) > 1
    storescu(servers.settings, files[:-1])
    servers.wait_until(lambda: watcher.poll_once() >= 0 and worklist.page()[1] == 1,
                       timeout=servers.settings.stable_age + 10, what="the study queued")
    [first] = worklist.page()[0]

    def failing(*_args: Any, **_kwargs: Any) -> list[dict[str, Any]]:
        raise PermanentError("Orthanc refused POST /tools/bulk-content (400)")

    monkeypatch.setattr(watcher.orthanc, "bulk_content", failing)
    storescu(servers.settings, files[-1:])  # the last image, late
    watcher.poll_once()  # its arrival is not seen
    monkeypatch.undo()

    def requeued() -> bool:
        watcher.poll_once()
        item = worklist.get(first.study_instance_uid)
        return item is not None and item.inputs != first.inputs

    servers.wait_until(requeued, timeout=servers.settings.stable_age + 10,
                       what="the study queued again with the late image")
