"""LLM backends in-process: the contract every backend keeps, and the OpenAI backend against a
real local HTTP server speaking the Chat Completions streaming format (tests/fake_openai.py).

Cleanup is proven on every path: the backend's own count of open streams returns to 0 (its
``finally`` ran), and the fake server sees no stream left open. Timing bounds are generous
upper bounds measured by the server (when it saw the client hang up).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.test import override_settings

from chat.llm import BaseLLMBackend, LLMError, base, get_backend
from chat.llm.checks import check_assistant_settings
from chat.llm.demo import DemoBackend, demo_reply
from chat.llm.openai_backend import OpenAIBackend
from tests.fake_openai import FakeOpenAI, Scenario, fake_openai, fake_openai_server  # noqa: F401

OPENAI = "chat.llm.openai_backend.OpenAIBackend"
DEMO = "chat.llm.demo.DemoBackend"
KEY = "sk-test-4f9c2b7e1d8a6c5b3e0f"
MESSAGES: list[base.ChatMessage] = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Say hello"},
]
# Upper bound for "the upstream connection dropped soon after we closed the stream".
HANGUP_BOUND_SECONDS = 1.0


def openai_settings(fake: FakeOpenAI, **extra: object) -> override_settings:
    values: dict[str, object] = {
        "CHAT_ASSISTANT_BACKEND": OPENAI,
        "CHAT_LLM_API_KEY": KEY,
        "CHAT_LLM_BASE_URL": fake.base_url,
        "CHAT_LLM_MODEL": "fake-model",
        "CHAT_LLM_MAX_RETRIES": 0,
        "CHAT_LLM_FIRST_TOKEN_TIMEOUT_SECONDS": 10,
        "CHAT_LLM_IDLE_TIMEOUT_SECONDS": 10,
    }
    values.update(extra)
    return override_settings(**values)


async def collect(backend: BaseLLMBackend, messages: list[base.ChatMessage] = MESSAGES) -> str:
    async with aclosing(backend.stream(messages)) as deltas:
        return "".join([delta async for delta in deltas])


# --- the contract of every backend ---------------------------------------------------------


class BackendContract:
    """Run against every backend (like Django's storage tests): subclasses give ``backend``."""

    @pytest.fixture
    def backend(self) -> Iterator[BaseLLMBackend]:
        raise NotImplementedError

    async def test_streams_non_empty_text_deltas(self, backend: BaseLLMBackend) -> None:
        deltas = []
        async with aclosing(backend.stream(MESSAGES)) as stream:
            async for delta in stream:
                assert isinstance(delta, str) and delta
                deltas.append(delta)
        assert len(deltas) >= 2
        assert backend.open_streams == 0

    async def test_closing_early_runs_cleanup(self, backend: BaseLLMBackend) -> None:
        async with aclosing(backend.stream(MESSAGES)) as stream:
            async for _ in stream:
                assert backend.open_streams == 1
                break
        assert backend.open_streams == 0

    async def test_cancelling_mid_stream_runs_cleanup(self, backend: BaseLLMBackend) -> None:
        first = asyncio.Event()

        async def consume() -> None:
            async with aclosing(backend.stream(MESSAGES)) as stream:
                async for _ in stream:
                    first.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(first.wait(), 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert backend.open_streams == 0

    async def test_concurrent_streams_are_independent(self, backend: BaseLLMBackend) -> None:
        texts = await asyncio.gather(collect(backend), collect(backend))
        assert texts[0] == texts[1] != ""
        assert backend.open_streams == 0


class TestDemoBackend(BackendContract):
    @pytest.fixture
    def backend(self) -> Iterator[BaseLLMBackend]:
        with override_settings(CHAT_ASSISTANT_BACKEND=DEMO, CHAT_ASSISTANT_DEMO_DELAY_SECONDS=0):
            yield get_backend()

    async def test_reply_is_deterministic_and_quotes_the_question(
        self, backend: BaseLLMBackend
    ) -> None:
        text = await collect(backend)
        assert text == demo_reply(MESSAGES)
        assert "Say hello" in text
        assert backend.is_demo


class TestOpenAIBackend(BackendContract):
    @pytest.fixture
    async def backend(self, fake_openai: FakeOpenAI) -> AsyncIterator[BaseLLMBackend]:  # noqa: F811
        fake_openai.scenario = Scenario(tokens=["a", "b", "c", "d"] * 5, delay=0.01)
        with openai_settings(fake_openai):
            backend = get_backend()
            yield backend
            await backend.aclose()

    async def test_exact_passthrough(self, fake_openai: FakeOpenAI) -> None:  # noqa: F811
        tokens = ["Hé", "llo", " ", "wörld", "\n\n", "“quotes”", ' "json" ', "🙂", "\\n", " end"]
        fake_openai.scenario = Scenario(tokens=tokens)
        with openai_settings(fake_openai):
            backend = get_backend()
            assert await collect(backend) == "".join(tokens)
            await backend.aclose()
        (record,) = fake_openai.records()
        assert record.outcome == "done"
        assert record.headers["authorization"] == f"Bearer {KEY}"
        assert record.body["model"] == "fake-model"
        assert record.body["stream"] is True
        assert record.messages == MESSAGES


# --- OpenAI backend: ending a stream early drops the upstream connection --------------------


@pytest.fixture
async def openai_backend(fake_openai: FakeOpenAI) -> AsyncIterator[OpenAIBackend]:  # noqa: F811
    with openai_settings(fake_openai):
        backend = get_backend()
        assert isinstance(backend, OpenAIBackend)
        yield backend
        await backend.aclose()
    assert backend.open_streams == 0


async def test_close_drops_upstream_connection(
    fake_openai: FakeOpenAI,  # noqa: F811
    openai_backend: OpenAIBackend,
) -> None:
    fake_openai.scenario = Scenario(tokens=["t"] * 200, delay=0.02)
    async with aclosing(openai_backend.stream(MESSAGES)) as stream:
        received = 0
        async for _ in stream:
            received += 1
            if received == 3:
                break
        closed_at = time.monotonic()
    assert await asyncio.to_thread(fake_openai.wait_until, lambda f: bool(f.hangups()), 5)
    (record,) = fake_openai.records()
    assert record.outcome == "client_hangup"
    assert record.hangup_at is not None
    assert record.hangup_at - closed_at < HANGUP_BOUND_SECONDS
    assert record.tokens_sent < 200


async def test_cancel_drops_upstream_connection(
    fake_openai: FakeOpenAI,  # noqa: F811
    openai_backend: OpenAIBackend,
) -> None:
    fake_openai.scenario = Scenario(tokens=["t"] * 10, delay=0.02, stall_after=2)
    got_two = asyncio.Event()

    async def consume() -> None:
        async with aclosing(openai_backend.stream(MESSAGES)) as stream:
            count = 0
            async for _ in stream:
                count += 1
                if count == 2:
                    got_two.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(got_two.wait(), 10)
    await asyncio.sleep(0.1)  # now waiting on a stalled upstream
    cancelled_at = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await asyncio.to_thread(fake_openai.wait_until, lambda f: bool(f.hangups()), 5)
    (hangup,) = fake_openai.hangups()
    assert hangup - cancelled_at < HANGUP_BOUND_SECONDS


# --- OpenAI backend: every failure ends with a typed error, nothing left behind -------------

FAILURES = [
    pytest.param(Scenario(status=401), {}, base.UPSTREAM_AUTH, id="401"),
    pytest.param(Scenario(status=403), {}, base.UPSTREAM_AUTH, id="403"),
    pytest.param(Scenario(status=429), {}, base.UPSTREAM_RATE_LIMITED, id="429"),
    pytest.param(Scenario(status=500), {}, base.UPSTREAM_ERROR, id="500"),
    pytest.param(Scenario(reset_after=2), {}, base.UPSTREAM_UNAVAILABLE, id="reset-mid-stream"),
    pytest.param(Scenario(malformed_after=1), {}, base.UPSTREAM_BAD_RESPONSE, id="malformed"),
    pytest.param(Scenario(error_chunk_after=1), {}, base.UPSTREAM_ERROR, id="error-chunk"),
    pytest.param(
        Scenario(stall_after=0),
        {"CHAT_LLM_FIRST_TOKEN_TIMEOUT_SECONDS": 0.5},
        base.UPSTREAM_TIMEOUT,
        id="stall-before-first-token",
    ),
    pytest.param(
        Scenario(headers_delay=3),
        {"CHAT_LLM_FIRST_TOKEN_TIMEOUT_SECONDS": 0.5},
        base.UPSTREAM_TIMEOUT,
        id="slow-headers",
    ),
    pytest.param(
        Scenario(stall_after=2),
        {"CHAT_LLM_IDLE_TIMEOUT_SECONDS": 0.5},
        base.UPSTREAM_TIMEOUT,
        id="stall-mid-stream",
    ),
]


@pytest.mark.parametrize(("scenario", "extra", "code"), FAILURES)
async def test_failures_end_with_typed_error_and_clean_up(
    fake_openai: FakeOpenAI,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
    scenario: Scenario,
    extra: dict[str, object],
    code: str,
) -> None:
    caplog.set_level(logging.DEBUG)
    fake_openai.scenario = scenario
    received: list[str] = []
    with openai_settings(fake_openai, **extra):
        backend = get_backend()
        with pytest.raises(LLMError) as info:
            async with aclosing(backend.stream(MESSAGES)) as stream:
                async for delta in stream:
                    received.append(delta)
        await backend.aclose()
    assert info.value.code == code
    assert backend.open_streams == 0
    assert await asyncio.to_thread(fake_openai.wait_idle, 5)
    if scenario.reset_after or scenario.stall_after or scenario.malformed_after:
        assert received, "tokens before the failure were passed on"
    # Neither the error nor any log line (openai's debug logs included) holds the key.
    assert KEY not in str(info.value) and KEY not in info.value.message
    assert KEY not in caplog.text
    for record in caplog.records:
        assert KEY not in record.getMessage()
        assert KEY not in (record.exc_text or "")


async def test_upstream_message_is_never_passed_on(fake_openai: FakeOpenAI) -> None:  # noqa: F811
    fake_openai.scenario = Scenario(status=401)
    with openai_settings(fake_openai):
        backend = get_backend()
        with pytest.raises(LLMError) as info:
            await collect(backend)
        await backend.aclose()
    # The fake's 401 body says "Incorrect API key provided: <key>"; we say our own words.
    assert "Incorrect API key" not in info.value.message


async def test_retries_only_the_initial_request(fake_openai: FakeOpenAI) -> None:  # noqa: F811
    fake_openai.scenario = Scenario(status=429, retry_after_ms=10)
    with openai_settings(fake_openai, CHAT_LLM_MAX_RETRIES=1):
        backend = get_backend()
        with pytest.raises(LLMError) as info:
            await collect(backend)
        await backend.aclose()
    assert info.value.code == base.UPSTREAM_RATE_LIMITED
    assert len(fake_openai.records()) == 2
    # A stream that fails mid-way is never retried.
    fake_openai.reset(Scenario(reset_after=1))
    with openai_settings(fake_openai, CHAT_LLM_MAX_RETRIES=1):
        backend = get_backend()
        with pytest.raises(LLMError):
            await collect(backend)
        await backend.aclose()
    assert len(fake_openai.records()) == 1


async def test_unreachable_server() -> None:
    server = FakeOpenAI().start()
    url = server.base_url
    server.stop()  # nothing listens on that port any more
    with override_settings(
        CHAT_ASSISTANT_BACKEND=OPENAI,
        CHAT_LLM_API_KEY=KEY,
        CHAT_LLM_BASE_URL=url,
        CHAT_LLM_MAX_RETRIES=0,
    ):
        backend = get_backend()
        with pytest.raises(LLMError) as info:
            await collect(backend)
        await backend.aclose()
    assert info.value.code == base.UPSTREAM_UNAVAILABLE
    assert backend.open_streams == 0


async def test_no_key_is_not_configured(fake_openai: FakeOpenAI) -> None:  # noqa: F811
    with openai_settings(fake_openai, CHAT_LLM_API_KEY=""):
        with pytest.raises(LLMError) as info:
            await collect(get_backend())
    assert info.value.code == base.NOT_CONFIGURED
    assert fake_openai.records() == []


def test_backend_repr_hides_the_key(fake_openai: FakeOpenAI) -> None:  # noqa: F811
    with openai_settings(fake_openai):
        assert KEY not in repr(get_backend())


# --- choosing a backend ---------------------------------------------------------------------


def test_default_is_demo_and_setting_selects() -> None:
    with override_settings(CHAT_ASSISTANT_BACKEND=DEMO):
        assert isinstance(get_backend(), DemoBackend)
        assert get_backend() is get_backend()
    with override_settings(CHAT_ASSISTANT_BACKEND=OPENAI, CHAT_LLM_API_KEY=KEY):
        assert isinstance(get_backend(), OpenAIBackend)


def test_bad_backend_paths() -> None:
    with override_settings(CHAT_ASSISTANT_BACKEND="chat.llm.nope.Backend"):
        with pytest.raises(ImproperlyConfigured):
            get_backend()
        assert [e.id for e in check_assistant_settings()] == ["chat.E102"]
    with override_settings(CHAT_ASSISTANT_BACKEND="chat.conf.ChatSettings"):
        with pytest.raises(ImproperlyConfigured):
            get_backend()
        assert [e.id for e in check_assistant_settings()] == ["chat.E103"]


def test_check_warns_when_openai_has_no_key() -> None:
    with override_settings(CHAT_ASSISTANT_BACKEND=OPENAI, CHAT_LLM_API_KEY=""):
        assert [e.id for e in check_assistant_settings()] == ["chat.W101"]
    with override_settings(CHAT_ASSISTANT_BACKEND=OPENAI, CHAT_LLM_API_KEY=KEY):
        assert check_assistant_settings() == []
    with override_settings(CHAT_ASSISTANT_COALESCE_CHARS=0, CHAT_LLM_MAX_RETRIES=-1):
        assert [e.id for e in check_assistant_settings()] == ["chat.E101", "chat.E104"]


def test_manage_py_check_passes_with_the_demo_default() -> None:
    with override_settings(CHAT_ASSISTANT_BACKEND=DEMO):
        call_command("check", "--fail-level", "WARNING")


def test_nothing_is_created_at_import() -> None:
    # Constructing the backend reads settings but opens no client or connection.
    backend = OpenAIBackend()
    assert len(backend._clients) == 0
