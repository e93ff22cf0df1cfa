from __future__ import annotations

from django.apps import AppConfig


class ChatConfig(AppConfig):
    name = "chat"
    verbose_name = "Chat"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from realtime_kit import drain

        from . import (
            checks,  # noqa: F401  (registers system checks)
            signals,
        )
        from .assistant import replies as assistant
        from .assistant import runs as assistant_runs

        signals.connect()
        # On a restart, running room replies are stored as interrupted and their end is
        # broadcast before the runner closes the sockets.
        drain.on_drain(assistant_runs.stop_sweeper)  # a dying process takes over nothing
        drain.on_drain(assistant.interrupt_replies)
        drain.on_drain(_stop_counting)


async def _stop_counting() -> None:
    # This process's live gauges (open sockets, streams) stop adding to the site's totals.
    from realtime_kit.metrics import mark_process_dead

    mark_process_dead()
