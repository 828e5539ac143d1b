"""Priority classes of the worklist and how AI findings may raise them."""

from __future__ import annotations

from collections.abc import Iterable
from enum import Enum


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
