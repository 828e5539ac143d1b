"""Streaming triage through the real pipeline: Orthanc receiving at a modality's pace
(pynetdicom, 25 images/s), Redis, and the watcher and a worker as their own processes.

A positive head CT is raised on the worklist before its last image is stored, and its final
SR is the one the analysis of the complete study writes; a negative one has no image scored
twice; a worker killed mid-stream still leaves exactly one SR; a study whose final choice of
series is not the streamed one keeps its raised priority and says why, and the webhook that
was told of the preliminary result hears the outcome.
"""

from __future__ import annotations

import json
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from rq import Queue

from tests.conftest import Servers
from tests.headct import HeadCT, study_uid, write_head_ct
from tests.test_delivery import Pager
from tests.test_pipeline import our_srs
from triage import jobs
from triage.priority import PriorityClass
from triage.queues import STREAM_QUEUE
from triage.recovery import alive_key
from triage.servers import ManagedProcess
from triage.streaming.cache import ScoreCache
from triage.streaming.dispatch import Batch, Dispatcher, streaming_manifests
from triage.watcher import CURSOR_KEY
from triage.worklist import StudyStatus, Worklist, WorklistItem

pytestmark = pytest.mark.servers
MODEL, VERSION = "head-ct-hyperdensity", "1.1.0"
PACE = 25.0  # images per second, as a modality sends
SLICES = 60
BLEED = tuple(range(20, 26))  # a 10 mm disc: probability 1.0 on each of these slices


class Stack:
    """The watcher and one worker, as processes of their own, on the test's servers."""

    def __init__(self, servers: Servers, log_dir: Path, **env: str) -> None:
        self.servers = servers
        self.log_dir = log_dir
        self.env = {**servers.env, "TRIAGE_STREAMING": "true", **env}
        self.watcher = self._start("watcher")
        self.worker = self._start("worker")
        self.wait_ready()

    def wait_ready(self) -> None:
        """Until the watcher follows the change log and a worker serves the queues."""
        connection = self.servers.redis
        self.servers.wait_until(
            lambda: connection.exists(CURSOR_KEY) and any(connection.scan_iter(alive_key("*"))),
            timeout=60, what="the watcher and a worker")

    def _start(self, command: str) -> ManagedProcess:
        process = ManagedProcess(command, [sys.executable, "-m", "triage.cli", command],
                                 self.log_dir / f"{command}-{time.monotonic_ns()}.log",
                                 env=self.env)
        process.start()
        return process

    def restart_worker(self) -> None:
        self.worker = self._start("worker")

    def stop(self) -> None:
        for process in (self.watcher, self.worker):
            process.stop()


@pytest.fixture
def stack(clean_servers: Servers, tmp_path: Path) -> Iterator[Callable[..., Stack]]:
    started: list[Stack] = []

    def start(**env: str) -> Stack:
        started.append(Stack(clean_servers, tmp_path, **env))
        return started[-1]

    yield start
    for one in started:
        one.stop()


