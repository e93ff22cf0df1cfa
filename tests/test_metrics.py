"""Prometheus metrics: who may read them, that traffic moves them, and several processes."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from django.contrib.auth.models import User
from django.test import Client, override_settings
from prometheus_client import REGISTRY

from tests.servers import ChatClient, DaphneServer, RedisServer, login
from tests.test_consumer import connected, frame, make_room, make_user, send

TOKEN = "scrape-token-1"


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.mark.django_db
def test_metrics_are_for_staff_or_the_token_only() -> None:
    client = Client()
    with override_settings(CHAT_METRICS_TOKEN=TOKEN):
        assert client.get("/metrics").status_code == 403
        assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer wrong").status_code == 403
        ok = client.get("/metrics", HTTP_AUTHORIZATION=f"Bearer {TOKEN}")
        assert ok.status_code == 200
        assert "chat_sockets_open" in ok.content.decode()
        assert ok["Content-Type"].startswith("text/plain")
    # Without a token configured, no bearer header opens it; staff sessions do.
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer ").status_code == 403
    User.objects.create_user("plain", password="x")
    client.login(username="plain", password="x")
    assert client.get("/metrics").status_code == 403
    User.objects.create_user("boss", password="x", is_staff=True)
    client.login(username="boss", password="x")
    body = client.get("/metrics").content.decode()
    for name in (
        "chat_frames_delivered_total",
        "chat_bytes_delivered_total",
        "chat_batch_frames_bucket",
        "chat_message_store_seconds_bucket",
        "notifications_streams_open",
    ):
        assert name in body, name


@pytest.mark.django_db(transaction=True)
async def test_traffic_moves_the_counters() -> None:
    alice = await make_user("alice")
    await make_room("lobby")
    open_before = sample("chat_sockets_open")
    frames_before = sample("chat_frames_delivered_total")
    stored_before = sample("chat_message_store_seconds_count")
    comm = await connected(alice, "lobby")
    assert sample("chat_sockets_open") == open_before + 1
    await send(comm, {"type": "message", "text": "hi", "client_id": "m1"})
    assert (await frame(comm))["type"] == "ack"
    assert (await frame(comm))["type"] == "message"
    assert sample("chat_message_store_seconds_count") == stored_before + 1
    assert sample("chat_frames_delivered_total") >= frames_before + 2
    await comm.disconnect()
    await asyncio.sleep(0)
    assert sample("chat_sockets_open") == open_before


@pytest.mark.e2e
@pytest.mark.redis
async def test_one_scrape_sums_every_process(
    start_daphne: Callable[..., DaphneServer],
    sqlite_env: dict[str, str],
    redis_server: RedisServer,
    tmp_path: Path,
) -> None:
    folder = tmp_path / "prometheus"
    folder.mkdir()
    env = {
        **sqlite_env,
        "REDIS_URL": redis_server.url,
        "PROMETHEUS_MULTIPROC_DIR": str(folder),
        "CHAT_METRICS_TOKEN": TOKEN,
    }
    a, b = start_daphne(env), start_daphne(env)
    cookie = await login(a.base_url, "alice")
    clients = [await ChatClient.open(server, cookie) for server in (a, a, b)]
    await clients[0].post("counted", "c1")
    await clients[2].wait_seq(1)
    async with httpx.AsyncClient(base_url=b.base_url, timeout=10) as http:
        response = await http.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200
    found = re.search(r"^chat_sockets_open (\S+)$", response.text, re.M)
    assert found is not None and float(found[1]) == 3.0, response.text[:2000]
    delivered = re.search(r"^chat_frames_delivered_total (\S+)$", response.text, re.M)
    assert delivered is not None and float(delivered[1]) >= 3
    for client in clients:
        await client.close()
