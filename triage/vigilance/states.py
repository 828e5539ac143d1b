"""Which installed model versions a worker runs, and in which role.

A model version is ``active`` (its results go to the worklist, the SR and the deliveries),
``shadow`` (it runs on the same studies after the active one, its results only recorded for
comparison) or ``retired`` (not run). The states live in PostgreSQL (``records``), changed
by an admin; each worker reads them again every ``TRIAGE_VIGILANCE_STATES_SECONDS``, so a
promotion or a rollback applies to new studies within that time, without a restart.

On its first reading a worker registers the versions installed in its models folder (in
version order, so the oldest of a fresh installation becomes active and any later one starts
in shadow; ``records.register_version``).

When the states cannot be read (PostgreSQL down or not configured) the worker keeps the last
states it read. A worker that never read them runs, of each model, its only installed
version as active; with several installed, the lowest version is active and the others wait
(no shadow run) until the states can be read. A version is never made active by being
installed.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from triage.registry import ModelPackage
from triage.settings import Settings
from triage.vigilance import db
from triage.vigilance.records import Connection, RecordError, register_version

log = logging.getLogger(__name__)

ACTOR = "worker"  # who registers the installed versions
# A study never waits long on a database that does not answer: the reading is given up (and
# tried again after TRIAGE_VIGILANCE_STATES_SECONDS) and the last known states kept.
CONNECT_TIMEOUT_SECONDS = 2
STATEMENT_TIMEOUT_MS = 2000
_PARTS = re.compile(r"(\d+)")


def version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """Orders versions naturally: "1.10.0" after "1.9.2", "2.0.0-rc1" before "2.0.0-rc2"."""
    return tuple((0, int(part)) if part.isdigit() else (1, part)
                 for part in _PARTS.split(version) if part)


@dataclass(frozen=True)
class Roles:
    """The installed packages a worker runs: the active ones decide priorities, the shadow
    ones run after them on the same studies."""

    active: tuple[ModelPackage, ...]
    shadow: tuple[ModelPackage, ...]

    def shadow_package(self, model_id: str, version: str) -> ModelPackage | None:
        for package in self.shadow:
            if package.manifest.id == model_id and package.manifest.version == version:
                return package
        return None


def assign(packages: Sequence[ModelPackage], states: dict[tuple[str, str], str] | None
           ) -> Roles:
    """The roles of ``packages`` under the recorded ``states`` ((model, version) -> state),
    or, when none could ever be read (``None``), under the rules of the module's docstring.

    An installed version the records do not know yet runs as active only when its model has
    no other installed version; otherwise it waits until it is registered.
    """
    by_model: dict[str, list[ModelPackage]] = {}
    for package in packages:
        by_model.setdefault(package.manifest.id, []).append(package)
    active: list[ModelPackage] = []
    shadow: list[ModelPackage] = []
    for model_id, installed in by_model.items():
        installed.sort(key=lambda p: version_key(p.manifest.version))
        if states is None:
            active.append(installed[0])
            continue
        for package in installed:
            state = states.get((model_id, package.manifest.version))
            if state == "active" or (state is None and len(installed) == 1):
                active.append(package)
            elif state == "shadow":
                shadow.append(package)
    return Roles(tuple(active), tuple(shadow))


@dataclass
class VersionStates:
    """The roles of a worker's packages, read again from PostgreSQL once their age passes
    ``settings.vigilance_states_seconds``."""

    settings: Settings
    packages: Sequence[ModelPackage]
    clock: Callable[[], float] = time.monotonic
    _states: dict[tuple[str, str], str] | None = None
    _read_at: float | None = None
    _registered: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def roles(self) -> Roles:
        """The current roles; reads the states first when they are due (never raises)."""
        with self._lock:
            now = self.clock()
            due = self.settings.vigilance_states_seconds
            if self._read_at is None or now - self._read_at >= due:
                self._read_at = now
                self._refresh()
            return assign(self.packages, self._states)

    def _refresh(self) -> None:
        try:
            with db.connect(self.settings, timeout_seconds=CONNECT_TIMEOUT_SECONDS,
                            statement_timeout_ms=STATEMENT_TIMEOUT_MS) as conn:
                if not self._registered:
                    self._register(conn)
                rows = conn.execute("SELECT model_id, version, state FROM model_versions"
                                    ).fetchall()
        except Exception as exc:  # PostgreSQL down: keep what was read last
            log.warning("model version states not read (%s); keeping the last known",
                        type(exc).__name__)
            return
        self._states = {(str(m), str(v)): str(s) for m, v, s in rows}

    def _register(self, conn: Connection) -> None:
        ordered = sorted(self.packages, key=lambda p: (p.manifest.id,
                                                        version_key(p.manifest.version)))
        for package in ordered:
            m = package.manifest
            try:
                register_version(conn, m.id, m.version, m.sha256, ACTOR)
            except RecordError as exc:
                # A version name reused for other weights: its analyses are refused by the
                # records too, and it runs only as its model's sole installed version.
                log.error("model %s not registered: %s", m.key, exc)
        self._registered = True
