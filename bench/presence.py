"""Presence under a burst: N users join one room within about a second.

Starts daphne (SQLite, in-memory layer) twice in one run: once with the shipped coalescing
(settle 50 ms, at most one diff per 250 ms per room) and once as a baseline with coalescing
off (settle 0, min interval 0: a diff for every change the hub sees). For each it reports
how many presence_diff frames a watching client got, and daphne's CPU time per join.

    .venv/bin/python bench/presence.py [--users 500]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from websockets.asyncio.client import connect
from websockets.typing import Origin

from tests.servers import DaphneServer, prepare_database, run_django_script

SESSIONS_SCRIPT = """
import django, json, sys
django.setup()
from django.contrib.auth import get_user_model, HASH_SESSION_KEY, SESSION_KEY, BACKEND_SESSION_KEY
from django.contrib.sessions.backends.db import SessionStore
User = get_user_model()
n = int(sys.argv[1])
User.objects.bulk_create([User(username=f"bench{i}", password="!") for i in range(n)])
keys = []
for user in User.objects.filter(username__startswith="bench").order_by("id"):
    s = SessionStore()
    s[SESSION_KEY] = str(user.pk)
    s[BACKEND_SESSION_KEY] = "django.contrib.auth.backends.ModelBackend"
    s[HASH_SESSION_KEY] = user.get_session_auth_hash()
    s.create()
    keys.append(s.session_key)
print(json.dumps(keys))
"""


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime + stime


async def run(server: DaphneServer, keys: list[str]) -> tuple[int, float, float, int]:
    url = server.ws_url("/ws/chat/lobby/")
    origin = Origin(server.base_url)
    watcher = await connect(
        url, additional_headers={"Cookie": f"sessionid={keys[0]}"}, origin=origin
    )
    online: set[int] = set()
    diffs = 0
    done = asyncio.Event()
    expected = len(keys)

    async def read() -> None:
        nonlocal diffs
        async for raw in watcher:
            data = json.loads(raw)
            for frame in data if isinstance(data, list) else [data]:
                if frame["type"] == "presence_state":
                    online.update(u["id"] for u in frame["users"])
                elif frame["type"] == "presence_diff":
                    diffs += 1
                    online.update(u["id"] for u in frame["joins"])
                if len(online) >= expected:
                    done.set()

    reader = asyncio.create_task(read())
    await asyncio.sleep(0.5)
    pid = server.proc.pid if server.proc else 0
    cpu_before = cpu_seconds(pid)
    start = time.perf_counter()
    sockets = await asyncio.gather(
        *(
            connect(
                url, additional_headers={"Cookie": f"sessionid={k}"}, origin=origin, open_timeout=60
            )
            for k in keys[1:]
        )
    )
    joined = time.perf_counter() - start
    await asyncio.wait_for(done.wait(), 60)
    seen_all = time.perf_counter() - start
    cpu = cpu_seconds(pid) - cpu_before
    await asyncio.gather(*(s.close() for s in sockets))
    await watcher.close()
    reader.cancel()
    return diffs, joined, seen_all, int(cpu * 1000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=500)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in [
            ("coalesced", {}),
            (
                "baseline",
                {"CHAT_PRESENCE_SETTLE_SECONDS": "0", "CHAT_PRESENCE_MIN_INTERVAL_SECONDS": "0"},
            ),
        ]:
            env = {
                "SQLITE_PATH": str(Path(tmp) / f"{name}.sqlite3"),
                "DATABASE_URL": "",
                "REDIS_URL": "",
                "DJANGO_DEBUG": "0",
                "DJANGO_SECRET_KEY": "bench-only",
                "DJANGO_ALLOWED_HOSTS": "127.0.0.1",
                **extra,
            }
            prepare_database(env)
            keys = json.loads(run_django_script(SESSIONS_SCRIPT, env, str(args.users + 1)))
            server = DaphneServer(env).start()
            try:
                results[name] = asyncio.run(run(server, keys))
            finally:
                server.cleanup()
            diffs, joined, seen, cpu = results[name]
            print(
                f"{name:9s} users={args.users}  connects took {joined:5.2f} s  "
                f"watcher saw all after {seen:5.2f} s  diff frames to watcher={diffs:4d}  "
                f"daphne CPU {cpu} ms ({cpu / args.users:.2f} ms/join)",
                flush=True,
            )
    c, b = results["coalesced"], results["baseline"]
    print(
        f"ratio baseline/coalesced: diff frames {b[0] / max(c[0], 1):.1f}x, "
        f"CPU {b[3] / max(c[3], 1):.2f}x"
    )


if __name__ == "__main__":
    main()
