"""Health document, Prometheus metrics, audit log, request statistics and structured logs."""

from database_service.observability.audit import AuditEvent, AuditLog
from database_service.observability.health import HealthReporter, NatsProbe, PostgresProbe
from database_service.observability.logs import (
    bind_request,
    configure_logging,
    current_request_id,
    sql_parameters,
)
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
    "bind_request",
    "configure_logging",
    "current_request_id",
    "sql_parameters",
]
