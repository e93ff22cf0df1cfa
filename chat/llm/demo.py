"""An offline backend that streams a fixed, deterministic reply at a model's pace.

It makes the assistant work out of the box (``make run`` without ``OPENAI_API_KEY``) and in
tests, with no network. The UI labels its replies as a demo.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncGenerator, Sequence

from ..conf import app_settings
from .base import BaseLLMBackend, ChatMessage

# What it says about reloading holds in both places it answers: a room stores replies (a
# reload shows the reply, still growing or complete), the private panel stores nothing.
DEMO_REPLY = (
    "This is the offline demo assistant: no OPENAI_API_KEY is set, so no model is called. "
    "You asked: “{question}”. A real model would answer here, streamed token by token "
    "like this reply, which arrives in small pieces so you can watch it grow or stop it half "
    "way. In a room everyone sees it grow, and a reload shows it where it is; the private "
    "panel keeps nothing, so a reload there starts over. Set OPENAI_API_KEY (and "
    "OPENAI_BASE_URL for a local OpenAI-compatible server such as vLLM, Ollama or llama.cpp) "
    "to use a real model."
)
MAX_QUOTE_CHARS = 120
# In a room the model's input lines read "<username>: <message>" (chat/assistant.py), and the
# message starts with the @assistant mention that asked for the reply: the quote shows
# neither, only what was asked.
_ROOM_PREFIX = re.compile(r"^(?:[\w.@+-]{1,150}: )?@assistant(?![\w-])[\s,:]*", re.IGNORECASE)


def asked(content: str) -> str:
    """What a user message asks, without the room's "name: @assistant" framing."""
    return _ROOM_PREFIX.sub("", " ".join(content.split()), count=1)


def demo_reply(messages: Sequence[ChatMessage]) -> str:
    """The demo's full reply to ``messages`` (deterministic)."""
    question = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
    question = asked(question)
    if len(question) > MAX_QUOTE_CHARS:
        question = question[: MAX_QUOTE_CHARS - 1] + "…"
    return DEMO_REPLY.format(question=question or "nothing")


def demo_tokens(text: str) -> list[str]:
    """Split ``text`` into word-sized tokens (each with its leading space), like a model's."""
    return re.findall(r"\s*\S+", text)


class DemoBackend(BaseLLMBackend):
    label = "demo assistant"
    is_demo = True

    async def generate(self, messages: Sequence[ChatMessage]) -> AsyncGenerator[str, None]:
        delay = app_settings.ASSISTANT_DEMO_DELAY_SECONDS
        for token in demo_tokens(demo_reply(messages)):
            await asyncio.sleep(delay)
            yield token
