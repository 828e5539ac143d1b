"""The exceptions the service raises, named by what the worker should do with them.

Foreign exceptions (HTTP, Redis, pydicom, onnxruntime) are translated into these once, at the
adapter that calls the foreign library (STYLE.md, principle 4).
"""

from __future__ import annotations

from rq.timeouts import JobTimeoutException


class TriageError(Exception):
    """Base class of every error the service raises on purpose."""


class TransientError(TriageError):
    """A server is unreachable or overloaded: the job is retried later."""


class PermanentError(TriageError):
    """Retrying cannot help; the study ends with a status and a reason a radiologist can read."""


class OutOfScope(PermanentError):
    """The study is outside every model's intended use: it ends as ``skipped``."""


class InvalidInput(PermanentError):
    """The study cannot be analysed (undecodable, inconsistent): it ends as ``skipped``."""


class StudyGone(PermanentError):
    """The study, or an instance of it, is no longer in Orthanc (deleted meanwhile)."""


class ModelPackageError(TriageError):
    """A model package is invalid or its weights do not match the manifest; it is refused."""


# What radiologists read when an analysis did not end with a result; the technical cause goes
# to administrators (the failed analyses listing, the logs), never into the worklist.
_INTERNAL = ("the analysis stopped on an internal error; administrators see the cause in "
             "the list of failed analyses")
_REASONS: tuple[tuple[type[BaseException], str], ...] = (
    (JobTimeoutException, "the analysis took longer than its time limit; administrators see "
                          "the cause in the list of failed analyses"),
    (TransientError, "the image server did not answer"),
    (ModelPackageError, "a model could not run on this study; administrators see the cause "
                        "in the list of failed analyses"),
)


def status_reason(exc: BaseException) -> str:
    """The worklist reason for ``exc``: the service's own explanation for a study it cannot
    analyse (written for radiologists, free of patient data), a plain sentence otherwise;
    never an exception's class name or a traceback."""
    if isinstance(exc, OutOfScope | InvalidInput):
        return str(exc)
    for kind, reason in _REASONS:
        if isinstance(exc, kind):
            return reason
    if isinstance(exc, StudyGone):
        return "images of the study were deleted from the image server during the analysis"
    if isinstance(exc, PermanentError):
        return ("the image server refused a request of the analysis; administrators see the "
                "cause in the list of failed analyses")
    return _INTERNAL
