"""notify() to many users: the bulk path against a naive per-user loop, in the same run.

Runs in this process against a fresh SQLite file (or the PostgreSQL database of
``--database-url``), with the in-memory channel layer. The naive baseline stores one
Notification per user with ``create()`` and publishes one channel-layer message per user,
which is what a straightforward implementation does.

    .venv/bin/python bench/notify.py [--users 10000] [--database-url postgres://...]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--database-url", default="", help="run on this database only")
    args = parser.parse_args()
    if not args.database_url:
        run_postgres_too(args.users)
    tmp = tempfile.mkdtemp()
    os.environ.update(
        {
            "DJANGO_SETTINGS_MODULE": "project.settings",
            "SQLITE_PATH": str(Path(tmp) / "bench.sqlite3"),
            "DATABASE_URL": args.database_url,
            "REDIS_URL": "",
        }
    )
    import django

    django.setup()
    from asgiref.sync import async_to_sync
    from channels.layers import get_channel_layer
    from django.contrib.auth import get_user_model
    from django.contrib.auth.hashers import make_password
    from django.core.management import call_command
    from django.db import connection

    from notifications import notify
    from notifications.models import Notification

    call_command("migrate", verbosity=0, interactive=False)
    user_model = get_user_model()
    user_model.objects.bulk_create(
        [user_model(username=f"n{i}", password=make_password(None)) for i in range(args.users)],
        batch_size=1000,
    )
    users = list(user_model.objects.filter(username__startswith="n"))
    layer = get_channel_layer()
    assert layer is not None

    def bulk() -> int:
        return notify(users, "Maintenance tonight", body="22:00 UTC", url="/status/")

    def naive() -> int:
        send = async_to_sync(layer.group_send)
        for user in users:
            n = Notification.objects.create(recipient=user, title="Maintenance tonight")
            send("notifications.events", {"type": "notify", "id": n.pk, "user": user.pk})
        return len(users)

    results = {}
    for name, run in [("bulk notify()", bulk), ("naive loop", naive)]:
        queries = 0

        def count(execute, sql, params, many, context):
            nonlocal queries
            queries += 1
            return execute(sql, params, many, context)

        with connection.execute_wrapper(count):
            start = time.perf_counter()
            stored = run()
            elapsed = time.perf_counter() - start
        results[name] = elapsed
        print(
            f"{name:14s} {connection.vendor:10s} users={stored:6d}  {elapsed:6.2f} s  "
            f"{queries:6d} queries  {stored / elapsed:8.0f} notifications/s",
            flush=True,
        )
    print(f"ratio naive/bulk: {results['naive loop'] / results['bulk notify()']:.1f}x slower")


def run_postgres_too(users: int) -> None:
    """Run the same comparison on a throwaway PostgreSQL cluster, in a child process."""
    from tests.servers import PostgresServer

    try:
        server = PostgresServer().start()
    except Exception as exc:  # PostgreSQL not installed here: SQLite only
        print(f"(PostgreSQL skipped: {exc})")
        return
    try:
        url = server.create_database("bench_notify")
        subprocess.run(
            [sys.executable, __file__, "--users", str(users), "--database-url", url], check=True
        )
    finally:
        server.cleanup()


if __name__ == "__main__":
    main()
