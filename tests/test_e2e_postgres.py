"""PostgreSQL: seq stays gap-free and duplicate-free under concurrent senders in many processes."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import textwrap
from collections.abc import Callable

import psycopg
import pytest

from tests.servers import (
    ChatClient,
    DaphneServer,
    RedisServer,
    db_connections,
    login,
    run_django_script,
)
from tests.test_e2e_assistant_db import eventually

pytestmark = [pytest.mark.e2e]

SENDERS = 10
PER_SENDER = 20


def pg_seqs(database_url: str, room: str = "lobby") -> tuple[list[int], int]:
    """Stored seqs of a room, in order, and the room's last_seq, read with psycopg."""
    with psycopg.connect(database_url) as conn:
        seqs = [
            row[0]
            for row in conn.execute(
                "SELECT m.seq FROM chat_message m JOIN chat_room r ON r.id = m.room_id "
                "WHERE r.slug = %s ORDER BY m.seq",
                (room,),
            )
        ]
        row = conn.execute("SELECT last_seq FROM chat_room WHERE slug = %s", (room,)).fetchone()
        assert row is not None
    return seqs, int(row[0])


def sqlite_seqs(path: str, room: str = "lobby") -> tuple[list[int], int]:
    with sqlite3.connect(path) as conn:
        seqs = [
            row[0]
            for row in conn.execute(
                "SELECT m.seq FROM chat_message m JOIN chat_room r ON r.id = m.room_id "
                "WHERE r.slug = ? ORDER BY m.seq",
                (room,),
            )
        ]
        (last,) = conn.execute("SELECT last_seq FROM chat_room WHERE slug = ?", (room,)).fetchone()
    conn.close()
    return seqs, int(last)


@pytest.mark.postgres
@pytest.mark.redis
async def test_concurrent_senders_on_two_processes(
    start_daphne: Callable[..., DaphneServer],
    postgres_env: dict[str, str],
    redis_server: RedisServer,
) -> None:
    env = {**postgres_env, "REDIS_URL": redis_server.url}
    servers = [start_daphne(env), start_daphne(env)]
    names = ("alice", "bob", "carol")
    cookies = {name: await login(servers[0].base_url, name) for name in names}
    receivers = [await ChatClient.open(s, cookies["carol"]) for s in servers]
    total = SENDERS * PER_SENDER

    async def send(index: int) -> list[int]:
        server = servers[index % 2]
        client = await ChatClient.open(server, cookies[names[index % 3]])
        await client.send(
            [
                {"type": "message", "text": f"s{index}:{n}", "client_id": f"s{index}-{n}"}
                for n in range(PER_SENDER)
            ]
        )
        acks = []
        for n in range(PER_SENDER):
            ack = await client.wait_for(lambda f: f["type"] in ("ack", "error"), timeout=30)
            assert ack == {"type": "ack", "client_id": f"s{index}-{n}", "seq": ack["seq"]}, ack
            acks.append(ack["seq"])
        await client.wait_seq(total, timeout=30)
        assert client.seqs() == list(range(1, total + 1))
        await client.close()
        return acks

    results = await asyncio.gather(*(send(i) for i in range(SENDERS)))
    acked = sorted(seq for acks in results for seq in acks)
    assert acked == list(range(1, total + 1)), "acks have a gap or a duplicate"
    assert await asyncio.to_thread(pg_seqs, env["DATABASE_URL"]) == (
        list(range(1, total + 1)),
        total,
    )
    transcripts = []
    for receiver in receivers:
        await receiver.wait_seq(total, timeout=30)
        assert receiver.seqs() == list(range(1, total + 1))
        transcripts.append([(f["seq"], f["text"]) for f in receiver.messages()])
    assert transcripts[0] == transcripts[1]


