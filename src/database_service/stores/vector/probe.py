"""The vector store's health entry, ``dependencies.weaviate`` (the seed's name for the store)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from database_service.stores.vector.base import VectorStore

__all__ = ["VectorProbe"]


@dataclass
class VectorProbe:
    store: VectorStore
    name: str = "weaviate"

    async def check(self) -> dict[str, Any]:
        try:
            return await self.store.check()
        except Exception as exc:  # a probe reports, it never fails the health document
            return {"status": "unhealthy", "implementation": self.store.kind, "error": str(exc)}
