"""The PostgreSQL wire port (issue #16): any PostgreSQL driver, tenant-isolated, with
transaction pooling on the tenant's own role.

``codec`` (messages as pure functions), ``scram`` (SCRAM-SHA-256), ``backend`` (a raw server
connection), ``pooling`` (per-role pools lent per transaction), ``policy`` (the SQL guard and
scopes per statement) and ``server`` (the listener and its client sessions).
"""

from database_service.pgwire.server import PgWireServer, listening

__all__ = ["PgWireServer", "listening"]
