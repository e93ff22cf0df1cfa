"""Server-Sent Events wire encoding (WHATWG HTML, "server-sent events"). Pure: strings in and out.

The one encoder of both apps (notifications' stream, chat's assistant panel); each encodes the
text to UTF-8 where it writes it.

An event is a block of ``field: value`` lines ended by a blank line. A value must not contain a
line break (CR, LF or CRLF all end a line), so ``event`` and ``id`` are sanitised and ``data``
is split into one ``data:`` line per line of text, which the client joins back with ``\\n``.
A NUL in ``id`` makes browsers ignore the field, so it is removed too. An empty ``event`` is
left out: clients dispatch both as ``message``.
"""

from __future__ import annotations

import re

_UNSAFE = re.compile(r"[\r\n\x00]")
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def _clean(value: str) -> str:
    return _UNSAFE.sub("", value)


def encode_event(data: str, event: str | None = None, event_id: str | int | None = None) -> str:
    """Encode one event; ``data`` may span several lines."""
    lines: list[str] = []
    if event_id is not None:
        lines.append(f"id: {_clean(str(event_id))}")
    if event:
        lines.append(f"event: {_clean(event)}")
    lines.extend(f"data: {line}" for line in _LINE_BREAK.split(data))
    return "\n".join(lines) + "\n\n"


def encode_comment(text: str = "") -> str:
    """Encode a comment (ignored by clients; keeps proxies from closing an idle stream)."""
    return "".join(f": {line}\n" if line else ":\n" for line in _LINE_BREAK.split(text)) + "\n"


def encode_retry(milliseconds: int) -> str:
    """Encode the reconnection delay clients use after the stream drops."""
    return f"retry: {max(int(milliseconds), 0)}\n\n"
