"""No message is lost or repeated when connections drop: clients resume with ``?after=<seq>``.

A dropped connection here is an aborted TCP connection (no close frame), as when a phone
changes networks; a crashed server is a SIGKILLed daphne restarted on the same port.
"""

from __future__ import annotations

import asyncio

import pytest
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from tests.servers import ChatClient, DaphneServer, login

pytestmark = [pytest.mark.e2e]

RECONNECT_DELAY_SECONDS = 0.05
GIVE_UP_SECONDS = 60.0
TEST_SECONDS = 120.0


class Progress:
    """The highest seq acknowledged to the sender, for readers that wait for it."""

    def __init__(self) -> None:
        self.acked = 0
        self._changed = asyncio.Condition()

    async def advance(self, seq: int) -> None:
        async with self._changed:
            self.acked = max(self.acked, seq)
            self._changed.notify_all()

    async def reach(self, seq: int) -> None:
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: self.acked >= seq), 30)


async def open_with_retry(server: DaphneServer, cookie: str, query: str) -> ChatClient:
    """Connect, retrying while the server is down (connection refused, or not yet serving)."""
    deadline = asyncio.get_running_loop().time() + GIVE_UP_SECONDS
    while True:
        try:
            return await ChatClient.open(server, cookie, query=query)
        except (OSError, InvalidHandshake, ConnectionClosed, TimeoutError):
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(RECONNECT_DELAY_SECONDS)


async def follow(
    server: DaphneServer,
    cookie: str,
    total: int,
    drop_at: tuple[int, ...] = (),
    progress: Progress | None = None,
    connections: list[int] | None = None,
) -> list[int]:
    """Read the room until seq ``total``, reconnecting with ``?after=`` after every loss.

    At each seq in ``drop_at`` the connection is aborted; with ``progress``, the reader stays
    away until 10 more messages were stored, so it must recover them on return.
    Returns every seq received, duplicates included, in arrival order; appends the number of
    connections it opened to ``connections``.
    """
    seen: list[int] = []
    drops = list(drop_at)
    opened = 0
    while not seen or seen[-1] < total:
        client = await open_with_retry(server, cookie, f"after={seen[-1] if seen else 0}")
        opened += 1
        try:
            while not seen or seen[-1] < total:
                frame = await client.wait_for(lambda f: f["type"] == "message", timeout=30)
                seen.append(frame["seq"])
                if drops and frame["seq"] >= drops[0]:
                    point = drops.pop(0)
                    client.drop()
                    if progress is not None:
                        await progress.reach(min(point + 10, total))
                    break
        except ConnectionClosed:
            pass
        finally:
            client.drop()
    if connections is not None:
        connections.append(opened)
    return seen


async def send_all(
    server: DaphneServer,
    cookie: str,
    texts: list[str],
    progress: Progress | None = None,
) -> dict[str, int]:
    """Post every text with a fixed client_id; reconnect and resend whatever is unacked.

    Returns client_id -> acked seq.
    """
    acked: dict[str, int] = {}
    while len(acked) < len(texts):
        client = await open_with_retry(server, cookie, f"after={2**31}")
        try:
            for n, text in enumerate(texts):
                client_id = f"c{n}"
                if client_id in acked:
                    continue
                answer = await client.post(text, client_id, timeout=30)
                assert answer["type"] == "ack", answer
                acked[client_id] = answer["seq"]
                if progress is not None:
                    await progress.advance(answer["seq"])
        except ConnectionClosed:
            continue
        finally:
            client.drop()
    return acked


async def test_readers_that_drop_mid_stream_miss_nothing(daphne: DaphneServer) -> None:
    total = 150
    progress = Progress()
    alice = await login(daphne.base_url, "alice")
    bob = await login(daphne.base_url, "bob")
    carol = await login(daphne.base_url, "carol")
    plans = [(bob, (20, 60)), (bob, (35, 90)), (carol, (50, 110)), (carol, (10, 70, 130))]
    connections: list[int] = []
    # A TaskGroup cancels every task as soon as one fails, so a failure never hangs.
    async with asyncio.timeout(TEST_SECONDS), asyncio.TaskGroup() as group:
        readers = [
            group.create_task(follow(daphne, cookie, total, drops, progress, connections))
            for cookie, drops in plans
        ]
        texts = [f"m{n}" for n in range(total)]
        sender = group.create_task(send_all(daphne, alice, texts, progress))
    assert sorted(sender.result().values()) == list(range(1, total + 1))
    for (_, drops), reader in zip(plans, readers, strict=True):
        assert reader.result() == list(range(1, total + 1)), f"reader dropping at {drops}"
    assert sorted(connections) == sorted(len(drops) + 1 for _, drops in plans)


async def test_sender_that_drops_resends_without_duplicates(daphne: DaphneServer) -> None:
    alice = await login(daphne.base_url, "alice")
    bob = await ChatClient.open(daphne, await login(daphne.base_url, "bob"))
    total = 40
    # Fire everything and lose the connection before reading a single ack: some of these
    # were stored, some not; the client cannot know which.
    client = await ChatClient.open(daphne, alice)
    await client.send(
        [{"type": "message", "text": f"m{n}", "client_id": f"c{n}"} for n in range(total)]
    )
    client.drop()
    again = await ChatClient.open(daphne, alice)
    acks = [await again.post(f"m{n}", f"c{n}") for n in range(total)]
    assert all(a["type"] == "ack" for a in acks), acks
    assert sorted(a["seq"] for a in acks) == list(range(1, total + 1))
    await bob.wait_seq(total)
    assert await bob.ping() == []
    assert bob.seqs() == list(range(1, total + 1))
    assert sorted(f["client_id"] for f in bob.messages()) == sorted(f"c{n}" for n in range(total))


async def test_server_crash_and_restart_loses_nothing(daphne: DaphneServer) -> None:
    total = 80
    progress = Progress()
    alice = await login(daphne.base_url, "alice")
    bob = await login(daphne.base_url, "bob")
    carol = await login(daphne.base_url, "carol")
    connections: list[int] = []

    async def crash() -> None:
        await progress.reach(30)
        # SIGKILL while the sender is mid-stream: whatever it has in flight is unacknowledged.
        daphne.kill()
        await asyncio.to_thread(daphne.start)

    async with asyncio.timeout(TEST_SECONDS), asyncio.TaskGroup() as group:
        readers = [
            group.create_task(follow(daphne, cookie, total, connections=connections))
            for cookie in (bob, carol)
        ]
        texts = [f"m{n}" for n in range(total)]
        sender = group.create_task(send_all(daphne, alice, texts, progress))
        group.create_task(crash())
    assert sorted(sender.result().values()) == list(range(1, total + 1))
    for reader in readers:
        assert reader.result() == list(range(1, total + 1))
    assert min(connections) >= 2, "the readers never lost their connection"
