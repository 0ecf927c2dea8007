"""Attacks on the compiled gRPC front (api/grpc/front.py): calls of several tenants and users in
flight at once on one connection and on many, answered from PostgreSQL and from the result
cache, cancelled or timed out among the others. Each caller gets only its own answer; nothing a
call left behind is seen by the next one."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import grpc
import pytest

from database_service.app import Application
from database_service.tenancy import TenantRecord
from database_service_client._proto import database_service_pb2 as pb
from database_service_client._proto import database_service_pb2_grpc as pb_grpc
from database_service_client.values import from_row
from tests.isolation.fix_attack import SECRET, Tenants

pytestmark = pytest.mark.usefixtures("unchanged_victim")

WHO = "SELECT current_user, $1::int, (SELECT count(*) FROM users WHERE email LIKE '%' || $2 || '%')"


@pytest.fixture
async def channel(grpc_target: str) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(grpc_target) as channel:
        yield channel


def metadata(headers: dict[str, str], tenant: TenantRecord, user: str | None = None) -> tuple:
    md = [("authorization", headers["Authorization"]), ("x-tenant-id", tenant.tenant_id)]
    if user is not None:
        md.append(("x-user-id", user))
    return tuple(md)


@pytest.mark.parametrize("cached", [False, True], ids=["postgres", "cache"])
async def test_answers_of_two_tenants_and_their_users_in_flight_at_once_never_cross(
    tenants: Tenants, grpc_target: str, cached: bool
) -> None:
    callers = [
        (tenants.a, tenants.a_headers, None),
        (tenants.a, tenants.a_headers, "a-user"),
        (tenants.b, tenants.b_headers, None),
        (tenants.b, tenants.b_headers, "b-user"),
    ]
    # One connection shared by all the callers, and one each: both multiplexings.
    shared = grpc.aio.insecure_channel(grpc_target)
    own = [grpc.aio.insecure_channel(grpc_target) for _ in callers]

    async def one(i: int) -> None:
        which = i % len(callers)
        tenant, headers, user = callers[which]
        stub = pb_grpc.DatabaseServiceStub(shared if i % 2 else own[which])
        request = pb.QueryRequest(sql=WHO, cache_ttl_ms=60_000 if cached else 0)
        request.params.add().int_value = i % 7  # few distinct: the cache answers most
        request.params.add().string_value = SECRET
        await asyncio.sleep(random.random() / 200)
        result = await stub.Query(request, metadata=metadata(headers, tenant, user))
        role, echoed, secrets_seen = from_row(result.rows.rows[0])
        # A user id logs in as the tenant's user role (row-level security by user).
        assert (role, echoed) == (tenant.role_name + ("_u" if user else ""), i % 7)
        # Only B's own calls see B's row; A's never do.
        assert secrets_seen == (1 if tenant is tenants.b else 0)

    try:
        await asyncio.gather(*(one(i) for i in range(400)))
    finally:
        for channel in (shared, *own):
            await channel.close()


async def test_calls_cut_short_among_others_leave_nothing_for_the_next_caller(
    core: Application, tenants: Tenants, channel: grpc.aio.Channel
) -> None:
    """A's calls that time out or are cancelled mid-statement, while B's run on the same
    connection: B's answers are B's, and A's next calls get A's own connections back clean."""
    stub = pb_grpc.DatabaseServiceStub(channel)
    a_md = metadata(tenants.a_headers, tenants.a)
    b_md = metadata(tenants.b_headers, tenants.b)

    async def a_timing_out() -> None:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Query(
                pb.QueryRequest(
                    sql="SELECT set_config('dbsvc.user_id', 'b-user', false), pg_sleep(5)"
                ),
                metadata=a_md,
                timeout=0.2,
            )
        assert info.value.code() in (
            grpc.StatusCode.DEADLINE_EXCEEDED,
            grpc.StatusCode.PERMISSION_DENIED,  # the guard may refuse set_config first
            grpc.StatusCode.INVALID_ARGUMENT,
        )

    async def a_cancelled() -> None:
        call = stub.Query(pb.QueryRequest(sql="SELECT pg_sleep(5)"), metadata=a_md)
        await asyncio.sleep(0.1)
        call.cancel()

    async def b_reading() -> None:
        result = await stub.Query(
            pb.QueryRequest(sql="SELECT current_user, count(*) FROM users"), metadata=b_md
        )
        assert from_row(result.rows.rows[0])[0] == tenants.b.role_name

    await asyncio.gather(
        *(a_timing_out() for _ in range(4)),
        *(a_cancelled() for _ in range(4)),
        *(b_reading() for _ in range(20)),
    )
    for _ in range(10):  # A's connections, reused: no session state of the calls cut short
        result = await stub.Query(
            pb.QueryRequest(
                sql="SELECT current_user, current_setting('dbsvc.user_id', true),"
                " (SELECT count(*) FROM users WHERE email LIKE '%VICTIM%')"
            ),
            metadata=a_md,
        )
        role, user_id, seen = from_row(result.rows.rows[0])
        assert role == tenants.a.role_name
        assert user_id in (None, "")
        assert seen == 0
