"""A health view for load balancers and orchestrators: the process serves and reaches its DB.

Hosts route it themselves (``path("healthz", realtime_kit.health.healthz)``); it needs no
login and says nothing but ``ok``/``degraded``, so it can stay public.
"""

from __future__ import annotations

from asgiref.sync import sync_to_async
from django.db import DatabaseError, connection
from django.http import HttpRequest, JsonResponse


def _database_ok() -> bool:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    except DatabaseError:
        return False
    return True


async def healthz(request: HttpRequest) -> JsonResponse:
    """Answer 200 once the process serves requests and reaches its database, else 503."""
    ok = await sync_to_async(_database_ok)()
    return JsonResponse(
        {"status": "ok" if ok else "degraded", "database": ok}, status=200 if ok else 503
    )
