"""The clock of the vigilance records.

Every time the surveillance stores or judges (when a study was analysed or arrived, when a
check ran, when an alert was raised) comes from here: real time plus
``TRIAGE_VIGILANCE_CLOCK_OFFSET_DAYS``, so that a validation drill can replay weeks of
studies in an hour and see the daily charts and alerts they would produce.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from triage.settings import Settings


def now(settings: Settings) -> datetime:
    """The current vigilance time (UTC)."""
    return datetime.now(UTC) + timedelta(days=settings.vigilance_clock_offset_days)
