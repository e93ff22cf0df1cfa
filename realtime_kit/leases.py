"""Per-user caps that hold across processes: leases, kept alive by one task per event loop.

A *lease* is a place under a key (``<prefix>:<name>:<user id>``), held by one holder (a
stream, a socket, a running reply) until released, and expiring ``ttl`` seconds after its
last refresh. Holders only acquire and release; the process's ``LeaseKeeper`` refreshes every
lease it holds in one background task, so a process that dies (SIGKILL, OOM) stops
refreshing and its leases stop counting one TTL later. The stores (``limit_stores``) are the
process's memory (URL ``""``) or a Redis shared by every process.

Usage, for an app that counts something per user::

    streams = UserLimit(
        "streams",
        store=lambda: StoreConfig(app_settings.REDIS_URL, app_settings.REDIS_KEY_PREFIX,
                                  app_settings.LEASE_TTL_SECONDS),
        limit=lambda: app_settings.MAX_STREAMS_PER_USER,
        fail_open=True,
    )

    lease = await streams.acquire(user.pk, holder_id)  # None: the user is at the limit
    if lease is None:
        return refuse()
    try:
        ...
    finally:
        await lease.release()  # idempotent; lease.release_soon() from sync code

Lower level, with any store: ``await get_keeper().acquire(store, key, holder_id, limit,
ttl_seconds, fail_open=...)`` and ``await get_keeper().release(store, key, holder_id)``.

Timing: the keeper refreshes every ``ttl / 3`` (jittered down by up to a quarter, so processes
started together by a deploy do not refresh in lockstep), so a lease survives two failed
refreshes in a row before it expires.

Store outages: ``fail_open=True`` admits when the store cannot be asked (the lease is still
remembered, and the next successful refresh records it); ``fail_open=False`` raises
``StoreUnavailable`` for the caller to refuse. Choose per use: a cap that only guards against
abuse (sockets, notification streams) fails open, because Redis being down must not lock
everyone out; a cap that guards money or a scarce upstream (LLM calls) fails closed.

A cancelled ``acquire`` may leave its lease in the store unrefreshed: it expires one TTL later.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import random
import threading
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .limit_stores import BaseLeaseStore, LeaseRef, StoreUnavailable, lease_store
from .loops import per_loop

__all__ = [
    "Lease",
    "LeaseKeeper",
    "StoreConfig",
    "StoreUnavailable",
    "UserLimit",
    "get_keeper",
]

logger = logging.getLogger(__name__)

# Refresh every third of the TTL, minus up to a quarter of that (jitter).
REFRESH_FRACTION_OF_TTL = 1 / 3
REFRESH_JITTER_FRACTION = 0.25


@dataclass(frozen=True)
class StoreConfig:
    """Where an app counts its limits (``url``: ``""`` in-process, or Redis) and how."""

    url: str
    key_prefix: str
    lease_ttl_seconds: float = 30.0

    @classmethod
    def from_settings(cls, app_settings: Any) -> StoreConfig:
        """From an app's settings object: its ``REDIS_URL``, ``REDIS_KEY_PREFIX`` and
        ``LEASE_TTL_SECONDS`` (chat's and notifications' have all three)."""
        return cls(
            url=app_settings.REDIS_URL,
            key_prefix=app_settings.REDIS_KEY_PREFIX,
            lease_ttl_seconds=app_settings.LEASE_TTL_SECONDS,
        )

    def key(self, name: str, user_id: int) -> str:
        """The store key of a per-user counter: the one place these names are made."""
        return f"{self.key_prefix}:{name}:{user_id}"


class LeaseKeeper:
    """The leases this event loop's holders have, refreshed together by one task.

    The task starts with the first lease and stops when the last one is released.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.get_ident()
        self._held: dict[tuple[BaseLeaseStore, LeaseRef], float] = {}  # -> TTL in seconds
        self._task: asyncio.Task[None] | None = None
        self._deletes: set[asyncio.Task[None]] = set()
        self._failing = False  # the store failed last time: log once per outage
        self._refreshing = False
        self._rng = random.Random()  # noqa: S311  (jitter, not secrets)

    def held(self, key_prefix: str = "") -> int:
        """Leases held here (those whose key starts with ``key_prefix``)."""
        return sum(1 for key in self.held_keys() if key.startswith(key_prefix))

    def held_keys(self) -> list[str]:
        """The key of every lease held here (once per lease)."""
        return [ref.key for _, ref in list(self._held)]

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def acquire(
        self,
        store: BaseLeaseStore,
        key: str,
        holder_id: str,
        limit: int,
        ttl_seconds: float,
        *,
        fail_open: bool,
    ) -> bool:
        """Take a lease and keep it refreshed until released; False when at the limit."""
        try:
            acquired = await store.acquire(key, holder_id, limit, ttl_seconds)
        except StoreUnavailable as exc:
            self._store_failed(exc)
            if not fail_open:
                raise
            acquired = True  # remembered: the first refresh that gets through records it
        else:
            self._store_answered()
        if acquired:
            self._held[(store, LeaseRef(key, holder_id))] = ttl_seconds
            self._start()
        return acquired

    async def release(self, store: BaseLeaseStore, key: str, holder_id: str) -> None:
        """Stop refreshing the lease and delete it from the store (idempotent).

        The deletion is shielded: a holder cancelled while releasing still frees its place.
        """
        await asyncio.shield(self._release(store, LeaseRef(key, holder_id)))

    def release_soon(self, store: BaseLeaseStore, key: str, holder_id: str) -> None:
        """``release`` for synchronous code and finalizers, from any thread."""
        ref = LeaseRef(key, holder_id)
        # A closed loop has nobody refreshing the lease either: it expires one TTL from now.
        with contextlib.suppress(RuntimeError):  # the loop is closed
            if threading.get_ident() == self._thread:
                self._release(store, ref)
            else:
                self._loop.call_soon_threadsafe(self._release, store, ref)

    def _release(self, store: BaseLeaseStore, ref: LeaseRef) -> asyncio.Future[None]:
        # Forgotten first, so that no later refresh re-creates it.
        self._held.pop((store, ref), None)
        # A refresh in flight finishes (and deletes what it re-created); a sleep is cut short.
        if not self._held and self._task is not None and not self._refreshing:
            self._task.cancel()
            self._task = None
        return self._delete_later(store, ref)

    def _delete_later(self, store: BaseLeaseStore, ref: LeaseRef) -> asyncio.Future[None]:
        task = self._loop.create_task(self._delete(store, ref), context=contextvars.Context())
        self._deletes.add(task)
        task.add_done_callback(self._deletes.discard)
        return task

    async def _delete(self, store: BaseLeaseStore, ref: LeaseRef) -> None:
        try:
            await store.release(ref.key, ref.holder_id)
        except StoreUnavailable:
            logger.warning("Releasing a lease of %s failed: it expires by itself", ref.key)

    def _start(self) -> None:
        if not self.running:
            # A fresh context: the task outlives the request or socket that started it.
            self._task = self._loop.create_task(self._run(), context=contextvars.Context())

    def _period_seconds(self) -> float:
        jitter = 1 - REFRESH_JITTER_FRACTION * self._rng.random()
        return min(self._held.values()) * REFRESH_FRACTION_OF_TTL * jitter

    async def _run(self) -> None:
        while self._held:
            await asyncio.sleep(self._period_seconds())
            self._refreshing = True
            try:
                await self.refresh_now()
            except Exception:
                # Keep refreshing: a dead task would let every lease of this process expire.
                logger.exception("Refreshing leases failed")
            finally:
                self._refreshing = False

    async def refresh_now(self) -> None:
        """Refresh every held lease: one store call per store and TTL."""
        groups: dict[tuple[BaseLeaseStore, float], list[LeaseRef]] = defaultdict(list)
        for (store, ref), ttl in self._held.items():
            groups[(store, ttl)].append(ref)
        for (store, ttl), refs in groups.items():
            try:
                missing = await store.refresh(refs, ttl)
            except StoreUnavailable as exc:
                self._store_failed(exc)
                continue
            self._store_answered()
            if missing:
                logger.info("Re-created %d leases the store had lost", missing)
            # A lease released while this refresh was in flight may have been re-created.
            for ref in refs:
                if (store, ref) not in self._held:
                    self._delete_later(store, ref)

    def _store_failed(self, exc: StoreUnavailable) -> None:
        if not self._failing:
            logger.warning("Lease store unavailable (retried at each refresh): %s", exc)
        self._failing = True

    def _store_answered(self) -> None:
        if self._failing:
            logger.info("Lease store reachable again")
        self._failing = False

    async def aclose(self) -> None:
        """Release every lease and wait for the deletions (a graceful shutdown)."""
        for store, ref in list(self._held):
            self._release(store, ref)
        if self._deletes:
            await asyncio.wait(list(self._deletes))


