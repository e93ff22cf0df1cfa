from __future__ import annotations

from asgiref.sync import sync_to_async
from django.db import DatabaseError, connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect


def _database_ok() -> bool:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    except DatabaseError:
        return False
    return True


async def healthz(request: HttpRequest) -> JsonResponse:
    """Answer 200 once the process serves requests and reaches its database."""
    ok = await sync_to_async(_database_ok)()
    return JsonResponse(
        {"status": "ok" if ok else "degraded", "database": ok}, status=200 if ok else 503
    )


def home(request: HttpRequest) -> HttpResponse:
    return redirect("chat:room_list")