# One Django start-up, then forked workers (separate OS processes, each with its own database
# connection) that wait at a barrier and store their messages as fast as they can.
WORKERS_SCRIPT = textwrap.dedent(
    """
    import json, multiprocessing, os, sys
    import django
    django.setup()
    from django.contrib.auth import get_user_model
    from django.db import connections
    from chat import services
    from chat.models import Room

    args = json.loads(sys.argv[1])
    users = ("alice", "bob", "carol")

    def work(worker, barrier, results):
        user = get_user_model().objects.get(username=users[worker % len(users)])
        room = Room.objects.get(slug="lobby")
        barrier.wait(timeout=60)
        seqs = []
        for n in range(args["count"]):
            result = services.post_message(room.pk, user, f"w{worker}:{n}", f"w{worker}-{n}")
            assert result.created
            seqs.append(result.message.seq)
        results.put({"pid": os.getpid(), "seqs": seqs})

    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(args["workers"])
    results = context.Queue()
    connections.close_all()  # no connection may be shared across fork
    procs = [
        context.Process(target=work, args=(w, barrier, results)) for w in range(args["workers"])
    ]
    for proc in procs:
        proc.start()
    out = [results.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(timeout=10)
        assert proc.exitcode == 0, proc.exitcode
    print(json.dumps(out))
    """
)


async def test_group_commit_lets_its_connection_go_once_the_room_is_quiet(
    start_daphne: Callable[..., DaphneServer], postgres_env: dict[str, str]
) -> None:
    # Batches that follow one another share a connection; once the room's queue drains it
    # is closed (CONN_MAX_AGE=0), even though the sender stays and nothing else touches the
    # database afterwards.
    # The assistant's sweeper (a query every CHAT_ASSISTANT_TAKEOVER_SECONDS / 2) would close
    # the thread's connection too: not within this test.
    env = {**postgres_env, "CHAT_ASSISTANT_TAKEOVER_SECONDS": "600"}
    server = start_daphne(env)
    sender = await ChatClient.open(server, await login(server.base_url, "alice"))
    count = 60
    for first in range(0, count, 20):  # 20 in flight per socket (CHAT_MAX_PENDING_SENDS)
        await sender.send(
            [
                {"type": "message", "text": f"m{n}", "client_id": f"m{n}"}
                for n in range(first, first + 20)
            ]
        )
    await sender.wait_seq(count, timeout=30)
    assert await eventually(lambda: db_connections(server, env) == 0, timeout=10), (
        f"{db_connections(server, env)} connections held by an idle server"
    )
    assert sender.seqs() == list(range(1, count + 1))
    await sender.close()


@pytest.mark.parametrize(
    "database",
    [pytest.param("postgres", marks=pytest.mark.postgres), "sqlite"],
)
def test_post_message_from_many_os_processes(request: pytest.FixtureRequest, database: str) -> None:
    env: dict[str, str] = request.getfixturevalue(f"{database}_env")
    workers, count = 6, 25
    payload = json.dumps({"workers": workers, "count": count})
    output = run_django_script(WORKERS_SCRIPT, env, payload, timeout=150)
    results = json.loads(output.strip().splitlines()[-1])

    assert len({r["pid"] for r in results}) == workers
    total = workers * count
    for result in results:
        assert result["seqs"] == sorted(result["seqs"])
    acked = sorted(seq for result in results for seq in result["seqs"])
    assert acked == list(range(1, total + 1))
    if database == "postgres":
        stored = pg_seqs(env["DATABASE_URL"])
    else:
        stored = sqlite_seqs(env["SQLITE_PATH"])
    assert stored == (list(range(1, total + 1)), total)


@pytest.mark.postgres
async def test_nul_in_client_id_is_not_unavailable(
    start_daphne: Callable[..., DaphneServer], postgres_env: dict[str, str]
) -> None:
    # PostgreSQL text cannot hold NUL. The protocol refuses NUL in text (bad_frame) but not in
    # client_id, so the insert fails and the client is told "unavailable": retry, forever.
    server = start_daphne(postgres_env)
    client = await ChatClient.open(server, await login(server.base_url, "alice"))
    await client.ws.send('{"type":"message","text":"ok","client_id":"n\\u0000"}')
    answer = await client.wait_for(lambda f: f["type"] in ("ack", "error"))
    assert answer["type"] == "ack" or answer["code"] == "bad_frame", answer
