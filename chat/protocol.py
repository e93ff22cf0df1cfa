"""The chat WebSocket wire format: parsing client frames and encoding server frames.

Pure: no database, no settings, no I/O. Limits are passed in. docs/protocol.md describes the
same frames for client authors; tests/test_protocol.py pins their shapes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import msgpack
import orjson

# Error codes sent in {"type": "error", "code": ...}.
BAD_JSON = "bad_json"
BAD_FRAME = "bad_frame"
TOO_LONG = "too_long"
TOO_LARGE = "too_large"
RATE_LIMITED = "rate_limited"
UNAVAILABLE = "unavailable"
# Edits and deletes: not the author (nor staff), or no such message (or already deleted).
FORBIDDEN = "forbidden"
NOT_FOUND = "not_found"

# WebSocket close codes (4000-4999 are for applications). Clients must not reconnect on 44xx.
CLOSE_UNAUTHENTICATED = 4401
CLOSE_FORBIDDEN = 4403
CLOSE_NOT_FOUND = 4404
# Too many sockets of this user (all tabs and processes): reconnecting would hit it again.
CLOSE_TOO_MANY_SOCKETS = 4429
# Reconnect (with backoff) and resume by seq: this socket fell behind what it was sent, more
# than its outbound byte bound (Centrifugo's 3008 "slow", in our 40xx "retry" range).
CLOSE_SLOW_CONSUMER = 4008
# An unexpected server error on this socket (what daphne sends when a handler raises).
CLOSE_INTERNAL_ERROR = 1011
# The server is restarting (drain on deploy): reconnect with jitter and resume.
CLOSE_SERVICE_RESTART = 1012
# The server cannot serve this socket now (its database is down): reconnect later.
CLOSE_TRY_AGAIN = 1013

# Channel-layer event types ("type" of group messages; dots become handler names).
EVENT_MESSAGE = "chat.message"
EVENT_TYPING = "chat.typing"
EVENT_READ = "chat.read"
EVENT_UPDATE = "chat.message_update"
EVENT_ASSISTANT = "assistant.frame"
EVENT_REVOKE = "chat.revoke"
EVENT_RECHECK = "chat.recheck"
# Several events of one room in one layer message (``events``, in order): a group commit's
# messages, sent as few layer messages as their bound allows (services.abroadcast_many).
EVENT_BATCH = "chat.events"
# A room's presence changed: each process's presence hub re-reads the store (presence_hub.py).
EVENT_PRESENCE_CHANGED = "presence.changed"
# To a running reply's control channel (assistant/replies.py): stop it, or snapshot it to a
# socket that joined mid-reply. Not the client's ``assistant.stop`` frame, whose name it shares.
EVENT_ASSISTANT_STOP = "assistant.stop"
EVENT_ASSISTANT_SNAPSHOT = "assistant.snapshot"

MAX_CLIENT_ID_LENGTH = 64
# Largest seq or update_seq (a PostgreSQL bigint).
MAX_SEQ = 2**63 - 1
# Opt-in binary encoding (Sec-WebSocket-Protocol); without it frames are JSON text.
SUBPROTOCOL_MSGPACK = "chat.v1.msgpack"
# A message frame without its text, worst case: a 150-character username and a 64-character
# client_id of escaped control characters (6 bytes each), the room slug, ids and dates.
MESSAGE_OVERHEAD_BYTES = 2048
# Assistant stream ids become channel-layer group names: keep them to safe characters.
_STREAM_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True)
class Limits:
    max_text_length: int
    max_frame_bytes: int
    max_frames_per_message: int
    # The text as it travels in a frame: UTF-8 with JSON escapes ("\u0001" is 6 bytes).
    max_text_bytes: int = 16 * 1024


@dataclass(frozen=True)
class SendMessage:
    text: str
    client_id: str


@dataclass(frozen=True)
class Ping:
    pass


@dataclass(frozen=True)
class Resume:
    after: int
    # The highest update_seq the client has seen; None: replay no updates (older clients).
    after_update: int | None = None


@dataclass(frozen=True)
class Edit:
    seq: int
    text: str


@dataclass(frozen=True)
class Delete:
    seq: int


@dataclass(frozen=True)
class FrameError:
    code: str
    message: str
    client_id: str | None = None
    # The message an edit or delete was about, echoed in the error frame.
    seq: int | None = None


@dataclass(frozen=True)
class Typing:
    active: bool


@dataclass(frozen=True)
class Read:
    seq: int


@dataclass(frozen=True)
class AssistantStop:
    stream_id: str


ClientFrame = SendMessage | Ping | Resume | Typing | Read | AssistantStop | Edit | Delete


class ProtocolError(Exception):
    """The whole WebSocket message is unusable (not JSON, too large, wrong top-level shape)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _storable(value: str) -> bool:
    """False for strings no database can store: NUL (PostgreSQL text), lone surrogates.

    JSON escapes such as "\\ud800" decode to surrogates that are not valid UTF-8.
    """
    if "\x00" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _parse_message(obj: dict[str, Any], limits: Limits) -> SendMessage | FrameError:
    client_id = obj.get("client_id", "")
    if client_id is None:
        client_id = ""
    if not isinstance(client_id, str):
        return FrameError(BAD_FRAME, "client_id must be a string.")
    if len(client_id) > MAX_CLIENT_ID_LENGTH:
        return FrameError(BAD_FRAME, f"client_id is longer than {MAX_CLIENT_ID_LENGTH} characters.")
    if not _storable(client_id):
        return FrameError(BAD_FRAME, "client_id must be valid Unicode text without NUL.")
    if client_id.startswith(ASSISTANT_CLIENT_ID_PREFIX):
        return FrameError(
            BAD_FRAME,
            f"client_ids starting with {ASSISTANT_CLIENT_ID_PREFIX!r} are the assistant's.",
        )
    cid = client_id or None
    text = obj.get("text")
    if not isinstance(text, str):
        return FrameError(BAD_FRAME, "text must be a string.", cid)
    problem = _text_problem(text, limits)
    if problem is not None:
        return FrameError(problem[0], problem[1], cid)
    return SendMessage(text=text, client_id=client_id)


