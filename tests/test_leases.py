"""The lease and rate stores behind cluster-wide per-user limits (realtime_kit), and the keeper.

One contract per store kind, run against both backends (the process's memory, and a real
redis-server); the Redis classes add what only a shared store can show: two OS processes
racing, a Redis restart, Redis being down.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import AsyncIterator, Sequence

import pytest

from realtime_kit.leases import LeaseKeeper, StoreConfig, UserLimit, get_keeper
from realtime_kit.limit_stores import (
    BaseLeaseStore,
    BaseRateStore,
    LeaseRef,
    StoreUnavailable,
    lease_store,
    url_problem,
)
from realtime_kit.limit_stores.memory import MemoryLeaseStore, MemoryRateStore
from realtime_kit.limit_stores.redis import RedisLeaseStore, RedisRateStore
from realtime_kit.rates import UserRate
from tests.servers import REPO_ROOT, RedisServer, free_port

LONG_TTL_SECONDS = 60.0
# Short enough for a test to wait past, long enough that a loaded machine cannot miss it.
SHORT_TTL_SECONDS = 0.6
PAST_SHORT_TTL_SECONDS = 1.5
SUBPROCESS_TIMEOUT_SECONDS = 30


def unique_key(what: str = "leases") -> str:
    return f"test-{uuid.uuid4().hex[:12]}:{what}"


# --- the lease store contract -------------------------------------------------------------


class LeaseStoreContract:
    store_class: type[BaseLeaseStore]

    def build(self, request: pytest.FixtureRequest) -> BaseLeaseStore:
        return self.store_class()

    @pytest.fixture
    async def store(self, request: pytest.FixtureRequest) -> AsyncIterator[BaseLeaseStore]:
        store = self.build(request)
        yield store
        await store.close()

    async def test_acquires_up_to_the_limit_per_key(self, store: BaseLeaseStore) -> None:
        key, other = unique_key(), unique_key()
        assert await store.acquire(key, "a", 2, LONG_TTL_SECONDS)
        assert await store.acquire(key, "b", 2, LONG_TTL_SECONDS)
        assert not await store.acquire(key, "c", 2, LONG_TTL_SECONDS)
        assert await store.acquire(other, "c", 2, LONG_TTL_SECONDS), "keys are independent"
        assert await store.count(key) == 2
        # A holder acquiring again keeps its one place (and extends it).
        assert await store.acquire(key, "a", 2, LONG_TTL_SECONDS)
        assert await store.count(key) == 2

    async def test_release_frees_a_place_and_is_idempotent(self, store: BaseLeaseStore) -> None:
        key = unique_key()
        assert await store.acquire(key, "a", 1, LONG_TTL_SECONDS)
        await store.release(key, "a")
        await store.release(key, "a")
        await store.release(key, "never-held")
        await store.release(unique_key(), "a")
        assert await store.count(key) == 0
        assert await store.acquire(key, "b", 1, LONG_TTL_SECONDS)
        assert await store.count(key) == 1

    async def test_concurrent_tasks_never_exceed_the_limit(self, store: BaseLeaseStore) -> None:
        key, limit = unique_key(), 3
        holding: set[str] = set()
        most = 0

        async def churn(task: int) -> int:
            nonlocal most
            won = 0
            for round_ in range(10):
                holder = f"{task}-{round_}"
                if await store.acquire(key, holder, limit, LONG_TTL_SECONDS):
                    won += 1
                    holding.add(holder)
                    most = max(most, len(holding))
                    await asyncio.sleep(0)
                    holding.discard(holder)
                    await store.release(key, holder)
            return won

        wins = await asyncio.gather(*(churn(task) for task in range(20)))
        assert most <= limit
        assert sum(wins) >= limit
        assert await store.count(key) == 0
        # All at once, nobody releasing: exactly `limit` get in.
        results = await asyncio.gather(
            *(store.acquire(key, f"burst-{n}", limit, LONG_TTL_SECONDS) for n in range(50))
        )
        assert sum(results) == limit
        assert await store.count(key) == limit

    async def test_expiry_frees_a_lease_whose_holder_stopped_refreshing(
        self, store: BaseLeaseStore
    ) -> None:
        key = unique_key()
        assert await store.acquire(key, "crashed", 1, SHORT_TTL_SECONDS)
        assert not await store.acquire(key, "next", 1, LONG_TTL_SECONDS)
        await asyncio.sleep(PAST_SHORT_TTL_SECONDS)
        assert await store.count(key) == 0
        assert await store.acquire(key, "next", 1, LONG_TTL_SECONDS)

    async def test_refresh_keeps_leases_alive(self, store: BaseLeaseStore) -> None:
        kept, dropped = unique_key(), unique_key()
        for key in (kept, dropped):
            assert await store.acquire(key, "a", 1, SHORT_TTL_SECONDS)
            assert await store.acquire(key, "b", 2, SHORT_TTL_SECONDS)
        # Refreshed past two TTLs, one key; the other is left alone.
        deadline = time.monotonic() + PAST_SHORT_TTL_SECONDS
        while time.monotonic() < deadline:
            missing = await store.refresh(
                [LeaseRef(kept, "a"), LeaseRef(kept, "b")], SHORT_TTL_SECONDS
            )
            assert missing == 0
            await asyncio.sleep(SHORT_TTL_SECONDS / 6)
        assert await store.count(kept) == 2
        assert await store.count(dropped) == 0

    async def test_refresh_recreates_lost_leases_in_one_call(self, store: BaseLeaseStore) -> None:
        key = unique_key()
        assert await store.acquire(key, "a", 1, SHORT_TTL_SECONDS)
        await asyncio.sleep(PAST_SHORT_TTL_SECONDS)
        assert await store.acquire(key, "b", 1, LONG_TTL_SECONDS)
        # "a" is alive after all (its process was only slow): the refresh counts it again,
        # over the limit, so the next acquire waits for a release.
        leases = [LeaseRef(key, "a"), *(LeaseRef(unique_key(), "x") for _ in range(1200))]
        assert await store.refresh(leases, LONG_TTL_SECONDS) == 1201
        assert await store.count(key) == 2
        assert not await store.acquire(key, "c", 2, LONG_TTL_SECONDS)
        await store.release(key, "b")
        assert not await store.acquire(key, "c", 1, LONG_TTL_SECONDS)
        assert await store.acquire(key, "c", 2, LONG_TTL_SECONDS)
        assert await store.refresh([], LONG_TTL_SECONDS) == 0


class TestMemoryLeaseStore(LeaseStoreContract):
    store_class = MemoryLeaseStore

    async def test_keys_without_leases_are_forgotten(self) -> None:
        store = MemoryLeaseStore()
        key = unique_key()
        assert await store.acquire(key, "a", 1, LONG_TTL_SECONDS)
        await store.release(key, "a")
        assert store._keys == {}


# A process that races the parent's other worker: connect, wait for "go", acquire at once.
_RACER = textwrap.dedent(
    """
    import asyncio, sys
    from realtime_kit.limit_stores.redis import RedisLeaseStore, RedisRateStore

    async def main(kind, url, key, name, tasks, limit):
        store = RedisLeaseStore(url) if kind == "lease" else RedisRateStore(url)
        if kind == "lease":
            await store.count(key)  # connect before the start
            calls = [store.acquire(key, f"{name}-{n}", limit, 60) for n in range(tasks)]
        else:
            await store.hit(key + ":warmup", "w", 1, 60)
            calls = [store.hit(key, f"{name}-{n}", limit, 60) for n in range(tasks)]
        print("ready", flush=True)
        sys.stdin.readline()
        results = await asyncio.gather(*calls)
        won = [r for r in results if (r is True if kind == "lease" else r == 0.0)]
        print(len(won), flush=True)
        await store.close()

    a = sys.argv[1:]
    asyncio.run(main(a[0], a[1], a[2], a[3], int(a[4]), int(a[5])))
    """
)


def race_in_two_processes(kind: str, url: str, key: str, tasks: int, limit: int) -> list[int]:
    """Start two processes that each fire ``tasks`` concurrent calls; return their wins."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RACER, kind, url, key, name, str(tasks), str(limit)],
            cwd=REPO_ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for name in ("p1", "p2")
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        wins = []
        for proc in procs:
            out, _ = proc.communicate(timeout=SUBPROCESS_TIMEOUT_SECONDS)
            assert proc.returncode == 0
            wins.append(int(out.strip()))
        return wins
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


