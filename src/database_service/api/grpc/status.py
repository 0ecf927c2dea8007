"""The gRPC boundary for errors: the service's error tree to gRPC status codes with details.

Each error becomes its status code (``errors.grpc_status_of``) with a ``google.rpc.Status`` in
``grpc-status-details-bin`` carrying an ``ErrorInfo`` (reason: the stable error code; metadata:
sqlstate, position), and the same facts as plain trailing metadata (``dbsvc-error-code``,
``dbsvc-sqlstate``, ``dbsvc-position``) for clients without the googleapis protos.
"""

from __future__ import annotations

from typing import NoReturn

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from database_service.errors import DatabaseServiceError, grpc_status_of

__all__ = ["abort_with"]

DOMAIN = "database-service"


async def abort_with(context: grpc.aio.ServicerContext, exc: DatabaseServiceError) -> NoReturn:
    code: grpc.StatusCode = getattr(grpc.StatusCode, grpc_status_of(exc))
    info = error_details_pb2.ErrorInfo(reason=exc.error_code, domain=DOMAIN)
    trailing: list[tuple[str, str | bytes]] = [("dbsvc-error-code", exc.error_code)]
    if exc.sqlstate is not None:
        info.metadata["sqlstate"] = exc.sqlstate
        trailing.append(("dbsvc-sqlstate", exc.sqlstate))
    if exc.position is not None:
        info.metadata["position"] = str(exc.position)
        trailing.append(("dbsvc-position", str(exc.position)))
    detail = any_pb2.Any()
    detail.Pack(info)
    status = status_pb2.Status(code=code.value[0], message=exc.message, details=[detail])
    trailing.append(("grpc-status-details-bin", status.SerializeToString()))
    await context.abort(code, exc.message, trailing_metadata=tuple(trailing))
    raise AssertionError("context.abort returns only by raising")  # for the type checker