def _text_problem(text: str, limits: Limits) -> tuple[str, str] | None:
    """(code, message) when ``text`` may not be stored as a message text, else None."""
    if not text.strip():
        return BAD_FRAME, "text must not be empty."
    if len(text) > limits.max_text_length:
        return TOO_LONG, f"text is longer than {limits.max_text_length} characters."
    if not _storable(text):
        return BAD_FRAME, "text must be valid Unicode text without NUL."
    if encoded_text_bytes(text) > limits.max_text_bytes:
        return TOO_LONG, f"text is larger than {limits.max_text_bytes} bytes once encoded."
    return None


def _seq_field(obj: dict[str, Any], name: str, minimum: int) -> int | None:
    value = obj.get(name)
    # bool is a subclass of int, but true is not a sequence number.
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        return None
    return value


def _parse_edit(obj: dict[str, Any], limits: Limits) -> Edit | FrameError:
    seq = _seq_field(obj, "seq", 1)
    if seq is None:
        return FrameError(BAD_FRAME, "seq must be a positive integer.")
    text = obj.get("text")
    if not isinstance(text, str):
        return FrameError(BAD_FRAME, "text must be a string.", seq=seq)
    problem = _text_problem(text, limits)
    if problem is not None:
        return FrameError(problem[0], problem[1], seq=seq)
    return Edit(seq=seq, text=text)


def _parse_delete(obj: dict[str, Any]) -> Delete | FrameError:
    seq = _seq_field(obj, "seq", 1)
    if seq is None:
        return FrameError(BAD_FRAME, "seq must be a positive integer.")
    return Delete(seq=seq)


def _parse_resume(obj: dict[str, Any]) -> Resume | FrameError:
    after = _seq_field(obj, "after", 0)
    if after is None:
        return FrameError(BAD_FRAME, "after must be a non-negative integer.")
    if obj.get("after_update") is None:
        return Resume(after=after)
    after_update = _seq_field(obj, "after_update", 0)
    if after_update is None:
        return FrameError(BAD_FRAME, "after_update must be a non-negative integer.")
    return Resume(after=after, after_update=after_update)


