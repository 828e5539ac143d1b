"""Section ``streaming``: the service with streaming analysis off, then on.

With ``TRIAGE_STREAMING=true`` the leading watcher hands the arriving images of streaming
models (the head-CT model) to the workers in small batches, and a partial series over the
threshold raises the study at once ("AI, preliminary: ..."); at stability the analysis of the
complete study computes only the images not scored yet. The section restarts the watcher,
the workers and the API with the setting changed and measures, in each mode:

- **positive head CT** (``streaming_slices`` slices, a bleed in ``streaming_bleed``) sent the
  way a scanner sends it: one association, one C-STORE at a time, ``streaming_pace`` images
  a second. A thread reads the worklist item every 20 ms; the flag is the item's first
  ``critical`` priority. Its time is the service's own: ``preliminary[0].raised_at`` when a
  preliminary result raised it, else the time the reader first saw it (the analysis at
  stability raised it). It is measured from the acknowledgement of the first slice the model
  scores over the threshold (the first bleed slice: every bleed slice scores 1.0) and from the
  acknowledgement of the last slice (negative when the flag came first);
- **negative head CT**: time-to-notification from the last slice acknowledged to
  ``analysed_at`` (``bench.measure.ttn_breakdown``), sent at the same pace;
- **radiograph** time-to-notification (radiographs do not stream), sent as section ``ttn``
  sends them;
- **ingest**: Orthanc alone against Orthanc with the service, burst sends (the ``ingest``
  section's measure, ``streaming_ingest_rounds`` pairs);
- **efficiency**: one round of the ``efficiency`` section's measure (radiographs, which do
  not stream; the round starts the workers, so it comes first).

It runs last: it leaves the service running with streaming on.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pydicom
import redis
from pynetdicom import AE

from bench.measure import summary, ttn_breakdown, wait_analysed
from bench.studies import head_ct, radiograph
from triage.priority import PriorityClass
from triage.servers import wait_for_http
from triage.settings import Settings
from triage.uids import derived_uid
from triage.worklist import StudyStatus, Worklist, WorklistItem

if TYPE_CHECKING:
    from bench.run import Bench

ENV = "TRIAGE_STREAMING"
POLL_SECONDS = 0.02
PRELIMINARY_REASON = "AI, preliminary:"
# Goals (seconds over the stable age for the times-to-notification).
FLAG_GOAL_SECONDS = 1.0
TTN_GOAL_OVER_STABLE_AGE = 0.3
INGEST_GOAL = 0.9
EFFICIENCY_GOAL = 0.8


def send_paced(settings: Settings, files: Sequence[Path], pace: float) -> list[float]:
    """C-STORE ``files`` in order over one association, one at a time, starting one every
    ``1 / pace`` seconds (or as soon as the previous is acknowledged, when that is later);
    returns when each was acknowledged (epoch seconds). The files are read beforehand, so the
    pace is the network's and Orthanc's alone."""
    datasets = [pydicom.dcmread(path) for path in files]
    ae = AE(ae_title="BENCHPACED")
    for sop_class, syntax in sorted({(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
                                     for ds in datasets}):
        ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate("127.0.0.1", settings.orthanc_dicom_port,
                         ae_title=settings.orthanc_aet)
    if not assoc.is_established:
        raise RuntimeError("Orthanc refused the association")
    # Nagle's algorithm slows C-STORE 10-20x against Debian's Orthanc (DESIGN.md, gotchas).
    assert assoc.dul.socket is not None and assoc.dul.socket.socket is not None
    assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    acked: list[float] = []
    try:
        started = time.monotonic()
        for n, ds in enumerate(datasets):
            delay = started + n / pace - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            status = assoc.send_c_store(ds)
            acked.append(time.time())
            if not status or int(status.Status) != 0:
                raise RuntimeError(f"C-STORE of image {n} answered {status}")
    finally:
        assoc.release()
    return acked


class FlagReader(threading.Thread):
    """Reads a study's worklist item every ``POLL_SECONDS`` until its priority is critical
    or it is analysed; ``seen_at`` is when it was first seen critical (epoch seconds) and
    ``arriving`` the images the item counted as received at that moment."""

    def __init__(self, connection: redis.Redis, uid: str) -> None:
        super().__init__(daemon=True)
        self.worklist = Worklist(connection)
        self.uid = uid
        self.seen_at: float | None = None
        self.arriving: int | None = None
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            item = self.worklist.get(self.uid)
            if item is not None and item.priority is PriorityClass.CRITICAL:
                self.seen_at = time.time()
                self.arriving = item.arriving
                return
            if item is not None and item.status is StudyStatus.ANALYSED:
                return
            self.stopping.wait(POLL_SECONDS)

    def stop(self) -> None:
        self.stopping.set()
        self.join()


def restart_service(bench: Bench, streaming: bool) -> None:
    """Stop the watcher, the workers and the API, and start the watcher and the API again with
    ``TRIAGE_STREAMING`` set to ``streaming`` (every process reads it from the environment it
    inherits); the efficiency round that comes next starts the workers."""
    stack = bench.stack
    value = "true" if streaming else "false"
    os.environ[ENV] = value
    stack.env[ENV] = value
    for process in (stack.watcher, stack.api):
        process.signal(signal.SIGTERM)
    stack.stop_workers()
    for process in (stack.watcher, stack.api):
        process.stop(20.0, already_signalled=True)
    stack.watcher.start()
    stack.api.start()
    wait_for_http(f"http://127.0.0.1:{stack.settings.api_port}/healthz", stack.api)


def warm_up(bench: Bench, mode: str) -> None:
    """A short head CT at the scanner's pace, analysed: the head-CT model has run in a worker
    (with streaming on, on the arriving images too) before anything is timed."""
    c = bench.config
    key = bench.key(f"streaming-{mode}-warm", 0)
    files = head_ct(bench.files, key, min(20, c.streaming_slices))
    send_paced(bench.stack.settings, files, c.streaming_pace)
    shutil.rmtree(files[0].parent)
    wait_analysed(bench.stack.worklist, [derived_uid("bench-study", key)],
                  bench.timeout(len(files)), bench.alive)


def positive(bench: Bench, mode: str, n: int) -> dict[str, Any]:
    """One positive head CT at the scanner's pace; when and how its flag came."""
    c = bench.config
    key = bench.key(f"streaming-{mode}-positive", n)
    bleed = range(*c.streaming_bleed)
    files = head_ct(bench.files, key, c.streaming_slices, bleed=bleed)
    uid = derived_uid("bench-study", key)
    assert bench.redis is not None
    reader = FlagReader(redis.Redis(connection_pool=bench.redis.connection_pool), uid)
    reader.start()
    try:
        acked = send_paced(bench.stack.settings, files, c.streaming_pace)
        final = wait_analysed(bench.stack.worklist, [uid], bench.timeout(len(files)),
                              bench.alive)
    finally:
        reader.stop()
    shutil.rmtree(files[0].parent)
    item = bench.stack.worklist.get(uid)
    if final[uid] != StudyStatus.ANALYSED.value or item is None:
        raise RuntimeError(f"positive head CT ended {final[uid]}: {item}")
    if item.priority is not PriorityClass.CRITICAL:
        raise RuntimeError(f"positive head CT not flagged: priority {item.priority}, "
                           f"results {item.results}")
    seen = reader.seen_at
    if seen is None:  # critical with the analysis, between two reads
        seen = item.analysed_at.timestamp() if item.analysed_at else time.time()
    first_over = bleed[0]
    preliminary = item.preliminary[0] if item.preliminary else None
    flag = preliminary.raised_at.timestamp() if preliminary is not None else seen
    record: dict[str, Any] = {
        "uid": uid,
        "flag_source": "preliminary" if preliminary is not None else "analysis",
        "flag_after_first_over_threshold": flag - acked[first_over],
        "flag_after_last_slice": flag - acked[-1],
        "seen_after_flag": seen - flag,
        "arriving_when_seen": reader.arriving,
        "sent_seconds": acked[-1] - acked[0],
        "analysed_after_last_slice": ttn_breakdown(bench.redis, uid, acked[-1]),
        "key_slice": _slice_of(key, len(files), _key_instance(item)),
        "reasons": [r for r in item.priority_reasons if r.startswith("AI")],
    }
    if preliminary is not None:
        record["preliminary"] = {"images": preliminary.n_images,
                                 "probability": preliminary.probability,
                                 "raised_at": preliminary.raised_at.isoformat()}
    return record


