"""chat's per-user limits (chat/quotas.py, chat/assistant/quotas.py), in process and Redis down."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from django.test import override_settings

from chat import quotas
from chat.assistant import quotas as aq
from chat.checks import check_chat_settings
from realtime_kit.leases import Lease, get_keeper
from realtime_kit.limit_stores import lease_store
from tests.servers import free_port


@pytest.fixture(autouse=True)
def _own_keys() -> Iterator[None]:
    # In-process counters live as long as the test process: each test gets its own keys.
    with override_settings(CHAT_REDIS_URL="", CHAT_REDIS_KEY_PREFIX=f"t-{uuid.uuid4().hex}"):
        yield


def held(result: Lease | aq.Refused) -> Lease:
    assert isinstance(result, Lease), result
    return result


@override_settings(
    CHAT_ASSISTANT_PANEL_MAX_CONCURRENT_PER_USER=2, CHAT_ASSISTANT_PANEL_RATE_LIMIT=100
)
async def test_open_panel_streams_are_capped_per_user() -> None:
    first = held(await aq.acquire_panel_stream(1))
    held(await aq.acquire_panel_stream(1))
    assert await aq.acquire_panel_stream(1) == aq.Refused(aq.BUSY, 1.0)
    other = held(await aq.acquire_panel_stream(2))  # users are independent
    await first.release()
    await first.release()  # idempotent
    third = held(await aq.acquire_panel_stream(1))
    for lease in (third, other):
        await lease.release()


@override_settings(
    CHAT_ASSISTANT_PANEL_MAX_CONCURRENT_PER_USER=1,
    CHAT_ASSISTANT_PANEL_RATE_LIMIT=2,
    CHAT_ASSISTANT_PANEL_RATE_LIMIT_WINDOW_SECONDS=60,
)
async def test_panel_starts_are_rate_limited_and_refusals_cost_nothing() -> None:
    first = held(await aq.acquire_panel_stream(1))
    # Busy: refused before the rate is counted, so it does not use up the window.
    for _ in range(3):
        refused = await aq.acquire_panel_stream(1)
        assert isinstance(refused, aq.Refused) and refused.code == aq.BUSY
    await first.release()
    await held(await aq.acquire_panel_stream(1)).release()
    limited = await aq.acquire_panel_stream(1)
    assert isinstance(limited, aq.Refused) and limited.code == aq.RATE_LIMITED
    assert 0 < limited.retry_after_seconds <= 60
    # The rate refusal gave its stream place back.
    assert await aq.panel_streams.count(1) == 0


@override_settings(CHAT_MAX_SOCKETS_PER_USER=3)
async def test_socket_cap_for_the_consumer() -> None:
    leases = [await quotas.sockets.acquire(5, f"conn-{n}") for n in range(3)]
    assert all(leases)
    assert await quotas.sockets.acquire(5, "conn-3") is None
    assert quotas.sockets.held_here(5) == 3
    await quotas.sockets.release(5, "conn-0")
    assert await quotas.sockets.acquire(5, "conn-3") is not None
    for n in range(1, 4):
        await quotas.sockets.release(5, f"conn-{n}")
    assert await quotas.sockets.count(5) == 0
    assert quotas.sockets.held_here() == 0
    assert quotas.sockets.key(5).endswith(":sockets:5")


async def test_redis_down_sockets_fail_open_assistant_fails_closed() -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    with override_settings(CHAT_REDIS_URL=dead):
        try:
            socket = await quotas.sockets.acquire(1, "conn")
            assert socket is not None, "Redis down must not lock people out of chat"
            refused = await aq.acquire_panel_stream(1)
            assert isinstance(refused, aq.Refused) and refused.code == aq.UNAVAILABLE
            with pytest.raises(quotas.StoreUnavailable):
                await aq.room_replies.acquire(1, "asst-x")
            await socket.release()
            assert get_keeper().held() == 0
        finally:
            await lease_store(dead).close()


# --- settings checks ------------------------------------------------------------------------

REDIS_LAYER = {"default": {"BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer"}}


def chat_check_ids() -> list[str]:
    return [m.id or "" for m in check_chat_settings()]


def test_checks_refuse_a_bad_redis_url_and_bad_values() -> None:
    with override_settings(CHAT_REDIS_URL="127.0.0.1:6379"):
        assert "chat.E004" in chat_check_ids()
    with override_settings(CHAT_LEASE_TTL_SECONDS=0, CHAT_MAX_SOCKETS_PER_USER=-1):
        messages = [m.msg for m in check_chat_settings() if m.id == "chat.E001"]
        assert len(messages) == 2
        assert any("CHAT_LEASE_TTL_SECONDS" in m for m in messages)
    with override_settings(CHAT_REDIS_URL="redis://127.0.0.1:6379/0"):
        assert not {"chat.E004", "chat.W002"} & set(chat_check_ids())


def test_checks_warn_when_processes_share_a_layer_but_not_the_limits() -> None:
    with override_settings(CHANNEL_LAYERS=REDIS_LAYER, CHAT_REDIS_URL=""):
        assert "chat.W002" in chat_check_ids()
    with override_settings(CHANNEL_LAYERS=REDIS_LAYER, CHAT_REDIS_URL="redis://h:6379/0"):
        assert "chat.W002" not in chat_check_ids()
