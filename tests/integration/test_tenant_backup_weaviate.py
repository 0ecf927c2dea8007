"""A tenant's export carries its vector collections kept on Weaviate (on pgvector they are tables
of its schema and go with them), and a restore brings them back: every object with its id,
vector and properties, paged through Weaviate's cursor both ways. The store has no transaction,
so the restore loads the collections last, inside the PostgreSQL transaction, and a target that
already has collections there is refused instead of replaced; a collection that fails to load
leaves nothing on either side."""

from __future__ import annotations

import hashlib
import json
import math
import secrets
import zipfile
from pathlib import Path
from typing import Any

import pytest

from database_service.app import Application
from database_service.auth.tokens import everything
from database_service.backup.archive import sign
from database_service.errors import BackupTargetNotEmpty, BackupUnsupported
from database_service.query import TenantContext
from database_service.stores.vector.model import InvalidVector, SearchQuery
from database_service.stores.vector.weaviate import WeaviateVectorStore
from database_service.tenancy.secrets import derive_key
from tests.fix_service import MASTER_KEY
from tests.fix_weaviate import Stack

pytestmark = [pytest.mark.integration, pytest.mark.weaviate]

OPERATOR = everything(service="backup-weaviate-test")
PROPERTIES = {
    "symbol": "text",
    "qty": "int",
    "score": "number",
    "live": "bool",
    "at": "date",
    "ref": "uuid",
    "tags": "text[]",
}


def store_of(core: Application) -> WeaviateVectorStore:
    store = core.vector_store
    assert isinstance(store, WeaviateVectorStore)
    return store


async def objects_of(core: Application, tenant_id: str, name: str) -> dict[str, Any]:
    store = store_of(core)
    [info] = [i for i in await store.tenant_collections(tenant_id) if i.name == name]
    found: dict[str, Any] = {}
    async for page in store.export_objects(tenant_id, info, page=97):
        for o in page:
            found[o["id"]] = (o["vector"], o["properties"])
    return found


async def tenant_with_collections(core: Application, n: int) -> str:
    tenant_id = (await core.tenants.create(f"bkwv_{secrets.token_hex(4)}")).tenant_id
    ctx = TenantContext(tenant_id)
    await core.vectors.create_collection(OPERATOR, ctx, "Signals", 3, "l2", PROPERTIES)
    await core.vectors.create_collection(OPERATOR, ctx, "empty", 2, "cosine", {})
    objects = [
        {
            "vector": [i / 7, -i / 11, 0.5],
            "properties": {
                "symbol": f"S{i % 13}",
                "qty": i,
                "score": i * 0.25,
                "live": i % 2 == 0,
                "at": f"2026-12-0{1 + i % 3}T10:00:{i % 60:02d}+00:00",
                "ref": str(secrets.token_hex(16)[:8] + "-0000-4000-8000-000000000000"),
                "tags": [f"t{i % 3}", "x"],
            }
            if i % 50
            else {"symbol": "sparse"},  # properties left out stay left out
        }
        for i in range(n)
    ]
    for start in range(0, n, 400):
        await core.vectors.upsert(OPERATOR, ctx, "Signals", objects[start : start + 400])
    await core.executor.execute(
        OPERATOR,
        ctx,
        "INSERT INTO users (user_id, email, subscription_tier) VALUES ('u1', 'a@b', 'pro')",
    )
    return tenant_id


async def test_an_export_carries_the_weaviate_collections_and_a_restore_brings_them_back(
    weaviate_stack: Stack, tmp_path: Path
) -> None:
    core = weaviate_stack.core
    source = await tenant_with_collections(core, 1203)  # pages of 500: three requests and more
    before = await objects_of(core, source, "Signals")
    assert len(before) == 1203
    file = tmp_path / "wv.dbsvc-backup"
    manifest = await core.tenant_backups.export(OPERATOR, source, file)
    collections = {c["name"]: c for c in manifest["collections"]}
    assert collections["Signals"]["objects"] == 1203 and collections["empty"]["objects"] == 0
    assert collections["Signals"]["store"] == "weaviate"
    assert collections["Signals"]["properties"] == PROPERTIES
    assert manifest["format_version"] == 2

    target = f"bkwv_copy_{secrets.token_hex(3)}"
    report = await core.tenant_backups.restore(OPERATOR, file, into=target)
    assert report.created
    after = await objects_of(core, target, "Signals")
    assert after.keys() == before.keys()
    for oid, (vector, properties) in before.items():
        got_vector, got_properties = after[oid]
        assert all(
            math.isclose(a, b, rel_tol=1e-6) for a, b in zip(vector, got_vector, strict=True)
        )
        assert got_properties == properties
    infos = {i.name: i for i in await store_of(core).tenant_collections(target)}
    assert infos.keys() == {"Signals", "empty"}
    assert infos["Signals"].metric.value == "l2" and infos["empty"].dimension == 2
    # Searchable as any collection, and the source is untouched.
    hits = await core.vectors.search(
        OPERATOR, TenantContext(target), "Signals", SearchQuery(vector=[0.0, 0.0, 0.5], limit=1)
    )
    assert str(hits[0].id) in before
    assert await objects_of(core, source, "Signals") == before
    rows = await core.executor.execute(OPERATOR, TenantContext(target), "SELECT user_id FROM users")
    assert [list(r) for r in rows.rows] == [["u1"]]


