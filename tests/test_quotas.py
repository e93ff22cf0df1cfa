"""The private panel's per-user quotas, with time passed in."""

from __future__ import annotations

import pytest

from chat.quotas import BUSY, RATE_LIMITED, StreamQuota


def test_open_streams_are_capped_per_user() -> None:
    quota = StreamQuota(max_open=2, max_starts=100, window_seconds=60)
    assert quota.acquire(1, 0.0) is None
    assert quota.acquire(1, 0.1) is None
    assert quota.acquire(1, 0.2) == (BUSY, 1.0)
    assert quota.acquire(2, 0.2) is None, "users are independent"
    quota.release(1)
    assert quota.acquire(1, 0.3) is None


def test_starts_are_rate_limited_in_a_sliding_window() -> None:
    quota = StreamQuota(max_open=10, max_starts=2, window_seconds=10)
    assert quota.acquire(1, 0.0) is None
    assert quota.acquire(1, 4.0) is None
    refused = quota.acquire(1, 5.0)
    assert refused is not None
    code, wait = refused
    assert code == RATE_LIMITED
    assert wait == pytest.approx(5.0), "the oldest start leaves the window at t=10"
    assert quota.acquire(1, 10.0) is None
    # A refused start does not count.
    assert quota.acquire(1, 13.9) is not None
    assert quota.acquire(1, 14.0) is None


def test_release_forgets_idle_users() -> None:
    quota = StreamQuota(max_open=1, max_starts=1, window_seconds=1)
    assert quota.acquire(7, 0.0) is None
    quota.release(7)
    assert quota.open == {}
    quota.release(7)
    assert quota.open == {}, "a second release is harmless"
