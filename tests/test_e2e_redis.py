"""Two daphne processes sharing one SQLite file and one Redis (the pub/sub channel layer)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from tests.servers import ChatClient, DaphneServer, RedisServer, login

pytestmark = [pytest.mark.e2e, pytest.mark.redis]


@pytest.fixture
def redis_env(sqlite_env: dict[str, str], redis_server: RedisServer) -> dict[str, str]:
    return {**sqlite_env, "REDIS_URL": redis_server.url}


@pytest.fixture
def pair(
    start_daphne: Callable[..., DaphneServer], redis_env: dict[str, str]
) -> tuple[DaphneServer, DaphneServer]:
    return start_daphne(redis_env), start_daphne(redis_env)


def transcript(client: ChatClient) -> list[tuple[int, str, str]]:
    return [(f["seq"], f["user"]["username"], f["text"]) for f in client.messages()]


async def test_message_crosses_processes(pair: tuple[DaphneServer, DaphneServer]) -> None:
    a, b = pair
    alice = await ChatClient.open(a, await login(a.base_url, "alice"))
    bob = await ChatClient.open(b, await login(b.base_url, "bob"))
    for n in range(1, 6):
        assert (await alice.post(f"from a {n}", f"a{n}"))["seq"] == n
    await bob.wait_seq(5)
    assert [(f["seq"], f["text"]) for f in bob.messages()] == [
        (n, f"from a {n}") for n in range(1, 6)
    ]
    assert (await bob.post("from b", "b1"))["seq"] == 6
    await alice.wait_seq(6)
    await bob.wait_seq(6)
    assert alice.seqs() == [1, 2, 3, 4, 5, 6]
    assert transcript(alice) == transcript(bob)
    # A session made through one process is valid on the other (same database).
    late = await ChatClient.open(b, await login(a.base_url, "carol"), query="after=3")
    await late.wait_seq(6)
    assert late.seqs() == [4, 5, 6]


async def test_concurrent_senders_on_both_processes(
    pair: tuple[DaphneServer, DaphneServer],
) -> None:
    per_sender = 15
    servers = list(pair)
    cookies = {name: await login(servers[0].base_url, name) for name in ("alice", "bob", "carol")}
    readers = [await ChatClient.open(s, cookies["carol"]) for s in servers for _ in range(2)]
    senders = [(s, name) for s in servers for name in ("alice", "bob", "carol")]
    total = per_sender * len(senders)

    async def send(index: int, server: DaphneServer, name: str) -> list[int]:
        client = await ChatClient.open(server, cookies[name])
        # Pipelined: all frames go out before the first ack comes back.
        await client.send(
            [
                {"type": "message", "text": f"{name}@{index}:{n}", "client_id": f"{index}-{n}"}
                for n in range(per_sender)
            ]
        )
        seqs = []
        for n in range(per_sender):
            ack = await client.wait_for(lambda f: f["type"] in ("ack", "error"), timeout=30)
            assert ack == {"type": "ack", "client_id": f"{index}-{n}", "seq": ack["seq"]}, ack
            seqs.append(ack["seq"])
        # Every sender is also a reader: it must see all messages, its own included.
        await client.wait_seq(total, timeout=30)
        assert client.seqs() == list(range(1, total + 1))
        return seqs

    results = await asyncio.gather(*(send(i, s, n) for i, (s, n) in enumerate(senders)))
    acked = sorted(seq for seqs in results for seq in seqs)
    assert acked == list(range(1, total + 1))
    for seqs in results:
        assert seqs == sorted(seqs), "one sender's messages were stored out of order"

    for reader in readers:
        await reader.wait_seq(total, timeout=30)
    reference = transcript(readers[0])
    assert [seq for seq, _, _ in reference] == list(range(1, total + 1))
    for reader in readers[1:]:
        assert transcript(reader) == reference


async def test_redis_restart_loses_no_stored_message(
    start_daphne: Callable[..., DaphneServer], sqlite_env: dict[str, str]
) -> None:
    redis = RedisServer()
    try:
        redis.start()
        env = {**sqlite_env, "REDIS_URL": redis.url}
        a, b = start_daphne(env), start_daphne(env)
        alice = await ChatClient.open(a, await login(a.base_url, "alice"))
        bob = await ChatClient.open(b, await login(b.base_url, "bob"))
        assert (await alice.post("before", "before"))["seq"] == 1
        await bob.wait_seq(1)

        redis.kill()
        # Stored and acknowledged; the broadcast is lost with Redis.
        assert (await alice.post("during outage", "during"))["seq"] == 2
        redis.start()

        # Once the layer has reconnected, the next live message reveals the gap, which the
        # server fills from the database. Keep sending until something gets through.
        sent = 2
        deadline = asyncio.get_running_loop().time() + 30
        while not [s for s in bob.seqs() if s > 1]:
            assert asyncio.get_running_loop().time() < deadline, "Redis never came back"
            sent += 1
            assert (await alice.post(f"after {sent}", f"after-{sent}"))["seq"] == sent
            try:
                await bob.wait_seq(2, timeout=0.5)
            except AssertionError:
                continue
        await bob.wait_seq(sent, timeout=10)
        assert bob.seqs() == list(range(1, sent + 1))
        assert [f["text"] for f in bob.messages()][:2] == ["before", "during outage"]
    finally:
        redis.cleanup()
