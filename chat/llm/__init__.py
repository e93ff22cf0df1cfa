"""LLM backends of the assistant. ``get_backend()`` returns the configured one.

- :mod:`chat.llm.base`: the interface (``BaseLLMBackend.stream``) and ``LLMError`` codes;
- :mod:`chat.llm.openai_backend`: any OpenAI-compatible server through the ``openai`` client;
- :mod:`chat.llm.demo`: an offline backend that streams a canned reply (the app default).
"""

from __future__ import annotations

import functools
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed
from django.dispatch import receiver
from django.utils.module_loading import import_string

from ..conf import app_settings
from .base import BaseLLMBackend, ChatMessage, LLMError

__all__ = ["BaseLLMBackend", "ChatMessage", "LLMError", "get_backend"]


def get_backend() -> BaseLLMBackend:
    """The backend named by ``CHAT_ASSISTANT_BACKEND`` (one instance per process)."""
    return _load(app_settings.ASSISTANT_BACKEND)


@functools.cache
def _load(path: str) -> BaseLLMBackend:
    try:
        cls = import_string(path)
    except ImportError as exc:
        raise ImproperlyConfigured(f"CHAT_ASSISTANT_BACKEND {path!r} cannot be imported.") from exc
    if not (isinstance(cls, type) and issubclass(cls, BaseLLMBackend)):
        raise ImproperlyConfigured(
            f"CHAT_ASSISTANT_BACKEND {path!r} is not a subclass of chat.llm.base.BaseLLMBackend."
        )
    return cls()


@receiver(setting_changed)
def _forget_backend(*, setting: str, **kwargs: Any) -> None:
    # Backends read their settings once; override_settings must get a fresh one.
    if setting.startswith(("CHAT_ASSISTANT_", "CHAT_LLM_")):
        _load.cache_clear()
