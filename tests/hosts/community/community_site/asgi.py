"""The one-call wiring of docs/embedding.md."""

from __future__ import annotations

from realtime_kit.asgi import get_asgi_application

application = get_asgi_application("community_site.settings")