def _parse_typing(obj: dict[str, Any]) -> Typing | FrameError:
    active = obj.get("active")
    if not isinstance(active, bool):
        return FrameError(BAD_FRAME, "active must be true or false.")
    return Typing(active=active)


def _parse_read(obj: dict[str, Any]) -> Read | FrameError:
    seq = obj.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        return FrameError(BAD_FRAME, "seq must be a non-negative integer.")
    return Read(seq=seq)


def _parse_assistant_stop(obj: dict[str, Any]) -> AssistantStop | FrameError:
    stream_id = obj.get("stream_id")
    if not isinstance(stream_id, str) or not _STREAM_ID.fullmatch(stream_id):
        return FrameError(BAD_FRAME, "stream_id must be the id of an assistant reply.")
    return AssistantStop(stream_id=stream_id)


def parse_frame(obj: Any, limits: Limits) -> ClientFrame | FrameError:
    """Validate one decoded client frame against the allowlist of frame types."""
    if not isinstance(obj, dict):
        return FrameError(BAD_FRAME, "A frame must be a JSON object.")
    frame_type = obj.get("type")
    if frame_type == "message":
        return _parse_message(obj, limits)
    if frame_type == "ping":
        return Ping()
    if frame_type == "resume":
        return _parse_resume(obj)
    if frame_type == "typing":
        return _parse_typing(obj)
    if frame_type == "read":
        return _parse_read(obj)
    if frame_type == "assistant.stop":
        return _parse_assistant_stop(obj)
    if frame_type == "edit":
        return _parse_edit(obj, limits)
    if frame_type == "delete":
        return _parse_delete(obj)
    if not isinstance(frame_type, str):
        return FrameError(BAD_FRAME, "A frame needs a string 'type'.")
    return FrameError(BAD_FRAME, f"Unknown frame type {frame_type[:40]!r}.")


def parse_client_text(text: str, limits: Limits) -> list[ClientFrame | FrameError]:
    """Decode one WebSocket text message into frames (an object, or an array of objects)."""
    if len(text.encode("utf-8")) > limits.max_frame_bytes:
        raise ProtocolError(TOO_LARGE, f"Messages are limited to {limits.max_frame_bytes} bytes.")
    try:
        decoded = json.loads(text)
    except (ValueError, RecursionError):
        raise ProtocolError(BAD_JSON, "The message is not valid JSON.") from None
    return _parse_decoded(decoded, limits)


def parse_client_msgpack(data: bytes, limits: Limits) -> list[ClientFrame | FrameError]:
    """Decode one binary message of the MessagePack subprotocol into frames."""
    if len(data) > limits.max_frame_bytes:
        raise ProtocolError(TOO_LARGE, f"Messages are limited to {limits.max_frame_bytes} bytes.")
    try:
        # raw=False: strings must be valid UTF-8; map keys must be strings or numbers.
        decoded = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception:  # msgpack raises several types (ExtraData, ValueError, ...)
        raise ProtocolError(BAD_JSON, "The message is not valid MessagePack.") from None
    return _parse_decoded(decoded, limits)


def _parse_decoded(decoded: Any, limits: Limits) -> list[ClientFrame | FrameError]:
    if isinstance(decoded, list):
        if not decoded:
            raise ProtocolError(BAD_FRAME, "An array of frames must not be empty.")
        if len(decoded) > limits.max_frames_per_message:
            raise ProtocolError(
                BAD_FRAME, f"At most {limits.max_frames_per_message} frames per message."
            )
        return [parse_frame(item, limits) for item in decoded]
    return [parse_frame(decoded, limits)]


# --- server frames ---------------------------------------------------------------------


class UserLike(Protocol):
    @property
    def pk(self) -> Any: ...
    def get_username(self) -> str: ...


class MessageLike(Protocol):
    @property
    def id(self) -> Any: ...
    @property
    def seq(self) -> int: ...
    @property
    def text(self) -> str: ...
    @property
    def client_id(self) -> str: ...
    @property
    def created_at(self) -> datetime: ...


