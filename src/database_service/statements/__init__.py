"""Statement statistics per tenant and the slow-query log (issue #15).

- ``stats``: figures per statement fingerprint, recorded on the request path in O(1);
- ``shared``: the figures of every serving process of an instance, through the run directory;
- ``slowlog``: statements over their tenant's threshold, with their plans, taken in the
  background;
- ``predicates``/``advice``: index advice from the slow statements' predicates, confirmed with
  hypothetical indexes (hypopg) where PostgreSQL has them; index builds on an explicit call;
- ``service``: the use cases the front ends and the CLI call (who may read, reset, configure).
"""

from database_service.statements.advice import IndexAdvisor
from database_service.statements.service import ORDERS, StatementAdmin
from database_service.statements.shared import SharedFigures
from database_service.statements.slowlog import SlowQuery, SlowQueryLog, StatementSettings
from database_service.statements.stats import StatementFigures, StatementStats

__all__ = [
    "ORDERS",
    "IndexAdvisor",
    "SharedFigures",
    "SlowQuery",
    "SlowQueryLog",
    "StatementAdmin",
    "StatementFigures",
    "StatementSettings",
    "StatementStats",
]
