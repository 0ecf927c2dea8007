"""JSON answers that hold a tenant's own documents (graph properties, multi-store results),
written by ``jsonvalues.dumps`` rather than FastAPI's serializer: a tenant's jsonb may nest
deeper than pydantic's serializer goes (it answered 500) or hold integers orjson refuses."""

from __future__ import annotations

from typing import Any

from fastapi import Response

from database_service.jsonvalues import dumps

__all__ = ["json_answer"]


def json_answer(document: Any, status_code: int = 200) -> Response:
    return Response(dumps(document), status_code=status_code, media_type="application/json")