@pytest.mark.redis
class TestRedisLeaseStore(LeaseStoreContract):
    store_class = RedisLeaseStore

    def build(self, request: pytest.FixtureRequest) -> BaseLeaseStore:
        return RedisLeaseStore(request.getfixturevalue("redis_server").url)

    def test_two_processes_never_exceed_the_limit(self, redis_server: RedisServer) -> None:
        key, limit = unique_key(), 7
        wins = race_in_two_processes("lease", redis_server.url, key, 100, limit)
        assert sum(wins) == limit, wins

    async def test_keys_disappear_with_their_last_lease(self, redis_server: RedisServer) -> None:
        store = RedisLeaseStore(redis_server.url)
        key = unique_key()
        assert await store.acquire(key, "a", 1, SHORT_TTL_SECONDS)
        client = store._connection().client
        assert 0 < await client.pttl(key) <= SHORT_TTL_SECONDS * 1000
        assert await store.refresh([LeaseRef(key, "a")], LONG_TTL_SECONDS) == 0
        assert await client.pttl(key) > SHORT_TTL_SECONDS * 1000
        await store.release(key, "a")
        assert await client.exists(key) == 0
        await store.close()


# --- the rate store contract --------------------------------------------------------------


class RateStoreContract:
    store_class: type[BaseRateStore]

    def build(self, request: pytest.FixtureRequest) -> BaseRateStore:
        return self.store_class()

    @pytest.fixture
    async def store(self, request: pytest.FixtureRequest) -> AsyncIterator[BaseRateStore]:
        store = self.build(request)
        yield store
        await store.close()

    async def test_limit_per_window_and_the_wait(self, store: BaseRateStore) -> None:
        key = unique_key("rate")
        assert await store.hit(key, "1", 2, 30) == 0.0
        assert await store.hit(key, "2", 2, 30) == 0.0
        wait = await store.hit(key, "3", 2, 30)
        assert 0 < wait <= 30
        assert await store.hit(unique_key("rate"), "3", 2, 30) == 0.0, "keys are independent"
        # The same event (a retried call) counts once.
        assert await store.hit(key, "2", 2, 30) == 0.0

    async def test_the_window_slides_and_refusals_do_not_count(self, store: BaseRateStore) -> None:
        key = unique_key("rate")
        assert await store.hit(key, "1", 1, SHORT_TTL_SECONDS) == 0.0
        for n in range(5):
            assert await store.hit(key, f"refused-{n}", 1, SHORT_TTL_SECONDS) > 0
        await asyncio.sleep(PAST_SHORT_TTL_SECONDS)
        assert await store.hit(key, "2", 1, SHORT_TTL_SECONDS) == 0.0

    async def test_concurrent_hits_admit_exactly_the_limit(self, store: BaseRateStore) -> None:
        key = unique_key("rate")
        waits = await asyncio.gather(*(store.hit(key, str(n), 5, 30) for n in range(60)))
        assert sum(1 for wait in waits if wait == 0.0) == 5


