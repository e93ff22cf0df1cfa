"""ASGI entry point of the demo host: the apps' one-call wiring (docs/embedding.md)."""

from __future__ import annotations

from realtime_kit.asgi import get_asgi_application

# Daphne serves no static files: this demo host serves them itself, DEBUG or not, so
# `make run` needs nothing else; behind a proxy in production, let the proxy serve STATIC_ROOT.
application = get_asgi_application("project.settings", serve_static=True)