def _key_instance(item: WorklistItem) -> str | None:
    """The key image of the study's first positive finding."""
    return next((f.key_sop_instance_uid for f in item.findings if f.positive), None)


def _slice_of(key: str, slices: int, sop_uid: str | None) -> int | None:
    """The index of the slice ``sop_uid`` is in the head CT ``key`` (bench.studies UIDs)."""
    for index in range(slices):
        if str(derived_uid("bench-instance", key, str(index))) == sop_uid:
            return index
    return None


def negative(bench: Bench, mode: str) -> dict[str, Any]:
    """``streaming_negatives`` negative head CTs at the scanner's pace, one after the other's
    analysis; time-to-notification from the last slice."""
    c = bench.config
    records = []
    for n in range(c.streaming_negatives):
        key = bench.key(f"streaming-{mode}-negative", n)
        files = head_ct(bench.files, key, c.streaming_slices)
        uid = derived_uid("bench-study", key)
        acked = send_paced(bench.stack.settings, files, c.streaming_pace)
        final = wait_analysed(bench.stack.worklist, [uid], bench.timeout(len(files)),
                              bench.alive)
        shutil.rmtree(files[0].parent)
        item = bench.stack.worklist.get(uid)
        if final[uid] != StudyStatus.ANALYSED.value or item is None:
            raise RuntimeError(f"negative head CT ended {final[uid]}: {item}")
        if item.priority is PriorityClass.CRITICAL or item.preliminary:
            raise RuntimeError(f"negative head CT flagged: {item.priority_reasons}")
        records.append(ttn_breakdown(bench.redis, uid, acked[-1]))
    return {"studies": len(records), "slices": c.streaming_slices,
            "summary": summary([r["ttn"] for r in records]),
            "parts": {name: summary([r[name] for r in records])
                      for name in records[0] if name != "ttn"},
            "records": records}


