"""The Central Hub (issue #15): registration, heartbeats with the health document, and tenant
configuration updates received from it (``contract`` says what travels, ``agent`` talks to the
hub; ``application.hub`` applies updates, whichever way they arrive)."""

from database_service.hub.agent import HubAgent, HubError
from database_service.hub.contract import parse_updates

__all__ = ["HubAgent", "HubError", "parse_updates"]
