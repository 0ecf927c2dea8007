"""The gRPC front end."""

from database_service.api.grpc.server import GrpcServer

__all__ = ["GrpcServer"]
