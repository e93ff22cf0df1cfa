"""Unit tests of the assistant's wire formats: SSE encoding and the stream request body."""

from __future__ import annotations

import json
from typing import Any

import pytest

from chat.assistant import protocol as ap
from realtime_kit import sse

LIMITS = ap.RequestLimits(max_bytes=500, max_messages=3, max_content_chars=20)


def parse(body: object, content_type: str = "application/json") -> list[Any]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return list(ap.parse_stream_request(raw, content_type, LIMITS))


def test_sse_data_event_and_done() -> None:
    assert ap.sse_json({"content": "hé"}) == 'data: {"content":"hé"}\n\n'.encode()
    assert ap.SSE_DONE == b"data: [DONE]\n\n"


def test_sse_error_event_and_multiline_data() -> None:
    assert ap.sse_json({"code": "x"}, event="error") == b'event: error\ndata: {"code":"x"}\n\n'
    assert sse.encode_event("a\nb\r\nc") == "data: a\ndata: b\ndata: c\n\n"
    # A lone CR also ends a line: it must not smuggle a field into the event.
    assert sse.encode_event("a\revent: x") == "data: a\ndata: event: x\n\n"


def test_sse_field_values_cannot_break_lines() -> None:
    assert sse.encode_event("x", event="err\nor\0") == "event: error\ndata: x\n\n"
    # Each line of a comment stays a comment line: none can start a field.
    assert ap.sse_comment("keep\nalive") == b": keep\n: alive\n\n"


def test_json_content_with_newlines_stays_one_data_line() -> None:
    encoded = ap.sse_json({"content": "line1\nline2"})
    assert encoded.count(b"\n") == 2
    assert json.loads(encoded.decode()[len("data: ") :]) == {"content": "line1\nline2"}


def test_valid_request() -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": ""},
    ]
    assert parse({"messages": messages}) == messages


@pytest.mark.parametrize(
    ("body", "content_type", "code"),
    [
        ({"messages": [{"role": "user", "content": "hi"}]}, "text/plain", ap.BAD_CONTENT_TYPE),
        ({"messages": [{"role": "user", "content": "hi"}]}, "", ap.BAD_CONTENT_TYPE),
        (b"{not json", "application/json", ap.BAD_JSON),
        (b"", "application/json", ap.BAD_JSON),
        (b"x" * 501, "application/json", ap.TOO_LARGE),
        ([], "application/json", ap.BAD_REQUEST),
        ({"messages": "hi"}, "application/json", ap.BAD_REQUEST),
        ({"messages": []}, "application/json", ap.BAD_REQUEST),
        (
            {"messages": [{"role": "user", "content": "x"}] * 4},
            "application/json",
            ap.TOO_MANY_MESSAGES,
        ),
        ({"messages": [{"role": "tool", "content": "x"}]}, "application/json", ap.BAD_REQUEST),
        ({"messages": [{"role": "user", "content": 5}]}, "application/json", ap.BAD_REQUEST),
        ({"messages": [{"role": "user", "content": None}]}, "application/json", ap.BAD_REQUEST),
        ({"messages": [{"role": "user"}]}, "application/json", ap.BAD_REQUEST),
        (
            {"messages": [{"role": "user", "content": "x", "name": "n"}]},
            "application/json",
            ap.BAD_REQUEST,
        ),
        ({"messages": ["hi"]}, "application/json", ap.BAD_REQUEST),
        ({"messages": [{"role": "user", "content": "x" * 21}]}, "application/json", ap.TOO_LONG),
    ],
)
def test_bad_requests(body: object, content_type: str, code: str) -> None:
    with pytest.raises(ap.BadRequest) as info:
        parse(body, content_type)
    assert info.value.code == code
    assert info.value.message


@pytest.mark.parametrize("content", ["\ud800", "a\udfffb", "\ude00\ud83d", "x" * 5 + "\udbff"])
def test_lone_surrogates_are_refused(content: str) -> None:
    # JSON's \uXXXX escapes can spell half a pair; such a string cannot be encoded as UTF-8,
    # so it would abort the reply stream (or the upstream request) mid-way.
    with pytest.raises(ap.BadRequest) as info:
        parse({"messages": [{"role": "user", "content": content}]})
    assert info.value.code == ap.BAD_REQUEST
    assert "messages[0].content" in info.value.message
    # A whole pair, escaped, is one character and passes.
    pair = b'{"messages": [{"role": "user", "content": "\\ud83d\\ude00"}]}'
    assert parse(pair)[0]["content"] == "\U0001f600"
