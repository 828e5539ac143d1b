"""The exceptions the service raises, named by what the worker should do with them.

Foreign exceptions (HTTP, Redis, pydicom, onnxruntime) are translated into these once, at the
adapter that calls the foreign library (STYLE.md, principle 4).
"""

from __future__ import annotations


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


class ModelPackageError(TriageError):
    """A model package is invalid or its weights do not match the manifest; it is refused."""