class TestMemoryRateStore(RateStoreContract):
    store_class = MemoryRateStore

    async def test_idle_users_are_swept(self) -> None:
        now = [0.0]
        store = MemoryRateStore(clock=lambda: now[0])
        assert await store.hit("u1", "1", 1, 10) == 0.0
        now[0] = 100.0
        assert await store.hit("u2", "1", 1, 10) == 0.0
        assert list(store._events) == ["u2"]


@pytest.mark.redis
class TestRedisRateStore(RateStoreContract):
    store_class = RedisRateStore

    def build(self, request: pytest.FixtureRequest) -> BaseRateStore:
        return RedisRateStore(request.getfixturevalue("redis_server").url)

    def test_two_processes_admit_exactly_the_limit(self, redis_server: RedisServer) -> None:
        wins = race_in_two_processes("rate", redis_server.url, unique_key("rate"), 100, 9)
        assert sum(wins) == 9, wins


# --- the keeper ---------------------------------------------------------------------------


async def test_keeper_refreshes_in_the_background_and_stops_when_empty() -> None:
    store, keeper = MemoryLeaseStore(), get_keeper()
    assert get_keeper() is keeper, "one keeper per event loop"
    key = unique_key()
    for holder in ("a", "b"):
        assert await keeper.acquire(store, key, holder, 2, SHORT_TTL_SECONDS, fail_open=False)
    assert keeper.running
    await asyncio.sleep(PAST_SHORT_TTL_SECONDS * 2)
    assert await store.count(key) == 2, "the keeper let a lease expire"
    assert keeper.held(key) == 2
    await keeper.release(store, key, "a")
    assert keeper.running
    await keeper.release(store, key, "b")
    assert not keeper.running
    assert await store.count(key) == 0
    await keeper.release(store, key, "b")  # idempotent


