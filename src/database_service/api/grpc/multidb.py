"""gRPC ``MultiDatabase`` (proto/database_service/v1/multidb.proto): ``Execute`` runs one
operation across the stores for the tenant named by the call's ``x-tenant-id``, through
``application.multidb``. The operation and the answer are JSON in bytes fields; JSON that does
not parse is ``invalid_request`` before anything runs."""

from __future__ import annotations

import logging

import grpc
import orjson

from database_service.api.grpc.calls import Caller, rpc
from database_service.app import Application
from database_service.errors import InvalidRequest
from database_service.jsonvalues import dumps
from database_service_client._proto import multidb_pb2 as pb
from database_service_client._proto.multidb_pb2_grpc import MultiDatabaseServicer

__all__ = ["MULTIDB_SERVICE", "MultiDatabaseService"]

log = logging.getLogger(__name__)

MULTIDB_SERVICE = pb.DESCRIPTOR.services_by_name["MultiDatabase"].full_name


class MultiDatabaseService(MultiDatabaseServicer):
    def __init__(self, core: Application) -> None:
        self.core = core
        self.caller = Caller(core)

    @rpc
    async def Execute(
        self, request: pb.MultiDbRequest, context: grpc.aio.ServicerContext
    ) -> pb.MultiDbResponse:
        principal, ctx = await self.caller.tenant(context)
        try:
            operation = orjson.loads(request.operation_json) if request.operation_json else None
        except orjson.JSONDecodeError:
            raise InvalidRequest("operation_json is not valid JSON (UTF-8)") from None
        answer = await self.core.multidb.execute(principal, ctx, operation)
        # A tenant's values may be past what orjson writes (jsonb nesting, big integers).
        return pb.MultiDbResponse(result_json=dumps(answer))
