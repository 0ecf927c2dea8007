"""Child servers the service starts itself when no external ones are configured."""

from database_service.supervisor.nats import EmbeddedNats, free_port
from database_service.supervisor.postgres import EmbeddedPostgres

__all__ = ["EmbeddedNats", "EmbeddedPostgres", "free_port"]
