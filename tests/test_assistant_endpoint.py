"""The assistant endpoint and panel in-process (Django's AsyncClient): access, CSRF, request
validation before any upstream call, and the SSE body for the demo and OpenAI backends.

Streaming over a real server, client disconnects and upstream hang-ups are in
tests/test_e2e_assistant.py.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.test import AsyncClient, override_settings

from chat.llm import base
from chat.llm.demo import demo_reply
from tests.fake_openai import FakeOpenAI, Scenario, fake_openai, fake_openai_server  # noqa: F401

pytestmark = [pytest.mark.django_db(transaction=True)]

URL = "/chat/assistant/stream/"
PANEL = "/chat/assistant/"
KEY = "sk-test-endpoint-9d8c7b6a5f4e"
QUESTION = [{"role": "user", "content": "What is 2+2?"}]


@pytest.fixture
async def user() -> User:
    return await User.objects.acreate_user(username="alice", password="x")


@pytest.fixture
async def client(user: User) -> AsyncClient:
    client = AsyncClient()
    await client.aforce_login(user)
    return client


@pytest.fixture
def openai_backend(fake_openai: FakeOpenAI) -> Any:  # noqa: F811
    with override_settings(
        CHAT_ASSISTANT_BACKEND="chat.llm.openai_backend.OpenAIBackend",
        CHAT_LLM_API_KEY=KEY,
        CHAT_LLM_BASE_URL=fake_openai.base_url,
        CHAT_LLM_MAX_RETRIES=0,
    ):
        yield fake_openai


@pytest.fixture
def demo_backend() -> Any:
    with override_settings(
        CHAT_ASSISTANT_BACKEND="chat.llm.demo.DemoBackend", CHAT_ASSISTANT_DEMO_DELAY_SECONDS=0
    ):
        yield


async def post(client: AsyncClient, body: Any, **extra: Any) -> Any:
    data = body if isinstance(body, str | bytes) else json.dumps(body)
    extra.setdefault("content_type", "application/json")
    return await client.post(URL, data, **extra)


async def body_of(response: Any) -> str:
    chunks: AsyncIterator[bytes] = response.streaming_content
    return b"".join([chunk async for chunk in chunks]).decode()


def events(body: str) -> list[tuple[str, str]]:
    """(event, data) of each SSE event in a complete body; comments skipped."""
    parsed = []
    for block in body.split("\n\n"):
        lines = [line for line in block.split("\n") if line and not line.startswith(":")]
        if not lines:
            continue
        event = "message"
        data = []
        for line in lines:
            field, _, value = line.partition(": ")
            if field == "event":
                event = value
            elif field == "data":
                data.append(value)
        parsed.append((event, "\n".join(data)))
    return parsed


def reply_text(parsed: list[tuple[str, str]]) -> str:
    return "".join(json.loads(d)["content"] for e, d in parsed if e == "message" and d != "[DONE]")


async def test_demo_reply_streams_as_sse(client: AsyncClient, demo_backend: None) -> None:
    response = await post(client, {"messages": QUESTION})
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/event-stream")
    assert response["Cache-Control"] == "no-cache"
    assert response["X-Accel-Buffering"] == "no"
    parsed = events(await body_of(response))
    assert parsed[-1] == ("message", "[DONE]")
    assert reply_text(parsed) == demo_reply(QUESTION)  # type: ignore[arg-type]


async def test_openai_reply_passes_through(
    client: AsyncClient,
    openai_backend: FakeOpenAI,
) -> None:
    tokens = ["data: ", "[DONE]", "\n\n", "event: error", "é🙂", ' "q" ']
    openai_backend.scenario = Scenario(tokens=tokens)
    response = await post(client, {"messages": QUESTION})
    parsed = events(await body_of(response))
    assert reply_text(parsed) == "".join(tokens)
    assert parsed[-1] == ("message", "[DONE]")
    (record,) = openai_backend.records()
    assert record.messages == QUESTION


@pytest.mark.parametrize(
    ("scenario", "code"),
    [
        (Scenario(status=401), base.UPSTREAM_AUTH),
        (Scenario(status=429), base.UPSTREAM_RATE_LIMITED),
        (Scenario(status=500), base.UPSTREAM_ERROR),
        (Scenario(reset_after=2), base.UPSTREAM_UNAVAILABLE),
        (Scenario(malformed_after=2), base.UPSTREAM_BAD_RESPONSE),
    ],
)
async def test_upstream_failure_ends_with_error_event(
    client: AsyncClient,
    openai_backend: FakeOpenAI,
    scenario: Scenario,
    code: str,
) -> None:
    openai_backend.scenario = scenario
    response = await post(client, {"messages": QUESTION})
    assert response.status_code == 200  # the failure comes after the headers
    body = await body_of(response)
    event, data = events(body)[-1]
    assert event == "error"
    error = json.loads(data)
    assert error["code"] == code and error["message"]
    assert KEY not in body


@pytest.mark.parametrize(
    ("body", "content_type", "code"),
    [
        ("{nope", "application/json", "bad_json"),
        ({"messages": QUESTION}, "text/plain", "bad_content_type"),
        ({"messages": QUESTION}, "application/x-www-form-urlencoded", "bad_content_type"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "application/json", "bad_request"),
        ({"messages": [{"role": "user", "content": ["x"]}]}, "application/json", "bad_request"),
        ({"messages": [{"role": "user", "content": "x" * 9}]}, "application/json", "too_long"),
        (
            {"messages": [{"role": "user", "content": "x"}] * 4},
            "application/json",
            "too_many_messages",
        ),
        ({"messages": QUESTION, "padding": "x" * 200}, "application/json", "too_large"),
    ],
)
async def test_bad_bodies_are_refused_before_any_upstream_call(
    client: AsyncClient,
    openai_backend: FakeOpenAI,
    body: Any,
    content_type: str,
    code: str,
) -> None:
    limits = {
        "CHAT_ASSISTANT_MAX_MESSAGES": 3,
        "CHAT_ASSISTANT_MAX_CONTENT_CHARS": 8,
        "CHAT_ASSISTANT_MAX_REQUEST_BYTES": 200,
    }
    with override_settings(**limits):
        response = await post(client, body, content_type=content_type)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == code
    assert openai_backend.records() == []


async def test_lone_surrogate_is_a_400_not_a_broken_stream(
    client: AsyncClient, demo_backend: None
) -> None:
    # The demo backend quotes the question: this once answered 200 and then aborted the
    # stream with UnicodeEncodeError.
    body = b'{"messages": [{"role": "user", "content": "half a pair: \\ud83d"}]}'
    response = await post(client, body)
    assert response.status_code == 400
    assert response["Content-Type"] == "application/json"
    assert response.json()["error"]["code"] == "bad_request"


async def test_anonymous_gets_401(demo_backend: None) -> None:
    response = await post(AsyncClient(), {"messages": QUESTION})
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthenticated"


async def test_get_is_not_allowed(client: AsyncClient) -> None:
    assert (await client.get(URL)).status_code == 405


async def test_csrf_is_required(user: User, openai_backend: FakeOpenAI) -> None:
    client = AsyncClient(enforce_csrf_checks=True)
    await client.aforce_login(user)
    assert (await post(client, {"messages": QUESTION})).status_code == 403
    panel = await client.get(PANEL)
    token = panel.cookies["csrftoken"].value
    response = await post(client, {"messages": QUESTION}, headers={"X-CSRFToken": token})
    assert response.status_code == 200
    assert events(await body_of(response))[-1] == ("message", "[DONE]")
    assert len(openai_backend.records()) == 1


async def test_panel_shows_demo_label_only_for_demo(
    client: AsyncClient, demo_backend: None
) -> None:
    page = (await client.get(PANEL)).content.decode()
    assert 'data-testid="demo-label"' in page
    assert 'data-stream-url="/chat/assistant/stream/"' in page


async def test_panel_never_shows_the_key(client: AsyncClient, openai_backend: FakeOpenAI) -> None:
    page = (await client.get(PANEL)).content.decode()
    assert 'data-testid="demo-label"' not in page
    assert KEY not in page


async def test_panel_needs_login() -> None:
    response = await AsyncClient().get(PANEL)
    assert response.status_code == 302
    assert "/accounts/login/" in response["Location"]


async def test_panel_streams_are_limited_per_user(client: AsyncClient, demo_backend: None) -> None:
    with override_settings(
        CHAT_ASSISTANT_PANEL_MAX_CONCURRENT_PER_USER=1, CHAT_ASSISTANT_PANEL_RATE_LIMIT=2
    ):
        first = await post(client, {"messages": QUESTION})
        assert first.status_code == 200
        # The first stream is still open (not read yet): a second one is refused.
        busy = await post(client, {"messages": QUESTION})
        assert busy.status_code == 429
        assert busy.json()["error"]["code"] == "assistant_busy"
        assert int(busy["Retry-After"]) >= 1
        # Reading the first to its end gives the slot back.
        assert events(await body_of(first))[-1] == ("message", "[DONE]")
        second = await post(client, {"messages": QUESTION})
        assert second.status_code == 200
        await body_of(second)
        # Two starts in the window: the third is rate limited, with a wait until the window
        # frees a start.
        limited = await post(client, {"messages": QUESTION})
        assert limited.status_code == 429
        assert limited.json()["error"]["code"] == "rate_limited"
        assert 1 <= int(limited["Retry-After"]) <= 60
