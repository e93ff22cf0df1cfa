"""Server-Sent Events encoding (WHATWG HTML "server-sent events"). Pure: bytes in, bytes out."""

from __future__ import annotations

import re
from typing import Any

import orjson

DONE = b"data: [DONE]\n\n"
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def _field(value: str) -> str:
    # A field name or one-line value must not contain line breaks (or NUL, which browsers drop).
    return value.replace("\r", "").replace("\n", "").replace("\0", "")


def encode_event(data: str, event: str | None = None, event_id: str | None = None) -> bytes:
    """Encode one event; each line of ``data`` becomes its own ``data:`` line."""
    lines = []
    if event:
        lines.append(f"event: {_field(event)}")
    if event_id is not None:
        lines.append(f"id: {_field(event_id)}")
    # CR, LF and CRLF all end a line in SSE: each piece gets its own data: line.
    lines.extend(f"data: {line}" for line in _LINE_BREAK.split(data))
    return ("\n".join(lines) + "\n\n").encode("utf-8")


def encode_json(obj: Any, event: str | None = None) -> bytes:
    """Encode ``obj`` as the JSON data of one event (JSON text is always one line).

    orjson, as for WebSocket frames (docs/benchmarks.md, "Frame encodings"): the stdlib's
    compact output, byte for byte, for a fraction of the CPU.
    """
    return encode_event(orjson.dumps(obj).decode("utf-8"), event)


def comment(text: str = "") -> bytes:
    """A comment line: ignored by clients, keeps proxies and the connection busy."""
    return f": {_field(text)}\n\n".encode()
