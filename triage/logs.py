"""Logging set-up, and the pseudonymous key that names a study in logs.

Logs never carry patient names, identifiers or birth dates (DESIGN.md, "Configuration and
security"): a study appears as a short hash of its Study Instance UID.
"""

from __future__ import annotations

import hashlib
import logging
import os


def pseudonym(study_instance_uid: str) -> str:
    """A short, stable key for a study that reveals nothing about the patient."""
    return hashlib.sha256(study_instance_uid.encode()).hexdigest()[:12]


def configure_logging(component: str) -> None:
    level = os.environ.get("TRIAGE_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s {component}[%(process)d] %(levelname)s %(name)s: %(message)s",
    )
    # Request lines and per-module copy notes drown the service's own messages.
    for noisy in ("httpx", "highdicom"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
