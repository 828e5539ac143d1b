"""When a study is complete: no new source instance for ``stable_age`` seconds.

Orthanc announces a stable study itself (StableStudy in its change log), but it checks about
twice a second and counts whole seconds, so a study waits its stable age plus up to about
1.5 s before Orthanc says so. That second and a half is most of what a radiograph's
time-to-notification can spare. The watcher therefore keeps its own clock: the NewInstance
entries of the change log tell it when each study last received an image, and a study that
has been quiet for the stable age is complete, to within the watcher's poll interval.

Orthanc's own announcement stays the safety net: for studies whose arrivals the watcher did
not see (it restarted in between), and, through the watcher's list of unstable studies, for
studies Orthanc forgot in a restart.
"""

from __future__ import annotations


class ArrivalClock:
    """The last arrival of every incomplete study, on the watcher's monotonic clock.

    Studies are named by their Orthanc id. A study that :meth:`due` returned and the watcher
    then queued is remembered as queued until another instance arrives, so that Orthanc's
    later StableStudy for the same instances can be recognised and skipped.
    """

    # How long a queued study is remembered: Orthanc announces it within a few seconds of
    # the stable age, and the watcher only needs to recognise that announcement.
    REMEMBER_QUEUED_SECONDS = 600.0

    def __init__(self, stable_age: float) -> None:
        if stable_age <= 0:
            raise ValueError(f"stable_age must be positive, got {stable_age!r}")
        self.stable_age = float(stable_age)
        self._last: dict[str, float] = {}
        self._queued: dict[str, float] = {}

    def arrived(self, study_id: str, now: float) -> None:
        """A source instance of ``study_id`` was seen at ``now``."""
        self._last[study_id] = now
        self._queued.pop(study_id, None)

    def due(self, now: float) -> list[str]:
        """Studies quiet for at least the stable age at ``now``, longest quiet first."""
        limit = now - self.stable_age
        return [study for study, last in sorted(self._last.items(), key=lambda p: p[1])
                if last <= limit]

    def queued(self, study_id: str, now: float) -> None:
        """The watcher queued ``study_id`` with every instance it had at ``now``."""
        self._last.pop(study_id, None)
        self._queued[study_id] = now
        self._forget_old(now)

    def dropped(self, study_id: str) -> None:
        """Stop timing ``study_id`` without calling it queued: Orthanc's announcement of it
        will then be handled, not skipped."""
        self._last.pop(study_id, None)
        self._queued.pop(study_id, None)

    def forget_queued(self) -> None:
        """Arrivals may have gone unseen: Orthanc's next announcement of every study is
        handled again."""
        self._queued.clear()

    def already_queued(self, study_id: str) -> bool:
        """True when ``study_id`` was queued and has received nothing since."""
        return study_id in self._queued

    def next_due(self) -> float | None:
        """When the next study becomes complete (monotonic seconds), if any is waiting."""
        return min(self._last.values()) + self.stable_age if self._last else None

    @property
    def waiting(self) -> int:
        """How many studies are receiving images or waiting for their stable age."""
        return len(self._last)

    def _forget_old(self, now: float) -> None:
        cutoff = now - self.REMEMBER_QUEUED_SECONDS
        for study, when in list(self._queued.items()):
            if when < cutoff:
                del self._queued[study]