class ChangeLike(Protocol):
    """A message as its changes are described (``chat.models.Message``)."""

    @property
    def seq(self) -> int: ...
    @property
    def text(self) -> str: ...
    @property
    def edited_at(self) -> datetime | None: ...
    @property
    def deleted(self) -> bool: ...
    @property
    def update_seq(self) -> int: ...


def user_frame(user: UserLike) -> dict[str, Any]:
    # get_username() honours custom user models whose USERNAME_FIELD is not "username".
    return {"id": user.pk, "username": user.get_username()}


# Assistant replies are stored with their stream id as client_id; people may not send one
# with this prefix, so a stored message with DEMO_REPLY_CLIENT_ID_PREFIX is a reply of the
# demo backend, and keeps its "demo" mark (a flag in its frame) after a reload.
ASSISTANT_CLIENT_ID_PREFIX = "asst-"
DEMO_REPLY_CLIENT_ID_PREFIX = "asst-demo-"


def message_frame(message: MessageLike, room_slug: str, user: UserLike) -> dict[str, Any]:
    frame: dict[str, Any] = {
        "type": "message",
        "seq": message.seq,
        "id": message.id,
        "room": room_slug,
        "user": user_frame(user),
        "text": message.text,
        "client_id": message.client_id or None,
        "created_at": message.created_at.isoformat(),
    }
    # Only assistant replies that did not complete carry a status ("stopped", "error",
    # "interrupted").
    status = getattr(message, "status", "")
    if status:
        frame["status"] = status
    if (message.client_id or "").startswith(DEMO_REPLY_CLIENT_ID_PREFIX):
        frame["demo"] = True
    # Only messages changed since they were sent carry their change (edited or deleted):
    # the frame then shows the current text, and update_seq says which change that is.
    update_seq = getattr(message, "update_seq", 0)
    if update_seq:
        frame.update(_change_fields(message))
    return frame


def _change_fields(message: Any) -> dict[str, Any]:
    edited_at = message.edited_at
    return {
        "edited_at": edited_at.isoformat() if edited_at is not None else None,
        "deleted": bool(message.deleted),
        "update_seq": message.update_seq,
    }


def message_update_frame(message: ChangeLike) -> dict[str, Any]:
    """The change of a message (edit or delete) as every socket of the room gets it."""
    return {
        "type": "message_update",
        "seq": message.seq,
        "text": "" if message.deleted else message.text,
        **_change_fields(message),
    }


def message_update_encoded(message: ChangeLike, max_bytes: int) -> Encoded:
    """``message_update`` encoded once, cut to ``max_bytes`` like ``message_encoded``."""
    frame = message_update_frame(message)
    enc = Encoded.of(frame)
    if enc.size <= max_bytes:
        return enc
    frame["truncated"] = True
    room = max(0, max_bytes - (enc.size - encoded_text_bytes(frame["text"])) - 32)
    frame["text"] = text_within(frame["text"], room)
    return Encoded.of(frame)


def message_encoded(
    message: MessageLike, room_slug: str, user: UserLike, max_bytes: int
) -> Encoded:
    """The message frame encoded once, within ``max_bytes`` whatever was stored.

    Rows stored before a byte limit existed (or by other code) may not fit one WebSocket
    message: their text is cut to fit, and the frame says ``"truncated": true``.
    """
    frame = message_frame(message, room_slug, user)
    enc = Encoded.of(frame)
    if enc.size <= max_bytes:
        return enc
    frame["truncated"] = True
    room = max(0, max_bytes - (enc.size - encoded_text_bytes(message.text)) - 32)
    frame["text"] = text_within(message.text, room)
    return Encoded.of(frame)


def hello_frame(
    room_slug: str, user: UserLike, last_seq: int, last_update_seq: int = 0
) -> dict[str, Any]:
    return {
        "type": "hello",
        "room": room_slug,
        "user": user_frame(user),
        "last_seq": last_seq,
        "last_update_seq": last_update_seq,
    }


def ack_frame(client_id: str, seq: int) -> dict[str, Any]:
    return {"type": "ack", "client_id": client_id or None, "seq": seq}


