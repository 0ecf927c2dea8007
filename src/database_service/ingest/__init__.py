"""Ingestion of market data over NATS JetStream and Kafka, stored exactly once.

``records`` decodes (pure), ``writer`` stores one tenant's records idempotently as its role,
``pipeline`` ties decoding, authentication, tenant checks, retries and dead letters together,
``jetstream`` and ``kafka_group`` are the two consumers, ``deadletters`` the table behind them.
"""

from typing import TYPE_CHECKING

from database_service.ingest.deadletters import DeadLetter, DeadLetterStore, NewDeadLetter
from database_service.ingest.pipeline import (
    Inbound,
    IngestPipeline,
    ReplayReport,
    TransportStats,
    Verdict,
)
from database_service.ingest.records import BadPayload, Decoded, Rejected, decode
from database_service.ingest.writer import IngestWriter, StoreResult
from database_service.lazy import lazy_exports

if TYPE_CHECKING:
    from database_service.ingest.jetstream import JetStreamIngest, JetStreamSettings
    from database_service.ingest.kafka_group import KafkaIngest, KafkaSettings
    from database_service.ingest.probe import IngestionProbe, KafkaProbe

# The transports import nats-py and aiokafka (about a second): only a process that consumes, or
# probes them, pays for that (an admin command does not).
_TRANSPORTS = {
    "JetStreamIngest": "jetstream",
    "JetStreamSettings": "jetstream",
    "KafkaIngest": "kafka_group",
    "KafkaSettings": "kafka_group",
    "IngestionProbe": "probe",
    "KafkaProbe": "probe",
}


__getattr__ = lazy_exports(__name__, _TRANSPORTS)


__all__ = [
    "BadPayload",
    "DeadLetter",
    "DeadLetterStore",
    "Decoded",
    "Inbound",
    "IngestPipeline",
    "IngestWriter",
    "IngestionProbe",
    "JetStreamIngest",
    "JetStreamSettings",
    "KafkaIngest",
    "KafkaProbe",
    "KafkaSettings",
    "NewDeadLetter",
    "Rejected",
    "ReplayReport",
    "StoreResult",
    "TransportStats",
    "Verdict",
    "decode",
]
