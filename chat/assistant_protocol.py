"""Wire formats of the assistant: the stream endpoint's request body and the room frames.

Pure: no database, no settings, no I/O; limits are passed in. docs/protocol.md ("Assistant")
describes the same shapes for client authors; tests/test_assistant_protocol.py pins them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, cast

from .llm.base import ROLES, ChatMessage

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
    if len(content) > limits.max_content_chars:
        raise BadRequest(
            TOO_LONG, f"{where}.content is longer than {limits.max_content_chars} characters."
        )
    return ChatMessage(role=cast(Any, role), content=content)
