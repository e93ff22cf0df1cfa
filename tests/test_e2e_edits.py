"""Editing and deleting messages against a real daphne: live to every user, refusals, resume
after a lost connection (each change once, in order), and edits made in the Django admin."""

from __future__ import annotations

import asyncio
import re
import textwrap
from collections.abc import Callable
from typing import Any

import httpx
import msgpack
import pytest
from websockets.asyncio.client import connect

from chat import protocol
from tests.servers import ChatClient, DaphneServer, RedisServer, login, run_django_script
from tests.test_msgpack import binary_frames

pytestmark = [pytest.mark.e2e]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def server(
    request: pytest.FixtureRequest, start_daphne: Callable[..., DaphneServer]
) -> DaphneServer:
    """A daphne on SQLite, then on PostgreSQL (row locks and the migration on both)."""
    return start_daphne(dict(request.getfixturevalue(f"{request.param}_env")))


def is_update(seq: int, update_seq: int | None = None) -> Any:
    def match(frame: dict[str, Any]) -> bool:
        return (
            frame["type"] == "message_update"
            and frame["seq"] == seq
            and (update_seq is None or frame["update_seq"] == update_seq)
        )

    return match


def last_pong(client: ChatClient) -> dict[str, Any]:
    return [f for f in client.log if f["type"] == "pong"][-1]


def is_error(code: str) -> Any:
    return lambda frame: frame["type"] == "error" and frame["code"] == code


async def test_edit_and_delete_reach_both_users_live(server: DaphneServer) -> None:
    daphne = server
    alice = await ChatClient.open(daphne, await login(daphne.base_url, "alice"))
    bob = await ChatClient.open(daphne, await login(daphne.base_url, "bob"))
    ack = await alice.post("helo wrold", "c1")
    seq = ack["seq"]
    await bob.wait_seq(seq)

    await alice.send({"type": "edit", "seq": seq, "text": "hello world"})
    for client in (alice, bob):
        update = await client.wait_for(is_update(seq))
        assert (update["text"], update["deleted"], update["update_seq"]) == (
            "hello world",
            False,
            1,
        )
        assert update["edited_at"]

    await bob.send({"type": "delete", "seq": seq})
    refused = await bob.wait_for(is_error("forbidden"))
    assert refused["seq"] == seq

    await alice.send({"type": "delete", "seq": seq})
    for client in (alice, bob):
        update = await client.wait_for(is_update(seq, 2))
        assert (update["text"], update["deleted"]) == ("", True)
    # Each change reached each user once.
    for client in (alice, bob):
        updates = [f["update_seq"] for f in client.log if f["type"] == "message_update"]
        assert updates == [1, 2]
    await alice.close()
    await bob.close()


async def test_refusals(daphne: DaphneServer) -> None:
    alice = await ChatClient.open(daphne, await login(daphne.base_url, "alice"))
    seq = (await alice.post("mine", "c1"))["seq"]
    await alice.send({"type": "edit", "seq": seq + 50, "text": "x"})
    assert (await alice.wait_for(is_error("not_found")))["seq"] == seq + 50
    await alice.send({"type": "edit", "seq": seq})
    assert (await alice.wait_for(is_error("bad_frame")))["seq"] == seq
    await alice.send({"type": "delete", "seq": "1"})
    await alice.wait_for(is_error("bad_frame"))
    await alice.send({"type": "edit", "seq": seq, "text": "x" * 4001})
    assert (await alice.wait_for(is_error("too_long")))["seq"] == seq
    await alice.send({"type": "delete", "seq": seq})
    await alice.wait_for(is_update(seq, 1))
    await alice.send({"type": "delete", "seq": seq})
    await alice.wait_for(is_error("not_found"))
    assert [f["update_seq"] for f in alice.log if f["type"] == "message_update"] == [1]
    await alice.close()


async def test_resume_after_a_lost_connection_gets_each_change_once_in_order(
    server: DaphneServer,
) -> None:
    daphne = server
    alice = await ChatClient.open(daphne, await login(daphne.base_url, "alice"))
    bob_cookie = await login(daphne.base_url, "bob")
    bob = await ChatClient.open(daphne, bob_cookie)
    for n in (1, 2, 3):
        await alice.post(f"m{n}", f"c{n}")
    await bob.wait_seq(3)
    await alice.send({"type": "edit", "seq": 3, "text": "m3 edited"})
    await bob.wait_for(is_update(3, 1))
    await bob.ping()
    assert last_pong(bob)["last_update_seq"] == 1
    bob.drop()

    # While bob is away: three changes of what he has, a new message and its edit.
    await alice.send({"type": "edit", "seq": 1, "text": "m1 edited"})  # update 2
    await alice.send({"type": "delete", "seq": 2})  # update 3
    await alice.send({"type": "edit", "seq": 1, "text": "m1 again"})  # update 4
    await alice.post("m4", "c4")
    await alice.send({"type": "edit", "seq": 4, "text": "m4 edited"})  # update 5
    await alice.wait_for(is_update(4, 5))

    back = await ChatClient.open(daphne, bob_cookie, query="after=3&after_update=1")
    assert (back.hello["last_seq"], back.hello["last_update_seq"]) == (4, 5)
    await back.wait_seq(4)
    replay = [(f["type"], f["seq"], f.get("update_seq")) for f in back.log[1:]]
    assert replay == [
        ("message_update", 2, 3),  # deleted
        ("message_update", 1, 4),  # edited twice: one frame, its current text
        ("message", 4, 5),  # new to him: sent with its current text, no separate update
    ]
    assert back.log[2]["text"] == "m1 again" and back.log[1]["deleted"] is True
    assert back.log[3]["text"] == "m4 edited"
    # Nothing more, and live changes continue once each.
    assert await back.ping() == []
    assert last_pong(back)["last_update_seq"] == 5
    await alice.send({"type": "edit", "seq": 3, "text": "m3 final"})
    await back.wait_for(is_update(3, 6))
    assert await back.ping() == []
    assert [f["update_seq"] for f in back.log if f["type"] == "message_update"] == [3, 4, 6]
    await alice.close()
    await back.close()