_keepers = per_loop(lambda: LeaseKeeper(asyncio.get_running_loop()))


def get_keeper() -> LeaseKeeper:
    """The keeper of the running event loop (one per loop, created on first use)."""
    return _keepers.get()


def held_keys() -> list[str]:
    """The key of every lease this process holds, all event loops together."""
    return [key for keeper in _keepers.values() for key in keeper.held_keys()]


class Lease:
    """A held lease; ``release`` and ``release_soon`` are idempotent."""

    def __init__(self, keeper: LeaseKeeper, store: BaseLeaseStore, key: str, holder_id: str):
        self.key = key
        self.holder_id = holder_id
        self._keeper = keeper
        self._store = store
        self._released = False

    async def release(self) -> None:
        if not self._released:
            self._released = True
            await self._keeper.release(self._store, self.key, self.holder_id)

    def release_soon(self) -> None:
        """Release from synchronous code (a finalizer, another thread)."""
        if not self._released:
            self._released = True
            self._keeper.release_soon(self._store, self.key, self.holder_id)


class UserLimit:
    """At most ``limit()`` leases per user under one name, counted where ``store()`` says.

    ``store`` and ``limit`` are read at each call, so settings stay lazy.
    """

    def __init__(
        self,
        name: str,
        *,
        store: Callable[[], StoreConfig],
        limit: Callable[[], int],
        fail_open: bool,
    ) -> None:
        self.name = name
        self._config = store
        self._limit = limit
        self.fail_open = fail_open

    def key(self, user_id: int) -> str:
        """The store key of a user's leases (``StoreConfig.key``)."""
        return self._config().key(self.name, user_id)

    @property
    def limit(self) -> int:
        return self._limit()

    async def acquire(self, user_id: int, holder_id: str) -> Lease | None:
        """A lease for ``holder_id``, or None when the user already holds ``limit``.

        When the store is unreachable: a lease if ``fail_open``, else ``StoreUnavailable``.
        """
        config = self._config()
        store = lease_store(config.url)
        key = config.key(self.name, user_id)
        keeper = get_keeper()
        acquired = await keeper.acquire(
            store, key, holder_id, self._limit(), config.lease_ttl_seconds, fail_open=self.fail_open
        )
        return Lease(keeper, store, key, holder_id) if acquired else None

    async def release(self, user_id: int, holder_id: str) -> None:
        """Release by name (prefer ``Lease.release``, which survives a settings change)."""
        config = self._config()
        await get_keeper().release(
            lease_store(config.url), config.key(self.name, user_id), holder_id
        )

    def held_here(self, user_id: int | None = None) -> int:
        """Leases of this limit held by this process (of one user, or of everyone)."""
        if user_id is not None:
            key = self.key(user_id)
            return sum(1 for held in held_keys() if held == key)
        prefix = f"{self._config().key_prefix}:{self.name}:"
        return sum(1 for held in held_keys() if held.startswith(prefix))

    async def count(self, user_id: int) -> int:
        """Live leases of the user, all processes together (raises ``StoreUnavailable``)."""
        config = self._config()
        return await lease_store(config.url).count(config.key(self.name, user_id))
