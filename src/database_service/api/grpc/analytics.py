"""gRPC ``AnalyticsReports``: the ready-made reports on ClickHouse (``analytics/reports.py``),
registered beside ``DatabaseService`` on the same server."""

from __future__ import annotations

import logging

import grpc

from database_service.analytics.reports import ReportParams
from database_service.api.grpc.calls import Caller, rpc, tolerant
from database_service.api.grpc.encoding import result_message
from database_service.app import Application
from database_service.errors import FailedPrecondition
from database_service.moments import timestamp_field as _time
from database_service.observability.notices import Notices
from database_service_client._proto import analytics_pb2 as apb
from database_service_client._proto import database_service_pb2 as pb
from database_service_client._proto.analytics_pb2_grpc import AnalyticsReportsServicer

__all__ = ["SERVICE_NAME", "AnalyticsReportsService", "add_analytics_servicer"]

log = logging.getLogger(__name__)
SERVICE_NAME = apb.DESCRIPTOR.services_by_name["AnalyticsReports"].full_name


class AnalyticsReportsService(AnalyticsReportsServicer):
    def __init__(self, core: Application) -> None:
        self.core = core
        self.caller = Caller(core)
        self.notices = Notices(log)

    @rpc
    async def GetReport(
        self, request: apb.ReportRequest, context: grpc.aio.ServicerContext
    ) -> pb.AnalyticsResult:
        principal, ctx = await self.caller.tenant(context)
        if self.core.analytics is None:
            raise FailedPrecondition(
                "ClickHouse analytics is not enabled on this service (DBSVC_CLICKHOUSE_ENABLED)"
            )
        params = ReportParams(
            symbol=request.symbol or None,
            start=_time(request, "start"),
            end=_time(request, "end"),
            interval_minutes=request.interval_minutes or 60,
            price_decimals=request.price_decimals if request.HasField("price_decimals") else 3,
            horizon_minutes=request.horizon_minutes or 60,
        )
        result = await self.core.analytics.analytics.report(principal, ctx, request.name, params)
        packed = request.row_encoding == pb.ROW_ENCODING_PACKED
        return result_message(result, pb.AnalyticsResult, packed=packed)


def add_analytics_servicer(servicer: AnalyticsReportsService, server: grpc.aio.Server) -> None:
    """The generated registration, with a request that does not decode turned into
    ``invalid_request`` (as for DatabaseService)."""
    handler = grpc.unary_unary_rpc_method_handler(
        servicer.GetReport,
        request_deserializer=tolerant(apb.ReportRequest.FromString, "ReportRequest"),
        response_serializer=pb.AnalyticsResult.SerializeToString,
    )
    handlers = {"GetReport": handler}
    # Generic only, as every service of ours: see ``server.GenericOnly``.
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
