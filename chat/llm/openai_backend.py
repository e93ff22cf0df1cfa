"""Replies from any OpenAI-compatible Chat Completions server, through the official client.

OpenAI itself, or vLLM, Ollama, llama.cpp, LiteLLM... (``CHAT_LLM_BASE_URL``). Timeouts:

- connect: ``CHAT_LLM_CONNECT_TIMEOUT_SECONDS``, enforced by the HTTP client;
- first token: ``CHAT_LLM_FIRST_TOKEN_TIMEOUT_SECONDS`` from the request until the first
  content delta, covering the client's retries, queueing and prompt processing;
- idle: ``CHAT_LLM_IDLE_TIMEOUT_SECONDS`` between two chunks once the reply has started.

The last two are ``asyncio`` deadlines around each step of the stream, so a server that
stalls mid-reply ends the stream with ``upstream_timeout`` rather than holding it for the
client's default 10 minutes. The client retries only the initial request
(``CHAT_LLM_MAX_RETRIES``), never mid-stream.

The upstream response is closed in ``finally`` on every path (done, error, timeout, the caller
closing or cancelling us): closing drops the HTTP connection, which is how the server learns
to stop generating.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import AsyncGenerator, Sequence
from typing import TYPE_CHECKING, Any, cast

from ..conf import app_settings
from .base import (
    NOT_CONFIGURED,
    UPSTREAM_AUTH,
    UPSTREAM_BAD_RESPONSE,
    UPSTREAM_ERROR,
    UPSTREAM_RATE_LIMITED,
    UPSTREAM_TIMEOUT,
    UPSTREAM_UNAVAILABLE,
    BaseLLMBackend,
    ChatMessage,
    LLMError,
)

if TYPE_CHECKING:
    from openai import AsyncOpenAI

logger = logging.getLogger("chat.llm")

# The HTTP client's own read timeout is only a backstop behind our asyncio deadlines.
READ_TIMEOUT_MARGIN_SECONDS = 5.0


class OpenAIBackend(BaseLLMBackend):
    label = "assistant"
    is_demo = False

    def __init__(self) -> None:
        super().__init__()
        self.api_key = app_settings.LLM_API_KEY
        self.base_url = app_settings.LLM_BASE_URL or None
        self.model = app_settings.LLM_MODEL
        self.max_tokens = app_settings.LLM_MAX_TOKENS
        self.connect_timeout = app_settings.LLM_CONNECT_TIMEOUT_SECONDS
        self.first_token_timeout = app_settings.LLM_FIRST_TOKEN_TIMEOUT_SECONDS
        self.idle_timeout = app_settings.LLM_IDLE_TIMEOUT_SECONDS
        self.max_retries = app_settings.LLM_MAX_RETRIES
        # One client (and connection pool) per event loop: a pool cannot outlive its loop.
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncOpenAI] = (
            weakref.WeakKeyDictionary()
        )

    def __repr__(self) -> str:
        # Never the key: reprs end up in logs and debug pages.
        return f"<OpenAIBackend model={self.model!r} base_url={self.base_url!r}>"

    def client(self) -> AsyncOpenAI:
        """The client of the running event loop, created on first use (never at import)."""
        if not self.api_key:
            raise LLMError(NOT_CONFIGURED, "The assistant has no API key configured.")
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            import openai

            read = max(self.first_token_timeout, self.idle_timeout) + READ_TIMEOUT_MARGIN_SECONDS
            client = openai.AsyncOpenAI(
                api_key=self.api_key,
                base_url=self.base_url,
                timeout=openai.Timeout(read, connect=self.connect_timeout),
                max_retries=self.max_retries,
            )
            self._clients[loop] = client
        return client

    async def aclose(self) -> None:
        client = self._clients.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await client.close()

    async def generate(self, messages: Sequence[ChatMessage]) -> AsyncGenerator[str, None]:
        import openai

        client = self.client()
        loop = asyncio.get_running_loop()
        first_token_deadline = loop.time() + self.first_token_timeout
        started = False
        stream = None
        try:
            async with asyncio.timeout_at(first_token_deadline):
                stream = await client.chat.completions.create(
                    model=self.model,
                    messages=cast(Any, list(messages)),
                    stream=True,
                    max_tokens=self.max_tokens or openai.omit,
                )
            while True:
                deadline = loop.time() + self.idle_timeout if started else first_token_deadline
                # A deadline around each step, never around a yield: the timeout would
                # otherwise cancel whatever our caller is doing between two deltas.
                async with asyncio.timeout_at(deadline):
                    try:
                        chunk = await stream.__anext__()
                    except StopAsyncIteration:
                        break
                content = _content(chunk)
                if content:
                    started = True
                    yield content
        except TimeoutError:
            what = "between two tokens" if started else "for the first token"
            raise LLMError(
                UPSTREAM_TIMEOUT, f"The model did not answer in time ({what})."
            ) from None
        except openai.APIError as exc:
            raise _translate(exc, started) from None
        except (ValueError, TypeError, AttributeError, KeyError, IndexError) as exc:
            # A chunk that is not JSON (json.JSONDecodeError), or JSON of the wrong shape.
            logger.warning("Malformed chunk from the model server: %s", type(exc).__name__)
            raise LLMError(
                UPSTREAM_BAD_RESPONSE, "The model server sent a malformed reply."
            ) from None
        finally:
            if stream is not None:
                await _close(stream)


async def _close(stream: Any) -> None:
    """Close the upstream response (drops the connection unless it was read to the end)."""
    try:
        await stream.close()
    except Exception as exc:  # closing must not hide why we are closing
        logger.debug("Closing the upstream stream failed: %s", type(exc).__name__)


def _content(chunk: Any) -> str:
    """The text delta of one ``chat.completion.chunk`` ('' for role, usage and stop chunks)."""
    choices = chunk.choices
    if not choices:
        return ""
    content = choices[0].delta.content
    if content is None:
        return ""
    if not isinstance(content, str):
        raise TypeError("delta.content is not a string")
    return content


def _translate(exc: Exception, started: bool) -> LLMError:
    """Map an openai exception to an LLMError with our own words (never the upstream's)."""
    import openai

    status = getattr(exc, "status_code", None)
    # Type and status only: messages and bodies can quote the key or the prompt.
    logger.warning("Model server error: %s (status %s)", type(exc).__name__, status)
    if isinstance(exc, openai.AuthenticationError | openai.PermissionDeniedError):
        return LLMError(UPSTREAM_AUTH, "The model server refused our credentials.")
    if isinstance(exc, openai.RateLimitError):
        return LLMError(UPSTREAM_RATE_LIMITED, "The model server is rate limiting us; retry later.")
    if isinstance(exc, openai.APITimeoutError):
        return LLMError(UPSTREAM_TIMEOUT, "The model server did not answer in time.")
    if isinstance(exc, openai.APIConnectionError):
        if started:
            return LLMError(UPSTREAM_UNAVAILABLE, "The connection to the model server was lost.")
        return LLMError(UPSTREAM_UNAVAILABLE, "The model server cannot be reached.")
    if isinstance(exc, openai.APIResponseValidationError):
        return LLMError(UPSTREAM_BAD_RESPONSE, "The model server sent a malformed reply.")
    if status is not None:
        return LLMError(UPSTREAM_ERROR, f"The model server answered with an error ({status}).")
    return LLMError(UPSTREAM_ERROR, "The model server reported an error.")
