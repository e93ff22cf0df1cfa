"""Compare channel layers for a room broadcast: RedisChannelLayer vs RedisPubSubChannelLayer.

Starts its own redis-server on a free loopback port. For each group size it adds that many
channels to one group, then times `group_send` (the publisher's cost) and the time until every
member has received the message (one process receiving all, as a daphne process would).

    .venv/bin/python bench/layers.py [--sizes 10,100,1000] [--rounds 20]

Prints one line per (layer, size) and the ratio core/pubsub in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from typing import Any

from channels_redis.core import RedisChannelLayer
from channels_redis.pubsub import RedisPubSubChannelLayer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def measure(layer: Any, size: int, rounds: int) -> tuple[float, float]:
    group = f"bench.{size}"
    channels = [await layer.new_channel() for _ in range(size)]
    for channel in channels:
        await layer.group_add(group, channel)
    send_times: list[float] = []
    deliver_times: list[float] = []
    for i in range(rounds):
        start = time.perf_counter()
        await layer.group_send(group, {"type": "chat.message", "seq": i, "text": "x" * 200})
        sent = time.perf_counter()
        await asyncio.gather(*(layer.receive(c) for c in channels))
        done = time.perf_counter()
        send_times.append((sent - start) * 1e3)
        deliver_times.append((done - start) * 1e3)
    for channel in channels:
        await layer.group_discard(group, channel)
    return statistics.median(send_times), statistics.median(deliver_times)


async def run(url: str, sizes: list[int], rounds: int) -> None:
    results: dict[tuple[str, int], tuple[float, float]] = {}
    for name, cls in [("core", RedisChannelLayer), ("pubsub", RedisPubSubChannelLayer)]:
        for size in sizes:
            # Capacity above the group size so the core layer does not drop while we measure.
            kwargs: dict[str, Any] = {"hosts": [url]}
            if cls is RedisChannelLayer:
                kwargs["capacity"] = rounds + 10
            layer = cls(**kwargs)
            results[(name, size)] = await measure(layer, size, rounds)
            await layer.flush()
            close = getattr(layer, "close_pools", None) or getattr(layer, "flush", None)
            if close is not None:
                await close()
            print(
                f"{name:7s} members={size:5d}  group_send median {results[(name, size)][0]:8.3f} ms"
                f"  all delivered median {results[(name, size)][1]:8.3f} ms",
                flush=True,
            )
    for size in sizes:
        core, pub = results[("core", size)], results[("pubsub", size)]
        print(
            f"ratio core/pubsub members={size:5d}: group_send {core[0] / pub[0]:6.1f}x"
            f"  delivered {core[1] / pub[1]:6.1f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,100,1000")
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            cwd=tmp,
            stdout=subprocess.DEVNULL,
        )
        try:
            time.sleep(0.5)
            asyncio.run(
                run(
                    f"redis://127.0.0.1:{port}/0",
                    [int(s) for s in args.sizes.split(",")],
                    args.rounds,
                )
            )
        finally:
            proc.terminate()
            proc.wait()


if __name__ == "__main__":
    main()
