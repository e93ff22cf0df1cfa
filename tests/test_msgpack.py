"""The opt-in MessagePack subprotocol: same frames, binary, encoded once per format."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import msgpack
import pytest
from websockets.asyncio.client import ClientConnection, connect

from chat import protocol
from chat.protocol import Encoded
from tests.servers import ChatClient, DaphneServer, login

LIMITS = protocol.Limits(4000, 65536, 50)


def test_frames_pack_into_msgpack_arrays_within_the_budget() -> None:
    frames = [Encoded.of({"type": "message", "seq": n, "text": "é" * 3000}) for n in range(40)]
    messages = protocol.pack_msgpack(frames, 65536)
    assert len(messages) > 1 and all(len(m) <= 65536 for m in messages)
    decoded = [f for m in messages for f in msgpack.unpackb(m)]
    assert [f["seq"] for f in decoded] == list(range(40))
    single = protocol.pack_msgpack(frames[:1], 65536)
    assert msgpack.unpackb(single[0]) == json.loads(frames[0].text)
    # Each frame is converted once, however many sockets get it.
    assert frames[0].msgpack() is frames[0].msgpack()


def test_client_msgpack_is_validated_like_json() -> None:
    (ok,) = protocol.parse_client_msgpack(msgpack.packb({"type": "ping"}), LIMITS)
    assert isinstance(ok, protocol.Ping)
    many = protocol.parse_client_msgpack(
        msgpack.packb([{"type": "message", "text": "hi", "client_id": "x"}] * 3), LIMITS
    )
    assert all(isinstance(f, protocol.SendMessage) for f in many)
    (bad,) = protocol.parse_client_msgpack(
        msgpack.packb({"type": "message", "text": b"hi"}), LIMITS
    )
    assert isinstance(bad, protocol.FrameError) and bad.code == protocol.BAD_FRAME
    for garbage in (b"\xc1", b"\x92\x01", b"\xa3ab", msgpack.packb("x") + b"\x00"):
        with pytest.raises(protocol.ProtocolError) as refused:
            protocol.parse_client_msgpack(garbage, LIMITS)
        assert refused.value.code == protocol.BAD_JSON
    with pytest.raises(protocol.ProtocolError) as large:
        protocol.parse_client_msgpack(b"\x00" * 70000, LIMITS)
    assert large.value.code == protocol.TOO_LARGE


async def binary_frames(ws: ClientConnection, timeout: float = 5.0) -> list[dict[str, Any]]:
    raw = await asyncio.wait_for(ws.recv(), timeout)
    assert isinstance(raw, bytes), f"expected a binary message, got {raw!r}"
    decoded = msgpack.unpackb(raw)
    return decoded if isinstance(decoded, list) else [decoded]


@pytest.mark.e2e
async def test_msgpack_and_json_clients_share_a_room(daphne: DaphneServer) -> None:
    cookie = await login(daphne.base_url, "alice")
    ws = await connect(
        daphne.ws_url("/ws/chat/lobby/"),
        additional_headers={"Cookie": cookie},
        origin=daphne.base_url,  # type: ignore[arg-type]
        subprotocols=[protocol.SUBPROTOCOL_MSGPACK],  # type: ignore[list-item]
        max_size=None,
    )
    assert ws.subprotocol == protocol.SUBPROTOCOL_MSGPACK
    first = await binary_frames(ws)
    assert first[0]["type"] == "hello"
    bob = await ChatClient.open(daphne, await login(daphne.base_url, "bob"))
    await ws.send(msgpack.packb({"type": "message", "text": "binary hi", "client_id": "m1"}))
    seen: list[dict[str, Any]] = []
    while not any(f["type"] == "message" for f in seen):
        seen += await binary_frames(ws)
    kinds = [f["type"] for f in seen if f["type"] in ("ack", "message")]
    assert kinds == ["ack", "message"]
    await bob.wait_seq(1)
    assert bob.messages()[-1]["text"] == "binary hi"
    # A JSON client's message reaches the MessagePack one, and the other way round.
    await bob.post("text hi", "b1")
    seen = []
    while not any(f.get("seq") == 2 for f in seen):
        seen += await binary_frames(ws)
    assert next(f for f in seen if f.get("seq") == 2)["text"] == "text hi"
    # Text on a MessagePack socket is refused with an error, in MessagePack.
    await ws.send(json.dumps({"type": "ping"}))
    errors: list[dict[str, Any]] = []
    while not errors:
        errors = [f for f in await binary_frames(ws) if f["type"] == "error"]
    assert errors[0]["code"] == "bad_frame"
    await ws.close()
    await bob.close()
