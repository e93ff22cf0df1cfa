"""The LLM backend interface: a streamed chat completion as an async iterator of text deltas.

Backends are chosen by ``CHAT_ASSISTANT_BACKEND`` (a dotted path to a subclass of
:class:`BaseLLMBackend`; see :func:`chat.llm.get_backend`). A subclass implements one hook,
:meth:`BaseLLMBackend.generate`; callers use :meth:`BaseLLMBackend.stream`, which counts open
streams and turns any unexpected exception into an :class:`LLMError`, so callers handle one
exception type. Every stream must be closed with ``contextlib.aclosing`` (or by reading it to
the end): a stream abandoned half-way holds an upstream connection, and the model keeps
generating (and billing) until that connection drops.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from typing import Literal, TypedDict

logger = logging.getLogger("chat.llm")

# Error codes of LLMError, also sent to clients (SSE "error" events, assistant.end frames).
UPSTREAM_AUTH = "upstream_auth"
UPSTREAM_RATE_LIMITED = "upstream_rate_limited"
UPSTREAM_ERROR = "upstream_error"
UPSTREAM_TIMEOUT = "upstream_timeout"
UPSTREAM_BAD_RESPONSE = "upstream_bad_response"
UPSTREAM_UNAVAILABLE = "upstream_unavailable"
NOT_CONFIGURED = "not_configured"

ROLES = ("system", "user", "assistant")
Role = Literal["system", "user", "assistant"]


class ChatMessage(TypedDict):
    role: Role
    content: str


class LLMError(Exception):
    """A stream that cannot start or continue. ``message`` is safe to show to any user.

    It never contains what the upstream said (an upstream 401 body can echo the API key), only
    our own words; the upstream exception is chained for debugging but never logged whole.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class BaseLLMBackend:
    """A source of streamed replies. Subclasses implement :meth:`generate`.

    One instance serves every request of a process (concurrently), so subclasses keep no
    per-stream state on ``self``.
    """

    # Shown next to replies ("demo" marks the offline demo backend in the UI).
    label: str = "assistant"
    is_demo: bool = False

    def __init__(self) -> None:
        # Streams started and not yet finished (closed, failed or read to the end).
        self.open_streams = 0

    def generate(self, messages: Sequence[ChatMessage]) -> AsyncGenerator[str, None]:
        """Yield the reply to ``messages`` as text deltas; raise LLMError on failure.

        Implement as an async generator that releases everything it holds in ``finally``:
        it may be closed at any ``yield`` (GeneratorExit) or cancelled at any ``await``.
        """
        raise NotImplementedError

    async def aclose(self) -> None:
        """Release what the backend holds for the running event loop (e.g. a connection pool)."""

    async def stream(self, messages: Sequence[ChatMessage]) -> AsyncGenerator[str, None]:
        """Yield the reply's non-empty text deltas. Close with ``aclosing``; raises LLMError."""
        self.open_streams += 1
        try:
            async with aclosing(self.generate(messages)) as deltas:
                async for delta in deltas:
                    if delta:
                        yield delta
        except LLMError:
            raise
        except Exception as exc:
            # Only the type: an exception's text may quote upstream bodies or headers.
            logger.error("LLM backend %s failed: %s", type(self).__name__, type(exc).__name__)
            raise LLMError(UPSTREAM_ERROR, "The assistant failed unexpectedly.") from exc
        finally:
            self.open_streams -= 1
