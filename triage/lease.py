"""The watcher's lease: which of several watchers leads, and fencing of what it writes.

One Redis key holds ``holder:token`` with a time to live of the lease time. A watcher takes it
when nobody holds it, and keeps it by renewing it every third of the lease time; every
acquisition draws a new fencing token (``INCR`` of a counter), so a leader that lost the lease
and got it back is a different holder from the one it was. Acquiring and renewing are one Lua
script each.

Every write the leader makes is fenced: it happens only if the lease still holds the value
this watcher acquired, checked atomically with the write (a Lua script, or ``WATCH`` of the
lease key around a ``MULTI``/``EXEC``). A leader that was paused past its lease (SIGSTOP, a
long garbage collection, a frozen VM) and wakes up therefore writes nothing: its write is
refused with :class:`LeaseLost`, and it goes back to standby.

Redis expires a watched key inside a transaction as a change (since 6.0.9), so a lease that
runs out between ``WATCH`` and ``EXEC`` aborts the transaction too.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, cast

import redis
from redis.client import Pipeline

log = logging.getLogger(__name__)

LEASE_KEY = "triage:watcher:lease"
TOKEN_KEY = "triage:watcher:lease:token"
DEFAULT_LEASE_SECONDS = 10.0

# KEYS: lease, token counter. ARGV: value held now ('' if none), holder id, lease ms.
# Renews the lease when it still holds ARGV[1]; takes it with a new token when nobody holds it.
_ACQUIRE_OR_RENEW = """
local current = redis.call('GET', KEYS[1])
if current and current == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return current
end
if current then
  return false
end
local value = ARGV[2] .. ':' .. redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], value, 'PX', ARGV[3])
return value
"""

# KEYS: lease. ARGV: value held.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""



def release_if_held(connection: redis.Redis, key: str, value: str | bytes) -> bool:
    """Delete ``key`` only while it still holds ``value`` (a lock or lease this process took
    and may have lost meanwhile); True when it was deleted."""
    return bool(connection.eval(_RELEASE, 1, key, value))


# KEYS: lease, counter key. ARGV: value held, new value, '1' to allow going down.
# Returns -1 when the lease is not held, else 1 if written, 0 if the stored value is higher.
_SET_MAX = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return -1
end
local stored = tonumber(redis.call('GET', KEYS[2]) or '-1')
local new = tonumber(ARGV[2])
if new > stored or ARGV[3] == '1' then
  redis.call('SET', KEYS[2], ARGV[2])
  return 1
end
return 0
"""


class LeaseLost(Exception):
    """This watcher no longer holds the lease: another one leads, nothing may be written."""


