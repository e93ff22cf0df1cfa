"""The two shared counters behind per-user limits, as small base classes with documented hooks.

``BaseLeaseStore``: named sets of *leases*. A lease is held by one holder (a stream, a socket,
a running reply) under a key (``<prefix>:<what>:<user id>``) until it is released or its
expiry passes; a key never has more than the ``limit`` given to ``acquire`` live leases.
Expiry is what makes a crashed process harmless: nobody refreshes its leases any more, so
they stop counting one TTL later.

``BaseRateStore``: a sliding window of events per key ("N starts per 60 s").

Backends raise ``StoreUnavailable`` when the shared store cannot be reached; whether a limit
then admits (fail-open) or refuses (fail-closed) is the caller's decision
(``realtime_kit.leases.UserLimit``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class StoreUnavailable(Exception):
    """The shared store did not answer (Redis down, a timeout, a lost connection)."""


@dataclass(frozen=True)
class LeaseRef:
    """One lease: who holds a place under which key."""

    key: str
    holder_id: str


class BaseLeaseStore:
    """Leases with an expiry each. Every method may raise ``StoreUnavailable``."""

    async def acquire(self, key: str, holder_id: str, limit: int, ttl_seconds: float) -> bool:
        """Hold a lease under ``key`` for ``ttl_seconds`` unless ``limit`` live ones exist.

        Atomic: concurrent acquires (from any process sharing the store) never leave more
        than ``limit`` live leases. Expired leases are dropped first. Acquiring a lease the
        holder already has succeeds and extends it.
        """
        raise NotImplementedError

    async def release(self, key: str, holder_id: str) -> None:
        """Give the lease back; releasing one that is not held (any more) does nothing."""
        raise NotImplementedError

    async def refresh(self, leases: Sequence[LeaseRef], ttl_seconds: float) -> int:
        """Extend every lease to ``ttl_seconds`` from now, in one round trip; return how many
        were missing (expired, or lost by a store restart) and so were re-created.

        Re-creating ignores the limit on purpose: the holder is alive, so the lease counts
        what really exists. A key above its limit then refuses acquires until enough
        leases are released.
        """
        raise NotImplementedError

    async def count(self, key: str) -> int:
        """Live leases under ``key``."""
        raise NotImplementedError

    async def close(self) -> None:
        """Release connections held for the running event loop."""


class BaseRateStore:
    """Events per key in a sliding window. Every method may raise ``StoreUnavailable``."""

    async def hit(self, key: str, event_id: str, limit: int, window_seconds: float) -> float:
        """Count one event unless ``limit`` events happened in the last ``window_seconds``.

        Return 0.0 when counted, else the seconds until the oldest event leaves the window
        (always > 0). A refused event is not counted. ``event_id`` is unique per event: a
        retried call with the same id counts once.
        """
        raise NotImplementedError

    async def close(self) -> None:
        """Release connections held for the running event loop."""
