"""Frame encodings side by side: bytes on the wire and CPU per frame, JSON vs MessagePack, and
the JSON encoder (stdlib vs orjson vs msgspec when importable), on frames shaped like the real
ones, then per row of an export page (NDJSON: one frame per line).

    .venv/bin/python -m bench.encoding [--quick]
    PYTHONPATH=<folder with msgspec> .venv/bin/python -m bench.encoding   # msgspec is not a
                                                                            # dependency

Prints a table and ratios against stdlib JSON, measured in this invocation. The server's cost
per *recipient* does not depend on the format (each frame is encoded once per format, and the
same bytes go to every socket of that format); what differs is bytes on the wire, the one-off
encoding per frame, and the client's decoding.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import msgpack
import orjson

try:
    import msgspec
except ImportError:  # not a dependency: compared only where installed
    msgspec = None


def frames() -> dict[str, dict[str, Any]]:
    user = {"id": 1234, "username": "alice.smith"}
    return {
        "message (60 chars)": {
            "type": "message",
            "seq": 123456,
            "id": 987654,
            "room": "general",
            "user": user,
            "text": "Are we still meeting at three? I moved the notes to the doc.",
            "client_id": "6f1c2b0e-8d4a-4b7e-9c3d-2a1b0c9d8e7f",
            "created_at": "2026-12-01T23:59:01.123456+00:00",
        },
        "message (4,000 chars, non-ASCII)": {
            "type": "message",
            "seq": 123457,
            "id": 987655,
            "room": "general",
            "user": user,
            "text": "Grüße aus München, 東京 ✓ " * 160,
            "client_id": None,
            "created_at": "2026-12-01T23:59:02.123456+00:00",
        },
        "typing": {"type": "typing", "user": user, "active": True},
        "presence_diff": {
            "type": "presence_diff",
            "joins": [{"id": n, "username": f"user{n}"} for n in range(5)],
            "leaves": [],
        },
        "ack": {"type": "ack", "client_id": "6f1c2b0e-8d4a-4b7e-9c3d-2a1b0c9d8e7f", "seq": 123456},
        "SSE assistant delta": {"content": " the meeting"},
    }


def export_page(rows: int = 3000) -> list[dict[str, Any]]:
    """Message frames like bench/export.py's rows (about 130 characters of text)."""
    pad = "lorem ipsum dolor sit amet, consectetur adipiscing elit " * 2
    users = [{"id": n, "username": name} for n, name in enumerate(["alice", "bob", "carol"])]
    return [
        {
            "type": "message",
            "seq": s,
            "id": s + 7,
            "room": "lobby",
            "user": users[s % 3],
            "text": f"message {s}: {pad}",
            "client_id": f"c{s}" if s % 2 else None,
            "created_at": "2026-12-01T23:59:01.123456+00:00",
        }
        for s in range(rows)
    ]


def export_lines(repeat: int, rounds: int) -> None:
    """µs per row to encode one export page as NDJSON, each encoder in its fastest form."""
    page = export_page()
    encoders: dict[str, Callable[[], bytes]] = {
        "stdlib json.dumps per row": lambda: "".join(
            [json.dumps(f, ensure_ascii=False, separators=(",", ":")) + "\n" for f in page]
        ).encode(),
        "orjson per row, APPEND_NEWLINE": lambda: b"".join(
            [orjson.dumps(f, option=orjson.OPT_APPEND_NEWLINE) for f in page]
        ),
    }
    if msgspec is not None:
        encoder = msgspec.json.Encoder()
        encoders["msgspec Encoder.encode_lines"] = lambda: encoder.encode_lines(page)
    outputs = {name: fn() for name, fn in encoders.items()}
    assert len(set(outputs.values())) == 1, "the encoders disagree on the bytes"
    print(f"\nexport page of {len(page)} message frames as NDJSON (same bytes from each):")
    for name, fn in encoders.items():
        per_row = per_call_us(fn, max(1, repeat // 1000), rounds) / len(page)
        print(f"  {name:34} {per_row:6.3f} µs/row")


def per_call_us(fn: Callable[[], Any], repeat: int, rounds: int) -> float:
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeat):
            fn()
        samples.append((time.perf_counter() - start) / repeat * 1e6)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    repeat, rounds = (2000, 3) if args.quick else (20000, 7)
    print(
        f"{'frame':34} {'JSON B':>7} {'msgpack B':>9} {'ratio':>6}   "
        f"{'json µs':>8} {'orjson µs':>9} {'msgspec µs':>10} {'msgpack µs':>10} "
        f"{'decode json':>11} {'decode mp':>9}"
    )
    for name, frame in frames().items():
        text = json.dumps(frame, ensure_ascii=False, separators=(",", ":"))
        data = msgpack.packb(frame, use_bin_type=True)
        json_bytes = len(text.encode("utf-8"))

        def stdlib(f: dict[str, Any] = frame) -> str:
            return json.dumps(f, ensure_ascii=False, separators=(",", ":"))

        def fast(f: dict[str, Any] = frame) -> str:
            return orjson.dumps(f).decode()

        def spec(f: dict[str, Any] = frame) -> str:
            return msgspec.json.encode(f).decode()

        if msgspec is not None:
            assert spec() == fast() == stdlib(), "the JSON encoders disagree on the bytes"

        def binary(f: dict[str, Any] = frame) -> bytes:
            return msgpack.packb(f, use_bin_type=True)

        def load_json(t: str = text) -> Any:
            return json.loads(t)

        def load_msgpack(d: bytes = data) -> Any:
            return msgpack.unpackb(d)

        enc_json = per_call_us(stdlib, repeat, rounds)
        enc_or = per_call_us(fast, repeat, rounds)
        enc_spec = per_call_us(spec, repeat, rounds) if msgspec is not None else float("nan")
        enc_mp = per_call_us(binary, repeat, rounds)
        dec_json = per_call_us(load_json, repeat, rounds)
        dec_mp = per_call_us(load_msgpack, repeat, rounds)
        print(
            f"{name:34} {json_bytes:7d} {len(data):9d} {len(data) / json_bytes:6.2f}   "
            f"{enc_json:8.2f} {enc_or:9.2f} {enc_spec:10.2f} {enc_mp:10.2f} {dec_json:11.2f} "
            f"{dec_mp:9.2f}"
        )
    export_lines(repeat, rounds)


if __name__ == "__main__":
    main()
