"""Wire formats of the assistant: the stream endpoint's request body and events, the room frames.

Pure: no database, no settings, no I/O; limits are passed in. docs/protocol.md ("Assistant")
describes the same shapes for client authors; tests/test_assistant_protocol.py pins them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, cast

import orjson

from realtime_kit import sse

from ..llm.base import ROLES, ChatMessage

# --- the stream endpoint's Server-Sent Events (UTF-8 bytes, as the view sends them) -----------

SSE_DONE = sse.encode_event("[DONE]").encode()  # b"data: [DONE]\n\n": the reply is complete


def sse_json(obj: Any, event: str | None = None) -> bytes:
    """Encode ``obj`` as the JSON data of one event (JSON text is always one line).

    orjson, as for WebSocket frames (docs/benchmarks.md, "Frame encodings"): the stdlib's
    compact output, byte for byte, for a fraction of the CPU.
    """
    return sse.encode_event(orjson.dumps(obj).decode("utf-8"), event).encode()


def sse_comment(text: str = "") -> bytes:
    return sse.encode_comment(text).encode()


# Codes of the endpoint's 400 answers: {"error": {"code": ..., "message": ...}}.
BAD_CONTENT_TYPE = "bad_content_type"
BAD_JSON = "bad_json"
BAD_REQUEST = "bad_request"
TOO_LARGE = "too_large"
TOO_MANY_MESSAGES = "too_many_messages"
TOO_LONG = "too_long"


@dataclass(frozen=True)
class RequestLimits:
    max_bytes: int
    max_messages: int
    max_content_chars: int


class BadRequest(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def parse_stream_request(
    body: bytes, content_type: str, limits: RequestLimits
) -> list[ChatMessage]:
    """Validate a stream request body; return its messages or raise BadRequest."""
    if content_type != "application/json":
        raise BadRequest(BAD_CONTENT_TYPE, "Send the body as application/json.")
    if len(body) > limits.max_bytes:
        raise BadRequest(TOO_LARGE, f"The body is limited to {limits.max_bytes} bytes.")
    try:
        decoded = json.loads(body)
    except (ValueError, RecursionError):
        raise BadRequest(BAD_JSON, "The body is not valid JSON.") from None
    if not isinstance(decoded, dict) or not isinstance(decoded.get("messages"), list):
        raise BadRequest(BAD_REQUEST, 'The body must be an object with a "messages" array.')
    items = decoded["messages"]
    if not items:
        raise BadRequest(BAD_REQUEST, "messages must not be empty.")
    if len(items) > limits.max_messages:
        raise BadRequest(TOO_MANY_MESSAGES, f"At most {limits.max_messages} messages.")
    return [_parse_message(index, item, limits) for index, item in enumerate(items)]


def _parse_message(index: int, item: Any, limits: RequestLimits) -> ChatMessage:
    where = f"messages[{index}]"
    if not isinstance(item, dict) or set(item) != {"role", "content"}:
        raise BadRequest(BAD_REQUEST, f'{where} must be an object with "role" and "content".')
    role, content = item["role"], item["content"]
    if role not in ROLES:
        raise BadRequest(BAD_REQUEST, f"{where}.role must be one of {', '.join(ROLES)}.")
    if not isinstance(content, str):
        raise BadRequest(BAD_REQUEST, f"{where}.content must be a string.")
    if not _is_utf8_encodable(content):
        raise BadRequest(
            BAD_REQUEST, f"{where}.content holds half a surrogate pair (invalid Unicode)."
        )
    if len(content) > limits.max_content_chars:
        raise BadRequest(
            TOO_LONG, f"{where}.content is longer than {limits.max_content_chars} characters."
        )
    return ChatMessage(role=cast(Any, role), content=content)


def _is_utf8_encodable(text: str) -> bool:
    # JSON's \uXXXX escapes can spell a lone surrogate, which no UTF-8 writer accepts: it
    # would abort the reply stream (or the upstream request) after the 200 went out.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# --- room frames (WebSocket, see docs/protocol.md "Assistant") -----------------------------

# Error codes of {"type": "error"} frames answering an assistant request or stop.
ASSISTANT_BUSY = "assistant_busy"
ASSISTANT_FORBIDDEN = "assistant_forbidden"
REPLY_TOO_LONG = "reply_too_long"

# How a reply ended: assistant.end "status"; Message.status stores "" for done.
DONE = "done"
STOPPED = "stopped"  # a member (the requester or staff) stopped it
ERROR = "error"
# The server restarted mid-reply (realtime_kit.drain): the partial text is stored, and the
# panel endpoint ends its stream with an error event of this code. Asking again works.
INTERRUPTED = "interrupted"


def start_frame(
    *,
    stream_id: str,
    room_slug: str,
    user: dict[str, Any],
    requested_by: dict[str, Any],
    request_seq: int,
    demo: bool,
    text: str = "",
    next_index: int = 0,
) -> dict[str, Any]:
    """A reply started; sent again, with the text so far, to a member who joins mid-reply."""
    return {
        "type": "assistant.start",
        "stream_id": stream_id,
        "room": room_slug,
        "user": user,
        "requested_by": requested_by,
        "request_seq": request_seq,
        "demo": demo,
        "text": text,
        "next_index": next_index,
    }


def delta_frame(stream_id: str, index: int, content: str) -> dict[str, Any]:
    """The next piece of a reply; ``index`` counts the deltas of the stream from 0."""
    return {"type": "assistant.delta", "stream_id": stream_id, "index": index, "content": content}


def end_frame(
    stream_id: str, status: str, seq: int | None, error: tuple[str, str] | None = None
) -> dict[str, Any]:
    """The reply ended; ``seq`` is its stored message (None when nothing was stored)."""
    return {
        "type": "assistant.end",
        "stream_id": stream_id,
        "status": status,
        "seq": seq,
        "error": {"code": error[0], "message": error[1]} if error else None,
    }
