"""The throughput limit of analysis on this machine: the same studies fetched from the same
Orthanc, decoded and run through the same model, in a tight loop, by the same number of
processes, and nothing else (no queue, no worklist, no SR).

The loop calls the very functions a worker calls (``SeriesLoader.load`` with the worker's
thread count, then ``infer``), so the ratio of the pipeline to this limit measures what the
pipeline adds around them.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Sequence
from pathlib import Path

from triage.inference import infer, self_test, slice_transform
from triage.memory import tune_for_images
from triage.orthanc import OrthancClient
from triage.registry import ModelPackage
from triage.retrieval import SeriesLoader
from triage.settings import Settings
from triage.workers import lower_priority

_state: dict[str, object] = {}


def _init(model_folder: str) -> None:
    tune_for_images()  # as a worker does
    settings = Settings()
    lower_priority(settings.worker_nice)
    package = ModelPackage.load(Path(model_folder))
    self_test(package)  # the session is created and warm before the clock starts
    loader = SeriesLoader(OrthancClient.from_settings(settings), settings.fetch_threads)
    _state.update(package=package, loader=loader)


def _analyse(instance_ids: Sequence[str]) -> float:
    started = time.perf_counter()
    package, loader = _state["package"], _state["loader"]
    assert isinstance(package, ModelPackage) and isinstance(loader, SeriesLoader)
    prep = package.manifest.preprocessing
    loaded = loader.load(instance_ids, prep.rescale, slice_transform(prep))
    infer(package, loaded.volume, "")
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