async def test_a_target_with_weaviate_collections_is_refused_even_with_replace(
    weaviate_stack: Stack, tmp_path: Path
) -> None:
    core = weaviate_stack.core
    source = await tenant_with_collections(core, 20)
    file = tmp_path / "busy.dbsvc-backup"
    await core.tenant_backups.export(OPERATOR, source, file)
    target = (await core.tenants.create(f"bkwv_busy_{secrets.token_hex(3)}")).tenant_id
    await core.vectors.create_collection(OPERATOR, TenantContext(target), "Mine", 2, "cosine", {})
    await core.vectors.upsert(
        OPERATOR, TenantContext(target), "Mine", [{"id": None, "vector": [1.0, 0.0]}]
    )
    for replace in (False, True):
        with pytest.raises(BackupTargetNotEmpty, match="vector collections"):
            await core.tenant_backups.restore(OPERATOR, file, into=target, replace=replace)
    assert [i.name for i in await store_of(core).tenant_collections(target)] == ["Mine"]
    assert len(await objects_of(core, target, "Mine")) == 1


async def test_a_collection_that_fails_to_load_leaves_nothing_on_either_side(
    weaviate_stack: Stack, tmp_path: Path
) -> None:
    """A file signed with this deployment's key whose last object has the wrong dimension: the
    objects before it were written to Weaviate, then the failure rolls the PostgreSQL part
    back, the collections made are dropped and the tenant created for the restore is gone."""
    core = weaviate_stack.core
    source = await tenant_with_collections(core, 620)
    file = tmp_path / "good.dbsvc-backup"
    await core.tenant_backups.export(OPERATOR, source, file)
    wrong = tmp_path / "wrong.dbsvc-backup"
    key = derive_key(MASTER_KEY, "tenant-backups")
    with zipfile.ZipFile(file) as src, zipfile.ZipFile(wrong, "w") as dst:
        manifest = json.loads(src.read("manifest.json"))
        signals = next(c for c in manifest["collections"] if c["name"] == "Signals")
        for item in src.infolist():
            if item.filename == "manifest.json":
                continue
            data = src.read(item)
            if item.filename == signals["member"]:
                data += json.dumps({"id": None, "vector": [1.0], "properties": {}}).encode() + b"\n"
                signals["objects"] += 1
                signals["bytes"] = len(data)
                signals["sha256"] = hashlib.sha256(data).hexdigest()
            dst.writestr(item, data)
        manifest["signature"] = sign(manifest, key)
        dst.writestr("manifest.json", json.dumps(manifest))
    target = f"bkwv_fail_{secrets.token_hex(3)}"
    with pytest.raises(InvalidVector):
        await core.tenant_backups.restore(OPERATOR, wrong, into=target)
    assert await core.registry.find(target) is None
    assert await store_of(core).tenant_collections(target) == []


async def test_a_file_with_weaviate_collections_is_refused_where_there_is_no_weaviate(
    weaviate_stack: Stack, core: Application, tmp_path: Path
) -> None:
    assert not isinstance(core.vector_store, WeaviateVectorStore)  # the session's: pgvector
    source = await tenant_with_collections(weaviate_stack.core, 5)
    file = tmp_path / "elsewhere.dbsvc-backup"
    await weaviate_stack.core.tenant_backups.export(OPERATOR, source, file)
    target = f"bkwv_pg_{secrets.token_hex(3)}"
    with pytest.raises(BackupUnsupported, match="DBSVC_WEAVIATE_URL"):
        await core.tenant_backups.restore(OPERATOR, file, into=target)
    assert await core.registry.find(target) is None