_MAKE_STAFF = textwrap.dedent(
    """
    import django
    django.setup()
    from django.contrib.auth import get_user_model
    get_user_model().objects.filter(username="carol").update(is_staff=True, is_superuser=True)
    """
)


def _cookie_value(cookie: str, name: str) -> str:
    match = re.search(rf"{name}=([^;]+)", cookie)
    assert match, cookie
    return match.group(1)


async def test_admin_edit_and_delete_reach_an_open_socket(
    daphne: DaphneServer, sqlite_env: dict[str, str]
) -> None:
    run_django_script(_MAKE_STAFF, sqlite_env)
    alice = await ChatClient.open(daphne, await login(daphne.base_url, "alice"))
    seq = (await alice.post("typo hier", "c1"))["seq"]
    message_id = (await alice.wait_for(lambda f: f["type"] == "message"))["id"]
    staff = await login(daphne.base_url, "carol")
    token = _cookie_value(staff, "csrftoken")
    async with httpx.AsyncClient(base_url=daphne.base_url, timeout=10) as http:
        headers = {"Cookie": staff}
        url = f"/admin/chat/message/{message_id}/"
        form = {"csrfmiddlewaretoken": token, "text": "typo here"}
        edited = await http.post(url + "change/", data=form, headers=headers)
        assert edited.status_code == 302, edited.text[:500]
        update = await alice.wait_for(is_update(seq, 1))
        assert update["text"] == "typo here"

        form = {"csrfmiddlewaretoken": token, "post": "yes"}
        deleted = await http.post(url + "delete/", data=form, headers=headers)
        assert deleted.status_code == 302, deleted.text[:500]
        update = await alice.wait_for(is_update(seq, 2))
        assert (update["deleted"], update["text"]) == (True, "")
        # The row stays, so the room's seqs stay gap-free: the history page still has it.
        page = await http.get("/chat/lobby/messages/", headers=headers)
        assert [(m["seq"], m["deleted"]) for m in page.json()["messages"]] == [(seq, True)]
    await alice.close()


@pytest.mark.redis
async def test_changes_from_two_processes_reach_both_in_update_order(
    start_daphne: Callable[..., DaphneServer],
    sqlite_env: dict[str, str],
    redis_server: RedisServer,
) -> None:
    env = {**sqlite_env, "REDIS_URL": redis_server.url, "CHAT_EDIT_RATE_LIMIT": "1000"}
    a, b = start_daphne(env), start_daphne(env)
    alice = await ChatClient.open(a, await login(a.base_url, "alice"))
    bob = await ChatClient.open(b, await login(b.base_url, "bob"))
    carol = await login(a.base_url, "carol")
    readers = [await ChatClient.open(server, carol) for server in (a, b)]
    per_user = 10
    for n in range(per_user):
        await alice.post(f"alice {n}", f"a{n}")
        await bob.post(f"bob {n}", f"b{n}")
    total = 2 * per_user
    for reader in readers:
        await reader.wait_seq(total)
    mine = {
        "alice": [f["seq"] for f in readers[0].messages() if f["user"]["username"] == "alice"],
        "bob": [f["seq"] for f in readers[0].messages() if f["user"]["username"] == "bob"],
    }

    # Both processes store changes at once: each process must still deliver them in order.
    await asyncio.gather(
        alice.send([{"type": "edit", "seq": s, "text": f"edited {s}"} for s in mine["alice"]]),
        bob.send([{"type": "delete", "seq": s} for s in mine["bob"]]),
    )
    for reader in readers:
        await reader.wait_for(
            lambda f: f["type"] == "message_update" and f["update_seq"] == total, timeout=30
        )
        await reader.ping()
        updates = [f for f in reader.log if f["type"] == "message_update"]
        assert [f["update_seq"] for f in updates] == list(range(1, total + 1))
        assert sorted(f["seq"] for f in updates) == list(range(1, total + 1))
        for f in updates:
            expected = ("", True) if f["seq"] in mine["bob"] else (f"edited {f['seq']}", False)
            assert (f["text"], f["deleted"]) == expected
    for client in (alice, bob, *readers):
        await client.close()


async def test_msgpack_and_json_clients_get_the_same_update(daphne: DaphneServer) -> None:
    ws = await connect(
        daphne.ws_url("/ws/chat/lobby/"),
        additional_headers={"Cookie": await login(daphne.base_url, "alice")},
        origin=daphne.base_url,  # type: ignore[arg-type]
        subprotocols=[protocol.SUBPROTOCOL_MSGPACK],  # type: ignore[list-item]
        max_size=None,
    )
    bob = await ChatClient.open(daphne, await login(daphne.base_url, "bob"))
    await ws.send(msgpack.packb({"type": "message", "text": "binary", "client_id": "m1"}))
    await bob.wait_seq(1)
    await ws.send(msgpack.packb({"type": "edit", "seq": 1, "text": "binary, edited"}))
    seen: list[dict[str, Any]] = []
    while not any(f["type"] == "message_update" for f in seen):
        seen += await binary_frames(ws)
    binary = next(f for f in seen if f["type"] == "message_update")
    assert binary == await bob.wait_for(is_update(1, 1))
    assert binary["text"] == "binary, edited"
    await ws.close()
    await bob.close()
