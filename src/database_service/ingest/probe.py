"""Ingestion in the health document: each transport's consumer and the dead letters."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from database_service.errors import DatabaseServiceError
from database_service.ingest.deadletters import DeadLetterStore
from database_service.ingest.kafka_group import KafkaIngest
from database_service.ingest.pipeline import IngestPipeline
from database_service.query.boundary import postgres_errors

__all__ = ["IngestionProbe", "KafkaProbe"]


@dataclass
class KafkaProbe:
    """Kafka as the ingestion consumer sees it, and a metadata round trip through its client."""

    consumer: KafkaIngest
    bootstrap: str
    name: str = "kafka"

    async def check(self) -> dict[str, Any]:
        started = time.perf_counter()
        problem = await self.consumer.reachable()
        if problem is None and self.consumer.state not in {"running", "waiting_for_postgresql"}:
            problem = self.consumer.state
        if problem is not None:
            return {"status": "unhealthy", "bootstrap": self.bootstrap, "error": problem}
        return {
            "status": "healthy",
            "bootstrap": self.bootstrap,
            "latency_ms": round((time.perf_counter() - started) * 1000, 3),
        }


@dataclass
class IngestionProbe:
    pipeline: IngestPipeline
    dead_letters: DeadLetterStore
    transports: Sequence[str]
    name: str = "ingestion"

    async def check(self) -> dict[str, Any]:
        documents = {t: self.pipeline.stats(t).document() for t in self.transports}
        running = [d["state"] == "running" for d in documents.values()]
        if all(running):
            status = "healthy"
        elif any(running):
            status = "degraded"  # the other transport carries the same records
        else:
            status = "unhealthy"
        result: dict[str, Any] = {"status": status, "transports": documents}
        try:
            with postgres_errors("-"):
                result["dead_letters"] = await self.dead_letters.counts()
        except DatabaseServiceError as exc:
            result["dead_letters"] = {"error": exc.message}
        return result