def paced_send(servers: Servers, datasets: Sequence[pydicom.Dataset],
               after_each: Callable[[int], None] = lambda _: None) -> list[float]:
    """C-STORE ``datasets`` in order at ``PACE`` images per second on one association; calls
    ``after_each(index)`` once each image is acknowledged, and returns when each was."""
    ae = AE(ae_title="CTSCANNER")
    for sop_class, syntax in sorted({(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
                                     for ds in datasets}):
        ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate("127.0.0.1", servers.settings.orthanc_dicom_port,
                         ae_title=servers.settings.orthanc_aet)
    assert assoc.is_established
    assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    acknowledged = []
    started = time.monotonic()
    try:
        for index, ds in enumerate(datasets):
            time.sleep(max(0.0, started + index / PACE - time.monotonic()))
            assert int(assoc.send_c_store(ds).Status) == 0
            acknowledged.append(time.monotonic())
            after_each(index)
    finally:
        assoc.release()
    return acknowledged


def head_ct(tmp_path: Path, key: str, **fields: object) -> tuple[str, list[pydicom.Dataset]]:
    study = HeadCT(key=key, slices=SLICES, **fields)  # type: ignore[arg-type]
    return study_uid(study), [pydicom.dcmread(p) for p in write_head_ct(tmp_path, study)]


def wait_analysed(servers: Servers, uid: str, timeout: float = 60) -> WorklistItem:
    worklist = Worklist(servers.redis)

    def done() -> bool:
        item = worklist.get(uid)
        return item is not None and item.status.terminal

    servers.wait_until(done, timeout=timeout, what="the study's final analysis")
    item = worklist.get(uid)
    assert item is not None and item.status is StudyStatus.ANALYSED, item
    return item


def sr_of(servers: Servers, item: WorklistItem) -> pydicom.Dataset:
    [instance] = our_srs(servers, item)
    return servers.orthanc.instance_dataset(instance)


# Attributes that say when an SR was written, not what it says.
WHEN = ("ContentDate", "ContentTime", "InstanceCreationDate", "InstanceCreationTime",
        "SeriesDate", "SeriesTime")


def without_times(ds: pydicom.Dataset) -> pydicom.Dataset:
    copy = pydicom.Dataset(ds)
    for keyword in WHEN:
        if keyword in copy:
            delattr(copy, keyword)
    # The service's own entry in Contributing Equipment says when it wrote the SR.
    for item in copy.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            del item.ContributionDateTime
    return copy


def difference(a: pydicom.Dataset, b: pydicom.Dataset, path: str = "") -> str:
    """Where two datasets first differ (for the assertion's message)."""
    for element in a:
        other = b.get(element.tag)
        if other is None:
            return f"{path}{element.keyword} missing on the right"
        if element.VR == "SQ":
            for i, (x, y) in enumerate(zip(element.value, other.value, strict=False)):
                found = difference(x, y, f"{path}{element.keyword}[{i}].")
                if found:
                    return found
            if len(element.value) != len(other.value):
                return f"{path}{element.keyword}: {len(element.value)} != {len(other.value)}"
        elif element.value != other.value:
            return f"{path}{element.keyword}: {element.value!r} != {other.value!r}"
    extra = [e.keyword for e in b if e.tag not in a]
    return f"{path} only on the right: {extra}" if extra else ""


def test_a_positive_ct_is_raised_before_its_last_image_and_its_sr_is_the_study_level_one(
        stack: Callable[..., Stack], clean_servers: Servers, tmp_path: Path) -> None:
    servers = clean_servers
    worklist = Worklist(servers.redis)
    uid, datasets = head_ct(tmp_path, "stream-positive", disc_mm=10, bleed_slices=BLEED)
    running = stack()
    raised_at: list[int] = []

    def watch(index: int) -> None:
        item = worklist.get(uid)
        if not raised_at and item is not None and item.priority is PriorityClass.CRITICAL:
            raised_at.append(index)
            assert item.arriving > 0
            assert item.status_reason.startswith("images still arriving")
            assert any(r.startswith("AI, preliminary: ") for r in item.priority_reasons)

    paced_send(servers, datasets, watch)
    assert raised_at, "not raised while the images were arriving"
    assert raised_at[0] < SLICES - 1
    item = wait_analysed(servers, uid)
    assert item.arriving == 0 and item.priority is PriorityClass.CRITICAL
    [result] = item.results
    assert result.images_from_cache > 0
    [preliminary] = item.preliminary
    assert preliminary.n_images < SLICES and preliminary.probability >= preliminary.threshold
    streamed = sr_of(servers, item)
    running.stop()

    # The same study analysed the way it always was, at stability and without the cache.
    servers.orthanc._api.delete_instances_id(our_srs(servers, item)[0])
    study_level = dict(servers.env, TRIAGE_STREAMING="false")
    with pytest.MonkeyPatch.context() as patch:
        for name, value in study_level.items():
            patch.setenv(name, value)
        jobs.context.cache_clear()
        assert jobs.analyse_study(item.orthanc_id, uid, item.inputs) == "analysed"
        jobs.context.cache_clear()
    again = worklist.get(uid)
    assert again is not None and again.results[0].images_from_cache == 0
    whole = sr_of(servers, again)
    assert whole.SOPInstanceUID == streamed.SOPInstanceUID
    assert whole.SeriesInstanceUID == streamed.SeriesInstanceUID
    # The same content tree, probabilities included (each image is scored on its own and
    # kept exactly as float32), and the same header but for when it was written.
    if without_times(whole) != without_times(streamed):
        print(difference(without_times(whole), without_times(streamed)))
    assert without_times(whole) == without_times(streamed)


def test_a_negative_ct_has_no_image_scored_twice(
        stack: Callable[..., Stack], clean_servers: Servers, tmp_path: Path) -> None:
    servers = clean_servers
    uid, datasets = head_ct(tmp_path, "stream-negative")
    stack()
    paced_send(servers, datasets)
    item = wait_analysed(servers, uid)
    assert item.priority is PriorityClass.ROUTINE and not item.preliminary
    [result] = item.results
    cache = ScoreCache(servers.redis, servers.settings, MODEL, VERSION)
    # Every image was scored exactly once: most while arriving, the rest at stability.
    assert cache.computed(result.series_instance_uid) == SLICES
    assert len(cache.scored(result.series_instance_uid)) == SLICES
    assert SLICES // 2 <= result.images_from_cache < SLICES + 1


def test_a_worker_killed_mid_stream_still_leaves_one_sr(
        stack: Callable[..., Stack], clean_servers: Servers, tmp_path: Path) -> None:
    servers = clean_servers
    uid, datasets = head_ct(tmp_path, "stream-killed", disc_mm=10, bleed_slices=(45,))
    running = stack()
    cache = ScoreCache(servers.redis, servers.settings, MODEL, VERSION)
    series_uid = str(datasets[0].SeriesInstanceUID)
    killed: list[int] = []

    def kill(index: int) -> None:
        if not killed and cache.computed(series_uid) > 0:
            running.worker.signal(signal.SIGKILL)
            running.worker.stop()
            killed.append(index)
        elif killed and index == killed[0] + 10:
            running.restart_worker()

    paced_send(servers, datasets, kill)
    assert killed and killed[0] < SLICES - 11, "the worker was not killed mid-stream"
    item = wait_analysed(servers, uid, timeout=90)
    assert len(our_srs(servers, item)) == 1
    assert item.priority is PriorityClass.CRITICAL
    assert cache.computed(series_uid) >= SLICES


def test_a_final_choice_of_another_series_keeps_the_raise_and_says_why(
        stack: Callable[..., Stack], clean_servers: Servers, tmp_path: Path) -> None:
    servers = clean_servers
    worklist = Worklist(servers.redis)
    pager = Pager()
    try:
        webhook = [{"name": "pager", "url": pager.url, "on": "critical", "preliminary": True}]
        stack(TRIAGE_WEBHOOKS=json.dumps(webhook))
        # A short positive series first, then the study's main series, larger and negative:
        # the analysis of the complete study chooses the larger one.
        uid, scout = head_ct(tmp_path, "stream-scout", disc_mm=10, bleed_slices=(3, 4))
        scout = scout[:12]
        _, main = head_ct(tmp_path, "stream-main")
        for ds in main:
            for keyword in ("StudyInstanceUID", "PatientID", "PatientName", "AccessionNumber"):
                setattr(ds, keyword, getattr(scout[0], keyword))
        paced_send(servers, [*scout, *main])
        item = wait_analysed(servers, uid)
        [preliminary] = item.preliminary
        [result] = item.results
        assert preliminary.series_instance_uid == str(scout[0].SeriesInstanceUID)
        assert result.series_instance_uid == str(main[0].SeriesInstanceUID)
        assert not any(f.positive for f in item.findings)
        assert item.priority is PriorityClass.CRITICAL  # never lowered
        [why] = [r for r in item.priority_reasons if "not confirmed" in r]
        assert "another series" in why and "stays raised" in why

        def messages() -> list[dict[str, object]]:
            return [json.loads(body) for body in pager.bodies]

        servers.wait_until(lambda: len(messages()) >= 2, timeout=30,
                           what="the preliminary message and its follow-up")
        first, follow_up = messages()[:2]
        assert first["event"] == "ai-preliminary-result" and first["preliminary"] is True
        assert follow_up["event"] == "ai-result" and follow_up["follows_preliminary"] is True
        assert follow_up["findings"] == []
        assert [p["code"] for p in follow_up["preliminary_not_confirmed"]] == ["1386000"]
        assert worklist.get(uid) is not None
    finally:
        pager.server.shutdown()


def test_batches_go_by_size_or_age_and_yield_to_analyses_of_complete_studies(
        clean_servers: Servers) -> None:
    connection = clean_servers.redis
    settings = clean_servers.settings.model_copy(update={
        "stream_batch_seconds": 0.25, "stream_max_waiting": 2})
    manifests = streaming_manifests(settings.models_dir)
    assert [m.id for m in manifests] == [MODEL]
    dispatcher = Dispatcher(settings, manifests)
    assert dispatcher.wants("CT") and not dispatcher.wants("CR")
    sent: list[Batch] = []
    # The first look at the change log (a watcher that starts leading catches up): full or
    # not, nothing says its images came in a burst; this batch is due by its age.
    dispatcher.add("study", "1.2.3", "series", ["a", "b"], now=0.0)
    dispatcher.add("study", "1.2.3", "series", ["b", "c"], now=0.1)
    assert dispatcher.send(connection, 0.2, sent.append) == 0  # neither full nor old enough
    assert dispatcher.send(connection, 0.26, sent.append) == 1
    assert sent[-1].instance_ids == ["a", "b", "c"]
    # A batch full before its time is a burst, left to the analysis at stability.
    dispatcher.polled(0.95)
    dispatcher.add("study", "1.2.3", "series", [str(i) for i in range(20)], now=1.0)
    assert dispatcher.send(connection, 1.1, sent.append) == 0 and dispatcher.bursts == 20
    # Within 0.1 s of the watcher's previous look at the change log: a burst as well.
    dispatcher.polled(1.15)
    dispatcher.add("study", "1.2.3", "series", [str(i) for i in range(16)], now=1.2)
    assert dispatcher.send(connection, 1.25, sent.append) == 0 and dispatcher.bursts == 36
    # A watcher held up for a second finds a scanner's images of that second at once: they
    # may have arrived at 20 a second, not a burst; streamed at once, in two pieces.
    dispatcher.polled(1.3)
    dispatcher.add("study", "1.2.3", "series", [str(i) for i in range(20)], now=2.3)
    assert dispatcher.send(connection, 2.3, sent.append) == 2 and dispatcher.bursts == 36
    assert [len(b.instance_ids) for b in sent[-2:]] == [16, 4]
    fresh = Dispatcher(settings, manifests)  # the first look, catching up: no burst either
    fresh.add("study", "1.2.3", "series", [str(i) for i in range(20)], now=3.0)
    assert fresh.send(connection, 3.0, sent.append) == 2 and fresh.bursts == 0
    dispatcher = Dispatcher(settings, manifests)
    # One that waited its time goes, in pieces of the model's batch size (16).
    dispatcher.add("study", "1.2.3", "series", [str(i) for i in range(20)], now=1.5)
    assert dispatcher.send(connection, 1.8, sent.append) == 2
    assert [len(b.instance_ids) for b in sent[-2:]] == [16, 4]
    # A complete study's batches are left to its analysis.
    dispatcher.add("study", "1.2.3", "series", ["d"], now=2.0)
    dispatcher.forget("study")
    assert dispatcher.send(connection, 3.0, sent.append) == 0 and dispatcher.dropped == 0
    # No room while streaming batches already wait: dropped, not kept for later.
    for _ in range(2):
        Queue(STREAM_QUEUE, connection=connection).enqueue("builtins.print")
    dispatcher.add("study", "1.2.3", "series", ["e"], now=4.0)
    assert dispatcher.send(connection, 4.3, sent.append) == 0 and dispatcher.dropped == 1
    Queue(STREAM_QUEUE, connection=connection).empty()
    # Nor while an analysis of a complete study waits.
    Queue("default", connection=connection).enqueue("builtins.print")
    dispatcher.add("study", "1.2.3", "series", ["f"], now=5.0)
    assert dispatcher.send(connection, 5.3, sent.append) == 0 and dispatcher.dropped == 2
    assert not dispatcher.pending and len(sent) == 7
