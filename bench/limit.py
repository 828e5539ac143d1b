"""The throughput limit of analysis on this machine: the same studies fetched from the same
Orthanc, decoded and run through the same model, in a tight loop, by the same number of
processes, and nothing else (no queue, no worklist, no SR)."""

from __future__ import annotations

import io
import multiprocessing
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pydicom

from triage.inference import run_model, self_test
from triage.orthanc import OrthancClient
from triage.registry import ModelPackage
from triage.settings import Settings

_state: dict[str, object] = {}


def _init(model_folder: str) -> None:
    settings = Settings()
    package = ModelPackage.load(Path(model_folder))
    self_test(package)  # the session is created and warm before the clock starts
    _state.update(settings=settings, package=package,
                  orthanc=OrthancClient.from_settings(settings))


def _analyse(instance_ids: Sequence[str]) -> float:
    started = time.perf_counter()
    orthanc = _state["orthanc"]
    settings = _state["settings"]
    assert isinstance(orthanc, OrthancClient) and isinstance(settings, Settings)

    def fetch(instance_id: str) -> pydicom.Dataset:
        return pydicom.dcmread(io.BytesIO(orthanc.instance_file(instance_id)))

    with ThreadPoolExecutor(max_workers=settings.fetch_threads) as pool:
        datasets = list(pool.map(fetch, instance_ids))
    package = _state["package"]
    assert isinstance(package, ModelPackage)
    run_model(package, datasets)
    return time.perf_counter() - started


def _ready(_: int) -> bool:
    # Slow enough that every process takes some, which it can only once its model is loaded.
    time.sleep(0.5)
    return True


def measure_limit(model_folder: Path, studies: Sequence[Sequence[str]],
                  processes: int) -> dict[str, float]:
    """Studies per second of fetch + decode + inference over ``studies`` (lists of Orthanc
    instance ids), by ``processes`` processes each with its own warm onnxruntime session."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(processes, initializer=_init, initargs=(str(model_folder),)) as pool:
        # Wait until every process has loaded its model.
        pool.map(_ready, range(processes * 4), chunksize=1)
        started = time.perf_counter()
        per_study = pool.map(_analyse, [list(s) for s in studies], chunksize=1)
        elapsed = time.perf_counter() - started
    return {"studies": len(studies), "seconds": elapsed,
            "studies_per_second": len(studies) / elapsed,
            "mean_seconds_per_study": sum(per_study) / len(per_study)}