def pong_frame(last_seq: int, last_update_seq: int = 0) -> dict[str, Any]:
    # Carrying the room's last seq lets a client notice a broadcast it never got (the Redis
    # layer delivers at most once) and ask to resume, even when no later message comes.
    # last_update_seq is this socket's own: every change up to it reached the client before
    # the pong, so a client may resume from it (the server recovers lost changes itself).
    return {"type": "pong", "last_seq": last_seq, "last_update_seq": last_update_seq}


def error_frame(
    code: str, message: str, client_id: str | None = None, seq: int | None = None
) -> dict[str, Any]:
    frame: dict[str, Any] = {"type": "error", "code": code, "message": message}
    if client_id:
        frame["client_id"] = client_id
    if seq is not None:
        frame["seq"] = seq
    return frame


class PresenceLike(Protocol):
    @property
    def id(self) -> int: ...
    @property
    def username(self) -> str: ...
    @property
    def connections(self) -> int: ...


def presence_state_frame(users: Sequence[PresenceLike]) -> dict[str, Any]:
    ordered = sorted(users, key=lambda u: (u.username, u.id))
    return {
        "type": "presence_state",
        "users": [
            {"id": u.id, "username": u.username, "connections": u.connections} for u in ordered
        ],
    }


def presence_diff_frame(
    joins: Sequence[PresenceLike], leaves: Sequence[PresenceLike]
) -> dict[str, Any]:
    return {
        "type": "presence_diff",
        "joins": [{"id": u.id, "username": u.username} for u in joins],
        "leaves": [{"id": u.id, "username": u.username} for u in leaves],
    }


def typing_frame(user: UserLike, active: bool) -> dict[str, Any]:
    return {"type": "typing", "user": user_frame(user), "active": active}


def read_frame(user_id: int, username: str, seq: int) -> dict[str, Any]:
    return {"type": "read", "user": {"id": user_id, "username": username}, "seq": seq}


def encode(frames: dict[str, Any] | list[dict[str, Any]]) -> str:
    """Serialise one frame, or a batch of frames, to the text of one WebSocket message.

    orjson, chosen on evidence (bench/encoding.py): 10-17x faster than the stdlib for our
    frames, same compact output (UTF-8 kept as is, minimal escapes).
    """
    return orjson.dumps(frames).decode("utf-8")


def encode_lines(frames: Iterable[dict[str, Any]]) -> bytes:
    """Each frame as ``encode`` makes it, in UTF-8, with ``\\n`` after each (NDJSON)."""
    return b"".join([orjson.dumps(frame, option=orjson.OPT_APPEND_NEWLINE) for frame in frames])


def encoded_text_bytes(text: str) -> int:
    """Bytes ``text`` takes inside an encoded frame: UTF-8, JSON escapes, without quotes."""
    return len(orjson.dumps(text)) - 2


def text_within(text: str, max_bytes: int) -> str:
    """The longest prefix of ``text`` that encodes to at most ``max_bytes`` in a frame."""
    if encoded_text_bytes(text) <= max_bytes:
        return text
    low, high = 0, len(text)
    while low < high:  # binary search: encoded size grows with the prefix length
        mid = (low + high + 1) // 2
        if encoded_text_bytes(text[:mid]) <= max_bytes:
            low = mid
        else:
            high = mid - 1
    return text[:low]


@dataclass(eq=False)
class Encoded:
    """One frame encoded once for every recipient: its text and its size in UTF-8 bytes.

    Its MessagePack form (the ``chat.v1.msgpack`` subprotocol) is made on first use and kept,
    so each frame is encoded at most once per format, whatever the number of recipients.
    """

    text: str
    size: int
    _msgpack: bytes | None = None

    def msgpack(self) -> bytes:
        if self._msgpack is None:
            self._msgpack = msgpack.packb(json.loads(self.text), use_bin_type=True)
        return self._msgpack

    @classmethod
    def of(cls, frame: dict[str, Any]) -> Encoded:
        return cls.from_text(encode(frame))

    @classmethod
    def from_text(cls, text: str) -> Encoded:
        return cls(text, len(text.encode("utf-8")))


class FrameTooLarge(ValueError):
    """A single frame over the byte budget: the limits that should prevent it are wrong."""


