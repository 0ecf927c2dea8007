"""The application layer: the use cases every front end calls.

Each use case authorizes and audits itself (``access.Access``), so REST, gRPC, the CLI and the
front ends still to come are thin adapters that cannot forget a check: they turn a request into
a call and a result or an error into their protocol. Queries, transactions and bulk writes are
the query core's (``query.QueryExecutor``, which does the same); the rest is here.
"""

from database_service.application.access import Access
from database_service.application.deadletters import DeadLetterAdmin
from database_service.application.keyvalue import KeyValueOps
from database_service.application.observability import Observability
from database_service.application.partitions import PartitionAdmin
from database_service.application.services import IssuedToken, ServiceAdmin
from database_service.application.tenants import TenantAdmin
from database_service.application.timeseries import SERIES_COLUMNS, TimeSeries

__all__ = [
    "SERIES_COLUMNS",
    "Access",
    "DeadLetterAdmin",
    "IssuedToken",
    "KeyValueOps",
    "Observability",
    "PartitionAdmin",
    "ServiceAdmin",
    "TenantAdmin",
    "TimeSeries",
]
