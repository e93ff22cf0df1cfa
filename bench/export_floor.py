"""The floor under an export in Python: read rows and encode them as NDJSON, nothing else.

No Django, no HTTP: a throwaway SQLite table shaped like ``chat_message`` (``--rows`` rows of
~130 characters, three authors, half with a client_id), read in keyset pages of 2,000 like
``chat.export``, each page encoded at once, two ways, alternating:

- ``python``: the sqlite3 module returns ten values per row, frames are dicts, orjson encodes;
- ``sql``: SQLite builds each line itself (``'{"type":"message","seq":' || seq || ...``,
  ``json_quote``), Python fetches one string per row and joins them;
- ``printf``: the same line from one ``printf()`` call per row (what ``chat.export`` does):
  the chain of ``||`` copies the growing line at every step.

Prints rows per CPU second (``time.process_time``) for each. docs/benchmarks.md ("Rows per CPU
second") quotes it.

    .venv/bin/python -m bench.export_floor [--rows 200000] [--reps 2]
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import string
import tempfile
import time
from pathlib import Path

import orjson

PAGE_ROWS = 2000
USERS = {1: "alice", 2: "bob", 3: "carol"}

PYTHON_PAGE = (
    "SELECT seq, id, text, client_id, created_at, status, edited_at, deleted, update_seq, "
    "user_id FROM m WHERE room_id = 1 AND seq > ? ORDER BY seq LIMIT ?"
)
# The three authors' user frames, as the export writes them (checked against orjson in main).
SQL_PAGE = (
    'SELECT seq, \'{"type":"message","seq":\' || seq || \',"id":\' || id || '
    '\',"room":"lobby","user":\' || (CASE user_id '
    'WHEN 1 THEN \'{"id":1,"username":"alice"}\' '
    'WHEN 2 THEN \'{"id":2,"username":"bob"}\' '
    'WHEN 3 THEN \'{"id":3,"username":"carol"}\' END) || '
    "',\"text\":' || json_quote(text) || ',\"client_id\":' || "
    "(CASE WHEN client_id = '' THEN 'null' ELSE json_quote(client_id) END) || "
    "',\"created_at\":\"' || substr(created_at, 1, 10) || 'T' || substr(created_at, 12) || "
    "'+00:00\"}' FROM m WHERE room_id = 1 AND seq > ? ORDER BY seq LIMIT ?"
)

PRINTF_PAGE = (
    'SELECT seq, printf(\'{"type":"message","seq":%d,"id":%d,"room":"lobby",'
    '"user":%s,"text":%s,"client_id":%s,"created_at":"%sT%s+00:00"}\', seq, id, '
    '(CASE user_id WHEN 1 THEN \'{"id":1,"username":"alice"}\' '
    'WHEN 2 THEN \'{"id":2,"username":"bob"}\' '
    'WHEN 3 THEN \'{"id":3,"username":"carol"}\' END), json_quote(text), '
    "(CASE WHEN client_id = '' THEN 'null' ELSE json_quote(client_id) END), "
    "substr(created_at, 1, 10), substr(created_at, 12)) "
    "FROM m WHERE room_id = 1 AND seq > ? ORDER BY seq LIMIT ?"
)


def seed(path: Path, rows: int) -> None:
    db = sqlite3.connect(path)
    db.execute(
        "CREATE TABLE m (id INTEGER PRIMARY KEY, room_id INT, seq INT, user_id INT, text TEXT, "
        "client_id TEXT, created_at TEXT, status TEXT, edited_at TEXT, deleted BOOL, "
        "update_seq INT)"
    )
    rnd = random.Random(1)
    words = ["".join(rnd.choices(string.ascii_lowercase, k=rnd.randint(2, 9))) for _ in range(500)]
    db.executemany(
        "INSERT INTO m VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            (i, 1, i, 1 + i % 3, " ".join(rnd.choices(words, k=20))[:130],
             f"c{i}" if i % 2 else "",
             f"2026-12-03 18:{i // 60 % 60:02d}:{i % 60:02d}.{i % 1_000_000:06d}",
             "", None, 0, 0)
            for i in range(1, rows + 1)
        ),
    )  # fmt: skip
    db.execute("CREATE UNIQUE INDEX m_room_seq ON m (room_id, seq)")
    db.commit()
    db.close()


def python_pages(db: sqlite3.Connection) -> int:
    users = {pk: {"id": pk, "username": name} for pk, name in USERS.items()}
    after = count = 0
    while rows := db.execute(PYTHON_PAGE, (after, PAGE_ROWS)).fetchall():
        frames = [
            {
                "type": "message", "seq": seq, "id": pk, "room": "lobby", "user": users[uid],
                "text": text, "client_id": client_id or None,
                "created_at": created[:10] + "T" + created[11:] + "+00:00",
            }
            for seq, pk, text, client_id, created, _, _, _, _, uid in rows
        ]  # fmt: skip
        b"\n".join(orjson.dumps(frame) for frame in frames)
        after, count = rows[-1][0], count + len(rows)
    return count


def sql_pages(db: sqlite3.Connection, query: str = SQL_PAGE) -> int:
    after = count = 0
    while rows := db.execute(query, (after, PAGE_ROWS)).fetchall():
        "\n".join(line for _, line in rows).encode()
        after, count = rows[-1][0], count + len(rows)
    return count


def printf_pages(db: sqlite3.Connection) -> int:
    return sql_pages(db, PRINTF_PAGE)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-export-floor-") as tmp:
        path = Path(tmp) / "floor.sqlite3"
        seed(path, args.rows)
        db = sqlite3.connect(path)
        # The two encodings must agree on the first page, or the comparison means nothing.
        first = db.execute(SQL_PAGE, (0, 3)).fetchall()
        for (_, line), frame in zip(first, db.execute(PYTHON_PAGE, (0, 3)).fetchall(), strict=True):
            seq, pk, text, client_id, created, *_, uid = frame
            expected = {
                "type": "message", "seq": seq, "id": pk, "room": "lobby",
                "user": {"id": uid, "username": USERS[uid]}, "text": text,
                "client_id": client_id or None,
                "created_at": created[:10] + "T" + created[11:] + "+00:00",
            }  # fmt: skip
            assert line.encode() == orjson.dumps(expected), (line, expected)
        printf_lines = db.execute(PRINTF_PAGE, (0, 50)).fetchall()
        assert printf_lines == db.execute(SQL_PAGE, (0, 50)).fetchall()
        for _ in range(args.reps):
            for name, run in (
                ("python", python_pages),
                ("sql", sql_pages),
                ("printf", printf_pages),
            ):
                start = time.process_time()
                rows = run(db)
                cpu = time.process_time() - start
                print(f"{name:7s} rows={rows:>8d}  {rows / cpu:>10,.0f} rows/CPU-s", flush=True)


if __name__ == "__main__":
    main()