def pack(frames: Sequence[Encoded], budget_bytes: int) -> list[str]:
    """Join frames into as few WebSocket messages as fit in ``budget_bytes`` each, in order.

    One frame goes out as itself, several as a JSON array (brackets and commas counted). A
    message over the server's size limit would close the socket (daphne: 1011), so no
    message may exceed the budget; a single frame that does raises FrameTooLarge.
    """
    messages: list[str] = []
    group: list[str] = []
    size = 0
    for frame in frames:
        if frame.size > budget_bytes:
            raise FrameTooLarge(f"A {frame.size}-byte frame exceeds {budget_bytes} bytes.")
        # Joined as "[a,b]": one byte per frame for its comma or bracket, plus one.
        if group and size + frame.size + 1 + 1 > budget_bytes:
            messages.append(_join(group))
            group, size = [], 0
        group.append(frame.text)
        size += frame.size + 1
    if group:
        messages.append(_join(group))
    return messages


def _join(texts: list[str]) -> str:
    return texts[0] if len(texts) == 1 else "[" + ",".join(texts) + "]"


def _array_header(count: int) -> bytes:
    if count < 16:
        return bytes([0x90 | count])
    if count < 1 << 16:
        return b"\xdc" + count.to_bytes(2, "big")
    return b"\xdd" + count.to_bytes(4, "big")


# The largest MessagePack array header (0xdd and a 32-bit count).
_MAX_ARRAY_HEADER_BYTES = 5


def pack_msgpack(frames: Sequence[Encoded], budget_bytes: int) -> list[bytes]:
    """``pack`` for the MessagePack subprotocol: one map, or an array of maps, per message."""
    messages: list[bytes] = []
    group: list[bytes] = []
    size = _MAX_ARRAY_HEADER_BYTES
    for frame in frames:
        data = frame.msgpack()
        if len(data) + _MAX_ARRAY_HEADER_BYTES > budget_bytes:
            raise FrameTooLarge(f"A {len(data)}-byte frame exceeds {budget_bytes} bytes.")
        if group and size + len(data) > budget_bytes:
            messages.append(_join_msgpack(group))
            group, size = [], _MAX_ARRAY_HEADER_BYTES
        group.append(data)
        size += len(data)
    if group:
        messages.append(_join_msgpack(group))
    return messages


def _join_msgpack(items: list[bytes]) -> bytes:
    return items[0] if len(items) == 1 else _array_header(len(items)) + b"".join(items)


def presence_state_frames(users: Sequence[PresenceLike], budget_bytes: int) -> list[dict[str, Any]]:
    """``presence_state`` split into frames of at most ``budget_bytes``; all but the last
    carry ``"more": true`` (a client replaces its list on a first part, then appends)."""
    ordered = sorted(users, key=lambda u: (u.username, u.id))
    entries = [{"id": u.id, "username": u.username, "connections": u.connections} for u in ordered]
    parts = _split_entries(entries, budget_bytes)
    frames = [{"type": "presence_state", "users": part, "more": True} for part in parts]
    frames[-1]["more"] = False
    return frames


def read_state_frames(reads: list[tuple[int, str, int]], budget_bytes: int) -> list[dict[str, Any]]:
    """``read_state`` split into frames of at most ``budget_bytes`` (markers merge)."""
    entries = [{"user": {"id": uid, "username": name}, "seq": seq} for uid, name, seq in reads]
    return [{"type": "read_state", "reads": part} for part in _split_entries(entries, budget_bytes)]


# Room for the frame around a list of entries ({"type":"presence_state","users":[],...}).
_ENVELOPE_BYTES = 96


def _split_entries(entries: list[dict[str, Any]], budget_bytes: int) -> list[list[Any]]:
    parts: list[list[Any]] = [[]]
    size = _ENVELOPE_BYTES
    for entry in entries:
        entry_size = len(encode(entry).encode("utf-8")) + 1
        if parts[-1] and size + entry_size > budget_bytes:
            parts.append([])
            size = _ENVELOPE_BYTES
        parts[-1].append(entry)
        size += entry_size
    return parts