class GatedStore(MemoryLeaseStore):
    """A memory store whose refresh is applied only once ``gate`` opens, like a Redis script
    still on its way: once sent, it runs even if the caller is cancelled meanwhile. It
    extends by a long TTL, so only a release (not expiry) frees what it re-creates."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.refreshing = asyncio.Event()
        self.applied = asyncio.Event()

    async def refresh(self, leases: Sequence[LeaseRef], ttl_seconds: float) -> int:
        async def at_the_server() -> int:
            await self.gate.wait()
            missing = await MemoryLeaseStore.refresh(self, leases, LONG_TTL_SECONDS)
            self.applied.set()
            return missing

        self.refreshing.set()
        return await asyncio.shield(asyncio.ensure_future(at_the_server()))


async def wait_until_free(store: BaseLeaseStore, key: str, keeper: LeaseKeeper) -> None:
    deadline = time.monotonic() + 5
    while await store.count(key) != 0 or keeper.running:
        assert time.monotonic() < deadline, "a released lease was re-created and left behind"
        await asyncio.sleep(0.01)


async def test_a_release_during_a_refresh_is_not_undone() -> None:
    store, keeper = GatedStore(), LeaseKeeper(asyncio.get_running_loop())
    key = unique_key()
    assert await keeper.acquire(store, key, "a", 1, LONG_TTL_SECONDS, fail_open=False)
    refresh = asyncio.create_task(keeper.refresh_now())
    await store.refreshing.wait()
    await keeper.release(store, key, "a")
    assert await store.count(key) == 0
    store.gate.set()
    await refresh  # re-created "a", then deleted it again
    await store.applied.wait()
    await wait_until_free(store, key, keeper)
    assert await store.acquire(key, "b", 1, LONG_TTL_SECONDS)


async def test_the_last_release_lets_a_background_refresh_finish() -> None:
    store, keeper = GatedStore(), LeaseKeeper(asyncio.get_running_loop())
    key = unique_key()
    assert await keeper.acquire(store, key, "a", 1, SHORT_TTL_SECONDS, fail_open=False)
    # The keeper's own task starts a refresh; the last lease is released meanwhile. The task
    # must look again when the refresh answers, not be cancelled before.
    await asyncio.wait_for(store.refreshing.wait(), PAST_SHORT_TTL_SECONDS * 5)
    await keeper.release(store, key, "a")
    store.gate.set()
    await store.applied.wait()
    await wait_until_free(store, key, keeper)


async def test_release_soon_from_another_thread_and_a_cancelled_release() -> None:
    keeper = get_keeper()
    config = StoreConfig("", unique_key("prefix"), LONG_TTL_SECONDS)
    limit = UserLimit("sockets", store=lambda: config, limit=lambda: 2, fail_open=False)
    first = await limit.acquire(1, "a")
    second = await limit.acquire(1, "b")
    assert first is not None and second is not None
    assert await limit.acquire(1, "c") is None
    assert await limit.count(1) == 2
    await asyncio.to_thread(first.release_soon)
    deadline = time.monotonic() + 5
    while await limit.count(1) != 1:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    # A holder cancelled in the middle of its release still frees its place.
    releasing = asyncio.create_task(second.release())
    await asyncio.sleep(0)
    releasing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await releasing
    await asyncio.sleep(0.05)
    assert await limit.count(1) == 0
    assert not keeper.running
    assert keeper.held() == 0


def test_url_problem() -> None:
    assert url_problem("") is None
    assert url_problem("redis://127.0.0.1:6379/0") is None
    assert url_problem("rediss://cache.example:6380/1") is None
    assert url_problem("unix:///run/redis.sock") is None
    assert url_problem("127.0.0.1:6379") is not None
    assert url_problem("http://127.0.0.1:6379") is not None


# --- Redis outages ------------------------------------------------------------------------


@pytest.mark.redis
async def test_redis_down_fails_open_or_closed_and_recovers() -> None:
    redis = RedisServer(port=free_port())  # not started yet: connections are refused
    config = StoreConfig(redis.url, unique_key("prefix"), LONG_TTL_SECONDS)
    open_cap = UserLimit("sockets", store=lambda: config, limit=lambda: 1, fail_open=True)
    closed_cap = UserLimit("replies", store=lambda: config, limit=lambda: 1, fail_open=False)
    rate = UserRate(
        "starts",
        store=lambda: config,
        limit=lambda: 1,
        window_seconds=lambda: 60,
        fail_open=False,
    )
    keeper = get_keeper()
    try:
        lease = await open_cap.acquire(7, "socket-1")
        assert lease is not None, "a socket cap must not lock people out while Redis is down"
        with pytest.raises(StoreUnavailable):
            await closed_cap.acquire(7, "reply-1")
        with pytest.raises(StoreUnavailable):
            await rate.hit(7)
        await keeper.refresh_now()  # fails, logged, retried later
        redis.start()
        assert await open_cap.count(7) == 0
        await keeper.refresh_now()
        assert await open_cap.count(7) == 1, "the admitted lease is recorded once Redis is back"
        assert await open_cap.acquire(7, "socket-2") is None
        await lease.release()
        assert await open_cap.count(7) == 0
    finally:
        await lease_store(redis.url).close()
        redis.cleanup()


@pytest.mark.redis
async def test_redis_restart_loses_leases_until_the_next_refresh() -> None:
    redis = RedisServer().start()
    config = StoreConfig(redis.url, unique_key("prefix"), LONG_TTL_SECONDS)
    cap = UserLimit("streams", store=lambda: config, limit=lambda: 2, fail_open=True)
    keeper = get_keeper()
    try:
        held = [await cap.acquire(1, holder) for holder in ("a", "b")]
        assert all(held)
        assert await cap.acquire(1, "c") is None
        redis.restart()  # no persistence: every lease is gone
        # Documented gap: until the holders' keepers refresh, the key counts too few.
        late = await cap.acquire(1, "c")
        assert late is not None
        await keeper.refresh_now()
        # The refresh re-created a and b: three live holders, over the limit of two.
        assert await cap.count(1) == 3
        assert await cap.acquire(1, "d") is None
        await held[0].release()  # type: ignore[union-attr]
        assert await cap.acquire(1, "d") is None, "still at the limit"
        await late.release()
        assert await cap.acquire(1, "d") is not None
    finally:
        await keeper.aclose()
        await lease_store(redis.url).close()
        redis.cleanup()
