"""The watcher's clock of arrivals: when a study is complete, and when Orthanc's own
announcement of it can be skipped."""

from __future__ import annotations

import pytest

from triage.arrivals import ArrivalClock


def test_a_study_is_due_once_quiet_for_the_stable_age() -> None:
    clock = ArrivalClock(stable_age=2)
    clock.arrived("a", now=10.0)
    clock.arrived("a", now=11.5)  # another instance restarts the wait
    assert clock.due(now=13.4) == []
    assert clock.next_due() == 13.5
    assert clock.due(now=13.5) == ["a"]


def test_studies_are_due_longest_quiet_first() -> None:
    clock = ArrivalClock(stable_age=1)
    clock.arrived("late", now=5.0)
    clock.arrived("early", now=3.0)
    clock.arrived("busy", now=5.9)
    assert clock.due(now=6.5) == ["early", "late"]
    assert clock.waiting == 3


def test_a_queued_study_is_remembered_until_more_arrives() -> None:
    clock = ArrivalClock(stable_age=1)
    clock.arrived("a", now=0.0)
    clock.queued("a", now=1.0)
    assert clock.due(now=5.0) == [] and clock.next_due() is None
    assert clock.already_queued("a")  # Orthanc's StableStudy for it is then skipped
    clock.arrived("a", now=6.0)  # a late instance: it must be queued again
    assert not clock.already_queued("a")
    assert clock.due(now=7.0) == ["a"]


def test_queued_studies_are_forgotten_after_a_while() -> None:
    clock = ArrivalClock(stable_age=1)
    clock.queued("old", now=0.0)
    clock.queued("new", now=ArrivalClock.REMEMBER_QUEUED_SECONDS + 1)
    assert not clock.already_queued("old")
    assert clock.already_queued("new")


def test_stable_age_must_be_positive() -> None:
    with pytest.raises(ValueError, match="stable_age"):
        ArrivalClock(stable_age=0)


def test_a_dropped_study_is_neither_timed_nor_remembered() -> None:
    clock = ArrivalClock(stable_age=1)
    clock.arrived("a", now=0.0)
    clock.dropped("a")
    assert clock.due(now=5.0) == [] and not clock.already_queued("a")


def test_forgetting_queued_studies_lets_orthanc_announce_them_again() -> None:
    clock = ArrivalClock(stable_age=1)
    clock.queued("a", now=0.0)
    clock.forget_queued()
    assert not clock.already_queued("a")