def mode_section(bench: Bench, mode: str, streaming: bool) -> dict[str, Any]:
    c = bench.config
    age = c.stable_age
    restart_service(bench, streaming)
    # First, as it starts the workers (the section ``efficiency`` restarts them each round).
    if c.streaming_reruns:
        efficiency: dict[str, Any] | None = bench.efficiency_round(100 + int(streaming))
    else:
        efficiency = None
        bench.stack.start_workers()
    warm_up(bench, mode)
    positives = [positive(bench, mode, n) for n in range(c.streaming_positives)]
    bench.stack.delete_all_studies()
    after_first = [r["flag_after_first_over_threshold"] for r in positives]
    after_last = [r["flag_after_last_slice"] for r in positives]
    neg = negative(bench, mode)
    bench.stack.delete_all_studies()
    cr = bench.ttn(f"streaming-{mode}-cr", c.streaming_radiographs,
                   lambda key, n: radiograph(bench.files, key, n), age + TTN_GOAL_OVER_STABLE_AGE)
    bench.stack.delete_all_studies()
    ingest = bench.ingest_section(rounds=c.streaming_ingest_rounds,
                                  label=f"streaming-{mode}") if c.streaming_reruns else None
    out = {
        "streaming": streaming,
        "positive": {"studies": len(positives), "slices": c.streaming_slices,
                     "bleed": [c.streaming_bleed[0], c.streaming_bleed[1] - 1],
                     # The slowest of the studies.
                     "flag_after_first_over_threshold": max(after_first),
                     "flag_after_last_slice": max(after_last),
                     "summary": {"flag_after_first_over_threshold": summary(after_first),
                                 "flag_after_last_slice": summary(after_last)},
                     "records": positives},
        "negative": neg,
        "radiograph": {"studies": cr["studies"], "summary": cr["summary"]["ttn"],
                       "parts": cr["summary"], "records": cr["records"]},
        "ingest_ratio": None, "ingest": None, "efficiency_ratio": None, "efficiency": None,
    }
    out["met"] = {
        "positive": max(after_first) <= FLAG_GOAL_SECONDS,
        "negative": neg["summary"]["p95"] <= age + TTN_GOAL_OVER_STABLE_AGE,
        "radiograph": cr["summary"]["ttn"]["p95"] <= age + TTN_GOAL_OVER_STABLE_AGE,
    }
    if ingest is not None:
        out["ingest_ratio"] = ingest["ratio"]
        out["ingest"] = {
            **{k: ingest[k] for k in ("round_ratios", "series", "slices_per_series")},
            # Who used the CPU while the images came in, in the median pair.
            "cpu_seconds": {"alone": ingest["alone"]["cpu_seconds"],
                            "with_service": ingest["with_service"]["cpu_seconds"]}}
        out["met"]["ingest"] = ingest["ratio"] >= INGEST_GOAL
    if efficiency is not None:
        out["efficiency_ratio"] = efficiency["ratio"]
        out["efficiency"] = {
            "studies": efficiency["studies"],
            "pipeline_studies_per_second": efficiency["pipeline"]["studies_per_second"],
            "limit_studies_per_second": efficiency["limit"]["studies_per_second"],
            "mean_parts": efficiency["pipeline"]["mean_parts"],
            "cpu_seconds_per_study": efficiency["pipeline"]["cpu_seconds_per_study"]}
        out["met"]["efficiency"] = efficiency["ratio"] >= EFFICIENCY_GOAL
    return out


def section(bench: Bench) -> dict[str, Any]:
    """Both modes, streaming off first; leaves the service running with streaming on."""
    c = bench.config
    modes = {name: mode_section(bench, name, on) for name, on in (("off", False), ("on", True))}
    return {"stable_age": c.stable_age, "pace_images_per_second": c.streaming_pace,
            "goals": {"flag_after_first_over_threshold": FLAG_GOAL_SECONDS,
                      "negative_ttn_p95": c.stable_age + TTN_GOAL_OVER_STABLE_AGE,
                      "radiograph_ttn_p95": c.stable_age + TTN_GOAL_OVER_STABLE_AGE,
                      "ingest_ratio": INGEST_GOAL, "efficiency_ratio": EFFICIENCY_GOAL},
            **modes}
