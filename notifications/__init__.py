"""Notifications pushed to logged-in users over Server-Sent Events.

``notify()`` / ``anotify()`` are the public API; they import the models lazily so that this
package can be imported before the app registry is ready.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .services import Recipients

__all__ = ["anotify", "notify"]


def notify(
    recipients: Recipients, title: str, body: str = "", url: str = "", level: str = "info"
) -> int:
    """Store one notification per recipient and push it live after commit; see services.notify."""
    from .services import notify as _notify

    return _notify(recipients, title, body=body, url=url, level=level)


async def anotify(
    recipients: Recipients, title: str, body: str = "", url: str = "", level: str = "info"
) -> int:
    """Async twin of notify()."""
    from .services import anotify as _anotify

    return await _anotify(recipients, title, body=body, url=url, level=level)
