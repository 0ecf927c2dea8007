"""Health document, Prometheus metrics, audit log and request statistics."""

from database_service.observability.audit import AuditEvent, AuditLog
from database_service.observability.health import HealthReporter, NatsProbe, PostgresProbe
from database_service.observability.metrics import Metrics
from database_service.observability.window import RequestWindow

__all__ = [
    "AuditEvent",
    "AuditLog",
    "HealthReporter",
    "Metrics",
    "NatsProbe",
    "PostgresProbe",
    "RequestWindow",
]
