"""System checks of the assistant settings (registered by chat.checks)."""

from __future__ import annotations

from typing import Any

from django.core.checks import CheckMessage, Error, Warning, register
from django.utils.module_loading import import_string

from realtime_kit.checks import non_negative_errors, positive_errors, setting_value_errors

from ..conf import app_settings
from .base import BaseLLMBackend


@register()
def check_assistant_settings(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    if setting_value_errors(app_settings, "chat.E010"):
        return []  # reported by chat.checks.check_chat_settings
    errors: list[CheckMessage] = []
    errors += _check_backend()
    positive = {
        "CHAT_ASSISTANT_MAX_REQUEST_BYTES": app_settings.ASSISTANT_MAX_REQUEST_BYTES,
        "CHAT_ASSISTANT_MAX_MESSAGES": app_settings.ASSISTANT_MAX_MESSAGES,
        "CHAT_ASSISTANT_MAX_CONTENT_CHARS": app_settings.ASSISTANT_MAX_CONTENT_CHARS,
        "CHAT_ASSISTANT_CONTEXT_MESSAGES": app_settings.ASSISTANT_CONTEXT_MESSAGES,
        "CHAT_ASSISTANT_CONTEXT_CHARS": app_settings.ASSISTANT_CONTEXT_CHARS,
        "CHAT_ASSISTANT_MAX_REPLY_CHARS": app_settings.ASSISTANT_MAX_REPLY_CHARS,
        "CHAT_ASSISTANT_COALESCE_CHARS": app_settings.ASSISTANT_COALESCE_CHARS,
        "CHAT_ASSISTANT_MAX_CONCURRENT_PER_USER": app_settings.ASSISTANT_MAX_CONCURRENT_PER_USER,
        "CHAT_ASSISTANT_RATE_LIMIT_REPLIES": app_settings.ASSISTANT_RATE_LIMIT_REPLIES,
        "CHAT_ASSISTANT_RATE_LIMIT_WINDOW_SECONDS": (
            app_settings.ASSISTANT_RATE_LIMIT_WINDOW_SECONDS
        ),
        "CHAT_LLM_CONNECT_TIMEOUT_SECONDS": app_settings.LLM_CONNECT_TIMEOUT_SECONDS,
        "CHAT_LLM_FIRST_TOKEN_TIMEOUT_SECONDS": app_settings.LLM_FIRST_TOKEN_TIMEOUT_SECONDS,
        "CHAT_LLM_IDLE_TIMEOUT_SECONDS": app_settings.LLM_IDLE_TIMEOUT_SECONDS,
    }
    errors.extend(positive_errors(positive, "chat.E101"))
    non_negative = {
        "CHAT_ASSISTANT_COALESCE_SECONDS": app_settings.ASSISTANT_COALESCE_SECONDS,
        "CHAT_ASSISTANT_DEMO_DELAY_SECONDS": app_settings.ASSISTANT_DEMO_DELAY_SECONDS,
        "CHAT_LLM_MAX_RETRIES": app_settings.LLM_MAX_RETRIES,
        "CHAT_LLM_MAX_TOKENS": app_settings.LLM_MAX_TOKENS,
    }
    errors.extend(non_negative_errors(non_negative, "chat.E104"))
    return errors


def _check_backend() -> list[CheckMessage]:
    path = app_settings.ASSISTANT_BACKEND
    try:
        cls = import_string(path)
    except ImportError:
        return [Error(f"CHAT_ASSISTANT_BACKEND {path!r} cannot be imported.", id="chat.E102")]
    if not (isinstance(cls, type) and issubclass(cls, BaseLLMBackend)):
        return [
            Error(
                f"CHAT_ASSISTANT_BACKEND {path!r} is not a BaseLLMBackend subclass.",
                hint="Subclass chat.llm.base.BaseLLMBackend and implement generate().",
                id="chat.E103",
            )
        ]
    from .openai_backend import OpenAIBackend

    if issubclass(cls, OpenAIBackend) and not app_settings.LLM_API_KEY:
        return [
            Warning(
                "The OpenAI assistant backend is selected but CHAT_LLM_API_KEY is empty: "
                "every reply will fail with not_configured.",
                hint="Set the API key (the demo host reads OPENAI_API_KEY), or select "
                "chat.llm.demo.DemoBackend in CHAT_ASSISTANT_BACKEND.",
                id="chat.W101",
            )
        ]
    return []
