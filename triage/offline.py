"""Running a model on DICOM files from disk, with no Orthanc and no Redis.

What ``triage models run`` prints: for each study among the files, the series the model
chose (or why it chose none), each finding with its probability, the priority the findings
imply, and where the time went.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from triage.errors import InvalidInput, OutOfScope
from triage.findings import ModelResult
from triage.inference import run_model
from triage.priority import PriorityClass, highest
from triage.registry import ModelPackage
from triage.selection import select_series, series_info


@dataclass(frozen=True)
class StudyOutcome:
    study_instance_uid: str
    result: ModelResult | None
    skipped: str = ""

    @property
    def priority(self) -> PriorityClass:
        findings = self.result.findings if self.result else ()
        return highest(f.priority for f in findings if f.positive)


def read_studies(paths: Iterable[Path]) -> dict[str, dict[str, list[pydicom.Dataset]]]:
    """DICOM files under ``paths`` grouped by study, then series; other files are ignored."""
    studies: dict[str, dict[str, list[pydicom.Dataset]]] = defaultdict(lambda: defaultdict(list))
    for root in paths:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in files:
            try:
                ds = pydicom.dcmread(path)
            except (InvalidDicomError, OSError, ValueError, EOFError):
                continue
            if "StudyInstanceUID" in ds and "SeriesInstanceUID" in ds:
                studies[str(ds.StudyInstanceUID)][str(ds.SeriesInstanceUID)].append(ds)
    return studies


def analyse_files(package: ModelPackage, paths: Iterable[Path]) -> list[StudyOutcome]:
    """Run ``package`` on every study found under ``paths``."""
    outcomes = []
    for study_uid, series in read_studies(paths).items():
        infos = {uid: series_info(datasets[0], len(datasets)) for uid, datasets in series.items()}
        try:
            chosen = select_series(package.manifest, list(infos.values()))
            result = run_model(package, series[chosen.series_instance_uid])
        except (OutOfScope, InvalidInput) as exc:
            outcomes.append(StudyOutcome(study_uid, None, skipped=str(exc)))
            continue
        outcomes.append(StudyOutcome(study_uid, result))
    return outcomes


def describe(outcome: StudyOutcome) -> str:
    """A few lines for a terminal."""
    lines = [f"study {outcome.study_instance_uid}"]
    if outcome.result is None:
        lines.append(f"  skipped: {outcome.skipped}")
        return "\n".join(lines)
    result = outcome.result
    lines.append(f"  series {result.series_instance_uid} "
                 f"({len(result.input_sop_instance_uids)} images)")
    for f in result.findings:
        mark = "POSITIVE" if f.positive else "negative"
        lines.append(f"  {f.concept.meaning} [{f.concept.scheme} {f.concept.value}]: "
                     f"p={f.probability:.3f} (threshold {f.threshold:g}) {mark}; "
                     f"key image {f.key_sop_instance_uid}")
    lines.append(f"  priority: {outcome.priority.value}")
    timings = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in result.timings.items())
    lines.append(f"  time: {timings}")
    return "\n".join(lines)
