"""Priority classes of the worklist and how AI findings may raise them."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from fnmatch import fnmatchcase
from typing import Any


class PriorityClass(str, Enum):
    """Worklist priority classes, highest first (see DESIGN.md, "Priorities")."""

    CRITICAL = "critical"
    URGENT = "urgent"
    ROUTINE = "routine"

    @property
    def rank(self) -> int:
        """0 for the most urgent class; used to sort the worklist."""
        return _RANK[self]

    @classmethod
    def coerce(cls, value: str | PriorityClass) -> PriorityClass:
        return value if isinstance(value, cls) else cls(str(value).lower())


_RANK = {PriorityClass.CRITICAL: 0, PriorityClass.URGENT: 1, PriorityClass.ROUTINE: 2}


def highest(classes: Iterable[PriorityClass | None]) -> PriorityClass:
    """The most urgent of ``classes``; ``routine`` when none is given.

    AI findings only ever raise a study's priority: the result is never below any input.
    """
    present = [c for c in classes if c is not None]
    return min(present, key=lambda c: c.rank) if present else PriorityClass.ROUTINE


# Requested Procedure Priority (0040,1003) and Scheduled Procedure Step Priority (0074,1200)
# values that make a study urgent before any analysis.
_URGENT_REQUEST_PRIORITIES = {"STAT": "STAT", "HIGH": "HIGH priority"}
# Where the emergency department shows in the images: the department, the requesting service
# and the patient's current location.
_LOCATION_KEYWORDS = ("InstitutionalDepartmentName", "RequestingService",
                      "CurrentPatientLocation")


@dataclass(frozen=True)
class ClinicalPriority:
    """The floor set by what the requester and the modality said, before any AI runs."""

    priority: PriorityClass
    reasons: tuple[str, ...] = ()


def clinical_priority(attributes: Mapping[str, Any], *, calling_aet: str = "",
                      emergency_locations: Iterable[str] = (),
                      emergency_aets: Iterable[str] = ()) -> ClinicalPriority:
    """Urgent for STAT or HIGH requests and for studies from the emergency department.

    ``attributes`` are one source instance's attributes keyed by DICOM keyword; patterns are
    shell-style and case-insensitive.
    """
    reasons = []
    for keyword in ("RequestedProcedurePriority", "ScheduledProcedureStepPriority"):
        value = str(attributes.get(keyword) or "").strip().upper()
        if value in _URGENT_REQUEST_PRIORITIES:
            reasons.append(f"clinical: {_URGENT_REQUEST_PRIORITIES[value]} request")
            break
    patterns = [p.upper() for p in emergency_locations]
    places = [str(attributes.get(k) or "").strip().upper() for k in _LOCATION_KEYWORDS]
    if any(fnmatchcase(place, p) for place in places if place for p in patterns):
        reasons.append("clinical: emergency department")
    elif calling_aet and calling_aet.strip().upper() in {a.upper() for a in emergency_aets}:
        reasons.append("clinical: sent by an emergency-department modality")
    priority = PriorityClass.URGENT if reasons else PriorityClass.ROUTINE
    return ClinicalPriority(priority, tuple(reasons))