def holder_id(name: str = "watcher") -> str:
    """A holder id unique to this process (no colon: the lease value is ``id:token``)."""
    host = socket.gethostname().replace(":", "-")
    return f"{name}@{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class Lease:
    """One watcher's view of the lease: acquire, renew, release, and fenced writes."""

    def __init__(self, connection: redis.Redis, *, seconds: float = DEFAULT_LEASE_SECONDS,
                 holder: str | None = None, key: str = LEASE_KEY,
                 counter: str = TOKEN_KEY) -> None:
        if seconds <= 0:
            raise ValueError(f"lease seconds must be positive, got {seconds!r}")
        self.connection = connection
        self.seconds = float(seconds)
        self.holder = holder or holder_id()
        if ":" in self.holder:
            raise ValueError(f"holder id must not contain ':', got {self.holder!r}")
        self.key = key
        self.counter = counter
        self.value: str | None = None  # "holder:token" while this watcher believes it leads
        self._valid_until = 0.0
        self._lock = threading.Lock()
        self._acquire = connection.register_script(_ACQUIRE_OR_RENEW)
        self._release = connection.register_script(_RELEASE)
        self._set_max = connection.register_script(_SET_MAX)

    @property
    def token(self) -> int | None:
        """The fencing token of the lease held, if any."""
        return int(self.value.rsplit(":", 1)[1]) if self.value else None

    @property
    def held(self) -> bool:
        """Whether this watcher holds the lease, as far as it knows without asking Redis: a
        renewal succeeded less than the lease time ago (measured from before it was sent)."""
        return self.value is not None and time.monotonic() < self._valid_until

    def acquire_or_renew(self) -> bool:
        """Renew the lease held, or take it if nobody holds it; returns whether it is held."""
        with self._lock:
            sent = time.monotonic()
            raw = self._acquire(keys=[self.key, self.counter],
                                args=[self.value or "", self.holder,
                                      int(self.seconds * 1000)])
            value = raw.decode() if isinstance(raw, bytes) else (raw or None)
            if value is not None and self.value is not None and value != self.value:
                log.warning("lease expired before renewal; taken again with a new token")
            self.value = value
            self._valid_until = sent + self.seconds if value else 0.0
            return value is not None

    def lost(self) -> None:
        """Forget the lease locally (a fenced write was refused)."""
        with self._lock:
            self.value = None
            self._valid_until = 0.0

    def release(self) -> None:
        """Give the lease up now, so that a standby watcher takes over without waiting."""
        with self._lock:
            if self.value is not None:
                self._release(keys=[self.key], args=[self.value])
            self.value = None
            self._valid_until = 0.0

    def _holds(self, raw: object, value: str) -> bool:
        if raw is not None and raw in (value, value.encode()):
            return True
        self.lost()
        return False

    def _fence(self) -> str:
        value = self.value
        if value is None or not self.held:
            raise LeaseLost(f"lease of {self.holder} not held")
        return value

    def check(self) -> None:
        """Raise :class:`LeaseLost` unless Redis still holds this watcher's lease.

        For a write that cannot join a transaction with the check (an RQ call): the write
        follows within milliseconds, the residual window of such writes.
        """
        value = self._fence()
        if not self._holds(self.connection.get(self.key), value):
            raise LeaseLost(f"lease of {self.holder} taken over")

    def set_max(self, key: str, value: int, *, allow_lower: bool = False) -> bool:
        """Store the integer ``value`` at ``key`` if the lease is held and the stored value is
        lower (any value with ``allow_lower``), atomically; returns whether it was written."""
        result = self._set_max(keys=[self.key, key],
                               args=[self._fence(), value, "1" if allow_lower else "0"])
        if int(cast(int, result)) < 0:
            self.lost()
            raise LeaseLost(f"lease of {self.holder} taken over")
        return bool(result)

    def transaction(self, func: Callable[[Pipeline], Any], *watches: str,
                    **kwargs: Any) -> Any:
        """``redis.Redis.transaction`` fenced by the lease: the lease key is watched with
        ``watches`` and checked before ``func`` runs, so ``EXEC`` applies the writes only if
        the lease is still this watcher's."""
        def fenced(pipe: Pipeline) -> Any:
            value = self._fence()
            if not self._holds(pipe.get(self.key), value):
                raise LeaseLost(f"lease of {self.holder} taken over")
            return func(pipe)

        return self.connection.transaction(fenced, *watches, self.key, **kwargs)

    def write(self, commands: Callable[[Pipeline], object]) -> None:
        """Run the write commands that ``commands`` queues on a pipeline, fenced."""
        def queued(pipe: Pipeline) -> None:
            pipe.multi()
            commands(pipe)

        self.transaction(queued)

    def fenced_connection(self) -> FencedRedis:
        """A client on the same connections whose transactions are fenced by this lease."""
        return FencedRedis(self)


class FencedRedis(redis.Redis):
    """A Redis client whose ``transaction`` is fenced by a lease (``Lease.transaction``).

    Code written against a plain client that does its writes in optimistic transactions,
    such as ``Worklist.upsert``, is fenced by being given this client.
    """

    def __init__(self, lease: Lease) -> None:
        super().__init__(connection_pool=lease.connection.connection_pool)
        self.lease = lease

    def transaction(self, func: Callable[[Pipeline], Any], *watches: Any,
                    **kwargs: Any) -> Any:
        return self.lease.transaction(func, *watches, **kwargs)


class LeaseKeeper:
    """Renews a lease every third of its time from a daemon thread, and takes it when it is
    free, until ``stop()``. Redis being down only means the lease is not held meanwhile."""

    def __init__(self, lease: Lease) -> None:
        self.lease = lease
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._keep, name="lease", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _keep(self) -> None:
        while True:
            try:
                self.lease.acquire_or_renew()
            except redis.RedisError as exc:
                log.warning("lease not renewed: %s", exc)
            if self._stop.wait(self.lease.seconds / 3):
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self.lease.seconds)
        try:
            self.lease.release()
        except redis.RedisError as exc:
            log.warning("lease not released: %s", exc)
