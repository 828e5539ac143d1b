"""What radiologists read when a study ends without a result: plain sentences, never an
exception's class name or a traceback; the technical cause stays with administrators."""

from __future__ import annotations

import re

import pytest
from rq.timeouts import JobTimeoutException

from triage.errors import (
    InvalidInput,
    ModelPackageError,
    OutOfScope,
    PermanentError,
    StudyGone,
    TransientError,
    status_reason,
)

_TECHNICAL = re.compile(
    r"\b\w*(Error|Exception)\b|Traceback|\[ONNXRuntime|\bNone\b|object has|Task exceeded")


@pytest.mark.parametrize("exc", [
    AttributeError("'FileDataset' object has no attribute 'PatientID'"),
    KeyError("1.2.840.10008.5.1.4.1.1.99"),
    ValueError("'X' is not a valid PatientSexValues"),
    ModelPackageError("m@1: inference failed: [ONNXRuntimeError] : 2 : INVALID_ARGUMENT"),
    TransientError("Orthanc unreachable for GET /studies/1: connection failed"),
    StudyGone("not found in Orthanc: file of instance 0a1b"),
    PermanentError("Orthanc refused POST /instances (400)"),
    JobTimeoutException("Task exceeded maximum timeout value (600 seconds)"),
])
def test_a_failure_reads_as_a_sentence(exc: Exception) -> None:
    reason = status_reason(exc)
    assert reason and not _TECHNICAL.search(reason), reason
    assert str(exc) not in reason


@pytest.mark.parametrize("exc", [OutOfScope("no applicable model: modality MR"),
                                 InvalidInput("Rescale Slope is missing")])
def test_skips_keep_the_services_own_reason(exc: Exception) -> None:
    assert status_reason(exc) == str(exc)
