"""Search query time: PostgreSQL full-text search (GIN index) vs an unindexed substring match.

For each database (SQLite, then a throwaway PostgreSQL cluster) it stores ``--rows`` messages
spread over ``--rooms`` public rooms, texts drawn from a fixed vocabulary plus marker words of
known frequency, then times one page of ``chat.search.search_page`` (newest first, 20 results,
every room the user may read: ``GET /chat/search/?q=``) in a Django process:

- ``fts``: as shipped on PostgreSQL (``to_tsvector('simple', text) @@ websearch_to_tsquery``,
  the GIN index of migration 0008);
- ``fts, pk order``: the same match as one ORM query ordered by id with a LIMIT, the plan
  PostgreSQL picks by itself (it walks the primary key backwards, testing every message);
- ``substring``: the baseline, ``text ILIKE '%q%'`` with no index (what SQLite always does;
  on PostgreSQL the same fallback forced).

Each case is run for a frequent word (in 1 of 10 messages: the first page fills at once), a rare
one (1 in 10,000: the page needs the whole room scanned or the index), and an absent one (the
worst case: nothing stops a scan early). Median of ``--repeat`` runs after one warm-up.

    .venv/bin/python bench/search.py [--rows 1000000] [--rooms 10] [--dbs sqlite,postgres]
        [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests import servers

_SEED = textwrap.dedent(
    """
    import django, json, random, sys
    django.setup()
    from django.contrib.auth import get_user_model
    from django.db import connection, transaction
    from chat.models import Message, Room

    a = json.loads(sys.argv[1])
    rnd = random.Random(7)
    words = ("deploy build review lunch merge ticket release meeting question answer "
             "server client network latency design draft budget sprint issue fix").split()
    users = list(get_user_model().objects.order_by("username"))
    rooms = [Room.objects.get_or_create(slug=f"r{n}", defaults={"title": f"R{n}"})[0]
             for n in range(a["rooms"])]
    per_room, batch = a["count"] // len(rooms), 20000
    with transaction.atomic():
        for room in rooms:
            for first in range(1, per_room + 1, batch):
                rows = []
                for s in range(first, min(first + batch, per_room + 1)):
                    text = " ".join(rnd.choice(words) for _ in range(8))
                    if s % 10 == 0:
                        text += " frequentword"
                    if s % 10000 == 5000:
                        text += " rareword"
                    rows.append(Message(room=room, seq=s, user=users[s % len(users)], text=text))
                Message.objects.bulk_create(rows, batch_size=5000)
            Room.objects.filter(pk=room.pk).update(last_seq=per_room)
    # A table that grew in production has statistics; a bulk load has none yet.
    with connection.cursor() as cursor:
        cursor.execute("VACUUM ANALYZE" if connection.vendor == "postgresql" else "ANALYZE")
    """
)

_MEASURE = textwrap.dedent(
    """
    import django, json, statistics, sys, time
    django.setup()
    from unittest import mock
    from django.contrib.auth import get_user_model
    from chat import search, services

    a = json.loads(sys.argv[1])
    user = get_user_model().objects.get(username="alice")
    rooms = services.visible_rooms(user)
    cases = [("fts", True), ("fts, pk order", True)] if search.uses_full_text() else []
    cases.append(("substring", False))

    def page(case, params):
        if case == "fts, pk order":
            return list(search.page_query(rooms, params))
        return search.search_page(rooms, params)["results"]

    out = []
    for case, fts in cases:
        with mock.patch.object(search, "uses_full_text", return_value=fts):
            for word in ("frequentword", "rareword", "absentword"):
                params = search.SearchParams(q=word, before=None, limit=20)
                times, found = [], 0
                for n in range(a["repeat"] + 1):
                    start = time.perf_counter()
                    found = len(page(case, params))
                    if n:  # the first run warms the caches
                        times.append(time.perf_counter() - start)
                out.append({"case": case, "word": word, "found": found,
                            "median_ms": statistics.median(times) * 1000,
                            "max_ms": max(times) * 1000})
        if a["explain"]:
            for word in ("frequentword", "rareword"):
                params = search.SearchParams(q=word, before=None, limit=20)
                with mock.patch.object(search, "uses_full_text", return_value=fts):
                    if case == "fts":
                        from django.db import connection
                        ids = list(rooms.values_list("pk", flat=True))
                        sql, args = search.fts_page_sql(ids, params)
                        with connection.cursor() as cursor:
                            cursor.execute("EXPLAIN ANALYZE " + sql, args)
                            plan = "\\n".join(row[0] for row in cursor.fetchall())
                    else:
                        plan = search.page_query(rooms, params).explain(analyze=True)
                print(f"--- {case} {word}")
                print(plan)
    print(json.dumps(out))
    """
)


def run(db: str, env: dict[str, str], args: argparse.Namespace) -> list[dict[str, object]]:
    start = time.monotonic()
    servers.prepare_database(env)
    seed = json.dumps({"count": args.rows, "rooms": args.rooms})
    servers.run_django_script(_SEED, env, seed, timeout=7200)
    print(f"{db}: stored {args.rows} messages in {time.monotonic() - start:.0f} s", flush=True)
    measured = servers.run_django_script(
        _MEASURE,
        env,
        json.dumps({"repeat": args.repeat, "explain": args.explain}),
        timeout=7200,
    )
    *plans, last = measured.strip().splitlines()
    if plans:
        print("\n".join(plans), flush=True)
    results: list[dict[str, object]] = json.loads(last)
    for r in results:
        print(
            f"{db:8} {r['case']:13} {r['word']:13} found {r['found']:2}  "
            f"median {r['median_ms']:9.1f} ms  max {r['max_ms']:9.1f} ms",
            flush=True,
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--rooms", type=int, default=10)
    parser.add_argument("--dbs", default="sqlite,postgres")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--explain", action="store_true", help="print query plans")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-search-") as tmp:
        common = {
            "DJANGO_DEBUG": "0",
            "DJANGO_SECRET_KEY": "bench-" + uuid.uuid4().hex,
            "DJANGO_LOG_LEVEL": "WARNING",
            "REDIS_URL": "",
        }
        for db in args.dbs.split(","):
            postgres = None
            if db == "sqlite":
                env = {**common, "DATABASE_URL": "", "SQLITE_PATH": f"{tmp}/bench.sqlite3"}
            elif db == "postgres":
                postgres = servers.PostgresServer().start()
                env = {**common, "DATABASE_URL": postgres.create_database("bench")}
            else:
                raise SystemExit(f"unknown database {db!r}")
            try:
                run(db, env, args)
            finally:
                if postgres is not None:
                    postgres.cleanup()


if __name__ == "__main__":
    main()
