"""Logging set-up, and the pseudonymous key that names a study in logs.

Logs never carry patient names, identifiers or birth dates (DESIGN.md, "Configuration and
security"): a study appears as a short hash of its Study Instance UID.
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings


def pseudonym(study_instance_uid: str) -> str:
    """A short, stable key for a study that reveals nothing about the patient."""
    return hashlib.sha256(study_instance_uid.encode()).hexdigest()[:12]


def configure_logging(component: str) -> None:
    level = os.environ.get("TRIAGE_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s {component}[%(process)d] %(levelname)s %(name)s: %(message)s",
    )
    # Request lines drown the service's own messages.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # The DICOM libraries quote the values they warn about (an invalid birth date, a patient
    # name without a caret): patient data that must not reach a log. Their errors still do,
    # and the service says itself what it does about invalid values.
    for library in ("pydicom", "highdicom"):
        logging.getLogger(library).setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", module=rf"{library}(\..*)?$")
