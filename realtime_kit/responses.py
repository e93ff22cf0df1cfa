"""The JSON error answer both apps' HTTP endpoints give: ``{"error": {"code", "message", ...}}``.

docs/protocol.md lists each endpoint's codes; clients branch on ``code``, show ``message``.
"""

from __future__ import annotations

from typing import Any

from django.http import JsonResponse

__all__ = ["error_body", "json_error"]


def error_body(code: str, message: str, **extra: Any) -> dict[str, Any]:
    """The JSON body of an error response; ``extra`` keys sit beside code and message."""
    return {"error": {"code": code, "message": message, **extra}}


def json_error(status: int, code: str, message: str, **extra: Any) -> JsonResponse:
    return JsonResponse(error_body(code, message, **extra), status=status)
