"""The SSE encoding (realtime_kit/sse.py) and the notifications wire format: pure, plain strings."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from httpx_sse._decoders import SSEDecoder, SSELineDecoder

from notifications import protocol
from realtime_kit import sse
from realtime_kit.responses import error_body

CREATED = datetime(2026, 11, 21, 6, 0, 0, 123456, tzinfo=UTC)


def decode(text: str) -> list[tuple[str, str, str]]:
    """Parse a stream with httpx-sse (a real SSE client): (event, data, id) per event.

    Like browsers (and unlike httpx-sse), events with empty data are not dispatched.
    """
    lines = SSELineDecoder()
    decoder = SSEDecoder()
    events = []
    for line in [*lines.decode(text), *lines.flush()]:
        event = decoder.decode(line)
        if event is not None and event.data:
            events.append((event.event, event.data, event.id))
    return events


# --- sse ---------------------------------------------------------------------------------------


def test_event_with_id_and_name() -> None:
    assert sse.encode_event("hi", event="notification", event_id=5) == (
        "id: 5\nevent: notification\ndata: hi\n\n"
    )


def test_data_only_event() -> None:
    assert sse.encode_event("x") == "data: x\n\n"
    # An empty name is left out: clients dispatch it as "message" either way.
    assert sse.encode_event("x", event="") == "data: x\n\n"
    assert decode(sse.encode_event("x", event="")) == [("message", "x", "")]


def test_multi_line_data_becomes_several_data_lines() -> None:
    text = sse.encode_event("a\nb\r\nc\rd", event="e")
    assert text == "event: e\ndata: a\ndata: b\ndata: c\ndata: d\n\n"
    assert decode(text) == [("e", "a\nb\nc\nd", "")]


def test_empty_and_trailing_newline_data_survive() -> None:
    assert sse.encode_event("") == "data: \n\n"
    assert decode(sse.encode_event("\n")) == [("message", "\n", "")]
    assert decode(sse.encode_event("end\n")) == [("message", "end\n", "")]


def test_id_and_event_name_are_sanitised() -> None:
    text = sse.encode_event("d", event="noti\r\nfi\ncation\x00", event_id="1\r2\n3\x004")
    assert text == "id: 1234\nevent: notification\ndata: d\n\n"
    # An injected field cannot appear: every line is one of ours.
    evil = sse.encode_event("ok", event="x\ndata: injected\nid: 999", event_id="7\nretry: 1")
    assert [line.split(":")[0] for line in evil.splitlines() if line] == ["id", "event", "data"]
    assert decode(evil) == [("xdata: injectedid: 999", "ok", "7retry: 1")]


def test_data_cannot_inject_fields_or_end_the_event() -> None:
    text = sse.encode_event("one\n\nid: 99\nevent: evil\n", event="e", event_id=1)
    assert decode(text) == [("e", "one\n\nid: 99\nevent: evil\n", "1")]


def test_comment_and_retry() -> None:
    assert sse.encode_comment("keepalive") == ": keepalive\n\n"
    assert sse.encode_comment("a\nb") == ": a\n: b\n\n"
    assert sse.encode_comment() == ":\n\n"
    assert sse.encode_retry(3000) == "retry: 3000\n\n"
    assert sse.encode_retry(-5) == "retry: 0\n\n"
    assert decode(sse.encode_comment("x") + sse.encode_retry(10)) == []


def test_unicode_is_kept_verbatim() -> None:
    assert decode(sse.encode_event("héllo ✓ 😀")) == [("message", "héllo ✓ 😀", "")]


# --- protocol ------------------------------------------------------------------------------------


def test_notification_json_shape_and_order() -> None:
    tail = protocol.notification_tail("T", "B\nline", "/x/", "info", CREATED, read=False)
    data = protocol.notification_json(42, tail)
    decoded = json.loads(data)
    assert list(decoded) == ["id", "title", "body", "url", "level", "created_at", "read"]
    assert decoded == {
        "id": 42,
        "title": "T",
        "body": "B\nline",
        "url": "/x/",
        "level": "info",
        "created_at": "2026-11-21T06:00:00.123456+00:00",
        "read": False,
    }
    assert "\n" not in data, "JSON escapes newlines: one data line per notification"


def test_one_tail_serves_many_ids() -> None:
    tail = protocol.notification_tail("T", "", "", "info", CREATED, read=True)
    assert [json.loads(protocol.notification_json(i, tail))["id"] for i in (1, 2)] == [1, 2]


def test_line_separators_are_escaped() -> None:
    tail = protocol.notification_tail("a\u2028b", "c\u2029d", "", "info", CREATED, read=False)
    data = protocol.notification_json(1, tail)
    assert "\u2028" not in data and "\u2029" not in data
    assert json.loads(data)["title"] == "a\u2028b"


def test_notification_event() -> None:
    tail = protocol.notification_tail("T", "", "", "warning", CREATED, read=False)
    text = protocol.notification_event(7, protocol.notification_json(7, tail))
    ((event, data, event_id),) = decode(text)
    assert (event, event_id) == ("notification", "7")
    assert json.loads(data)["level"] == "warning"


def test_unread_event_has_no_id() -> None:
    text = protocol.unread_event(3, 40)
    assert text == 'event: unread\ndata: {"count":3,"last_id":40}\n\n'
    assert "id:" not in text


def test_keepalive_is_a_comment() -> None:
    assert protocol.keepalive() == ": keepalive\n\n"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [(None, None), ("", None), ("  ", None), ("0", 0), ("42", 42), (" 7 ", 7)],
)
def test_parse_last_event_id(raw: str | None, expected: int | None) -> None:
    assert protocol.parse_last_event_id(raw) == expected


@pytest.mark.parametrize("raw", ["-1", "abc", "1.5", "1e3", "٣", "1" * 21, "0x10", "1 2"])
def test_parse_last_event_id_refuses_garbage(raw: str) -> None:
    with pytest.raises(ValueError):
        protocol.parse_last_event_id(raw)


def test_batch_message_round_trip() -> None:
    items = [protocol.BatchItem(1, 10, 0), protocol.BatchItem(2, 11, 5)]
    message = protocol.batch_message("tail", items)
    assert message["type"] == protocol.LAYER_BATCH
    # msgpack (channels_redis) turns tuples into lists; lists survive either way.
    assert protocol.parse_batch_items(json.loads(json.dumps(message["items"]))) == items


@pytest.mark.parametrize("raw", [None, "x", [[1, 2]], [["a", 1, 2]], [{"user": 1}]])
def test_batch_items_refuse_garbage(raw: object) -> None:
    with pytest.raises((ValueError, TypeError)):
        protocol.parse_batch_items(raw)


def test_error_body() -> None:
    assert error_body("too_many_streams", "m", limit=10) == {
        "error": {"code": "too_many_streams", "message": "m", "limit": 10}
    }


AWKWARD_TEXTS = ['q "x" \\ /', "tab\there\nnl\r\x00\x1f\x7f", "😀 Grüße 東京 \u2028\u2029", ""]


@pytest.mark.parametrize("text", AWKWARD_TEXTS)
def test_sse_json_is_the_stdlib_compact_json_byte_for_byte(text: str) -> None:
    # Both apps encode SSE data with orjson; clients were written against json.dumps output.
    from chat.assistant import protocol as assistant_protocol
    from realtime_kit import sse

    when = datetime(2026, 11, 21, 6, 0, tzinfo=UTC)
    value = {"content": text, "n": 12, "ok": True, "none": None, "list": [1, "a"]}
    stdlib = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    assert assistant_protocol.sse_json(value) == sse.encode_event(stdlib).encode()
    tail = protocol.notification_tail(text, text, "/u", "info", when, read=False)
    fields = {"title": text, "body": text, "url": "/u", "level": "info"}
    expected = json.dumps(
        {**fields, "created_at": when.isoformat(), "read": False},
        ensure_ascii=False,
        separators=(",", ":"),
    )
    assert tail == expected.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")[1:]
