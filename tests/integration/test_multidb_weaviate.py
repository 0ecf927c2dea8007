"""The vector part of ``execute_multi_db_operation`` on a real Weaviate server: Weaviate is
outside PostgreSQL, so its writes go through the outbox (applied after the commit, by id, so an
entry applied twice writes the same object), and a Weaviate part that fails is reported per
part while the PostgreSQL part stays committed."""

from __future__ import annotations

import secrets
import uuid

import pytest

from database_service.auth import Scope
from database_service_client import MultiDatabaseClient
from tests.fix_weaviate import Stack
from tests.isolation.fix_frontends import service_token

pytestmark = [pytest.mark.integration, pytest.mark.weaviate]


async def test_the_vector_part_goes_through_the_outbox_on_weaviate(weaviate_stack: Stack) -> None:
    core = weaviate_stack.core
    assert core.vectors.store.kind == "weaviate"
    tenant = await core.tenants.create(f"mdbwv_{secrets.token_hex(4)}")
    tid = tenant.tenant_id
    token = await service_token(core, [tid], (Scope.READ, Scope.WRITE, Scope.ADMIN))
    async with MultiDatabaseClient(weaviate_stack.grpc_target, tid, token, retries=0) as client:
        await client.vector_create_collection("Signals", 3, properties={"symbol": "text"})
        object_id = str(uuid.uuid4())
        result = await client.execute_multi_db_operation(
            {
                "postgresql": {
                    "query": "INSERT INTO trading_signals (signal_id, symbol, action)"
                    " VALUES (:signal_id, :symbol, :action)",
                    "params": {"signal_id": "sig-wv", "symbol": "EURUSD", "action": "buy"},
                },
                "weaviate": {
                    "operation": "upsert",
                    "class": "Signals",
                    "objects": [
                        {
                            "id": object_id,
                            "vector": [0.1, 0.2, 0.3],
                            "properties": {"symbol": "EURUSD"},
                        }
                    ],
                },
            }
        )
        outcome = result.outcomes["weaviate"]
        assert (outcome.status, outcome.atomic) == ("applied", False)
        assert outcome.entry_id is not None and result["weaviate"] == 1
        assert result.outcomes["postgresql"].atomic
        # Applied again (a crash before the mark): the same object, not a second one.
        table = f"{core.settings.control_schema}.multidb_outbox"
        await core.owner_pool.execute(
            f"UPDATE {table} SET status = 'pending' WHERE id = $1", outcome.entry_id
        )
        assert (await core.multidb_outbox.apply(outcome.entry_id)).status == "applied"
        assert await client.vector_count("Signals") == 1
        found = await client.execute_multi_db_operation(
            {
                "weaviate": {
                    "operation": "similarity_search",
                    "class": "Signals",
                    "vector": [0.1, 0.2, 0.3],
                }
            }
        )
        assert [h["id"] for h in found["weaviate"]["results"]] == [object_id]
        # A collection Weaviate does not have: the part fails, PostgreSQL's stays committed.
        result = await client.execute_multi_db_operation(
            {
                "postgresql": {"query": "INSERT INTO users VALUES ('wv1', 'w@x', 'pro')"},
                "weaviate": {
                    "operation": "upsert",
                    "class": "Nowhere",
                    "objects": [{"vector": [1.0, 0.0, 0.0]}],
                },
            }
        )
        assert result.outcomes["weaviate"].status == "failed"
        assert (await client.fetch_all("SELECT count(*) FROM users")).rows == [(1,)]
