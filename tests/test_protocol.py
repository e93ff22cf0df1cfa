"""Unit tests of the chat wire format: parsing client frames, encoding server frames."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from types import SimpleNamespace

import pytest

from chat import protocol

LIMITS = protocol.Limits(max_text_length=20, max_frame_bytes=256, max_frames_per_message=3)


def parse(text: str) -> list[protocol.ClientFrame | protocol.FrameError]:
    return protocol.parse_client_text(text, LIMITS)


def test_message_frame_is_parsed() -> None:
    assert parse('{"type":"message","text":"hi","client_id":"c1"}') == [
        protocol.SendMessage(text="hi", client_id="c1")
    ]


def test_client_id_is_optional() -> None:
    assert parse('{"type":"message","text":"hi"}') == [protocol.SendMessage("hi", "")]
    assert parse('{"type":"message","text":"hi","client_id":null}') == [
        protocol.SendMessage("hi", "")
    ]


def test_ping_and_resume() -> None:
    assert parse('{"type":"ping"}') == [protocol.Ping()]
    assert parse('{"type":"resume","after":7}') == [protocol.Resume(after=7)]


def test_array_of_frames_keeps_order_and_errors_per_frame() -> None:
    frames = parse('[{"type":"ping"},{"type":"nope"},{"type":"resume","after":0}]')
    assert frames[0] == protocol.Ping()
    assert isinstance(frames[1], protocol.FrameError) and frames[1].code == protocol.BAD_FRAME
    assert frames[2] == protocol.Resume(after=0)


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("{not json", protocol.BAD_JSON),
        ("", protocol.BAD_JSON),
        ("[]", protocol.BAD_FRAME),
        ('[{"type":"ping"},{"type":"ping"},{"type":"ping"},{"type":"ping"}]', protocol.BAD_FRAME),
        ("x" * 300, protocol.TOO_LARGE),
        # Size is counted in UTF-8 bytes, not characters.
        ('"' + "é" * 130 + '"', protocol.TOO_LARGE),
    ],
)
def test_whole_message_errors(text: str, code: str) -> None:
    with pytest.raises(protocol.ProtocolError) as info:
        parse(text)
    assert info.value.code == code
    assert info.value.message


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (42, protocol.BAD_FRAME),
        ("ping", protocol.BAD_FRAME),
        ({"text": "no type"}, protocol.BAD_FRAME),
        ({"type": 3}, protocol.BAD_FRAME),
        ({"type": "_private"}, protocol.BAD_FRAME),
        ({"type": "message"}, protocol.BAD_FRAME),
        ({"type": "message", "text": 5}, protocol.BAD_FRAME),
        ({"type": "message", "text": ""}, protocol.BAD_FRAME),
        ({"type": "message", "text": " \n\t"}, protocol.BAD_FRAME),
        ({"type": "message", "text": "a\x00b"}, protocol.BAD_FRAME),
        ({"type": "message", "text": "x" * 21}, protocol.TOO_LONG),
        ({"type": "message", "text": "hi", "client_id": 5}, protocol.BAD_FRAME),
        ({"type": "message", "text": "hi", "client_id": "c" * 65}, protocol.BAD_FRAME),
        ({"type": "resume"}, protocol.BAD_FRAME),
        ({"type": "resume", "after": -1}, protocol.BAD_FRAME),
        ({"type": "resume", "after": "3"}, protocol.BAD_FRAME),
        ({"type": "resume", "after": True}, protocol.BAD_FRAME),
        ({"type": "resume", "after": 1.5}, protocol.BAD_FRAME),
    ],
)
def test_bad_frames(frame: object, code: str) -> None:
    (result,) = parse(json.dumps(frame))
    assert isinstance(result, protocol.FrameError)
    assert result.code == code
    assert result.message


def test_text_at_the_limit_is_accepted() -> None:
    assert parse(json.dumps({"type": "message", "text": "x" * 20})) == [
        protocol.SendMessage("x" * 20, "")
    ]


def test_message_errors_carry_the_client_id() -> None:
    (result,) = parse('{"type":"message","text":"","client_id":"abc"}')
    assert isinstance(result, protocol.FrameError)
    assert result.client_id == "abc"
    assert protocol.error_frame(result.code, result.message, result.client_id)["client_id"] == "abc"


def _user() -> SimpleNamespace:
    return SimpleNamespace(pk=3, get_username=lambda: "alice")


def test_message_frame_shape() -> None:
    created = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    message = SimpleNamespace(id=11, seq=4, text="<b>hi</b>", client_id="", created_at=created)
    frame = protocol.message_frame(message, "lobby", _user())
    assert frame == {
        "type": "message",
        "seq": 4,
        "id": 11,
        "room": "lobby",
        "user": {"id": 3, "username": "alice"},
        "text": "<b>hi</b>",
        "client_id": None,
        "created_at": "2026-01-02T03:04:05+00:00",
    }


def test_server_frames() -> None:
    assert protocol.hello_frame("lobby", _user(), 9, 4) == {
        "type": "hello",
        "room": "lobby",
        "user": {"id": 3, "username": "alice"},
        "last_seq": 9,
        "last_update_seq": 4,
    }
    assert protocol.ack_frame("c1", 5) == {"type": "ack", "client_id": "c1", "seq": 5}
    assert protocol.ack_frame("", 5)["client_id"] is None
    assert protocol.pong_frame(7, 2) == {"type": "pong", "last_seq": 7, "last_update_seq": 2}
    assert protocol.error_frame("bad_json", "nope") == {
        "type": "error",
        "code": "bad_json",
        "message": "nope",
    }


def test_encode_is_compact_json_and_keeps_unicode_and_markup() -> None:
    text = protocol.encode({"type": "message", "text": "<script>é</script>\n"})
    assert text == '{"type":"message","text":"<script>é</script>\\n"}'
    assert json.loads(protocol.encode([{"a": 1}, {"b": 2}])) == [{"a": 1}, {"b": 2}]
