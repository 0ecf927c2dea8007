"""Per-tenant export and restore, as the tenant's own role.

**Export** runs on a connection of the tenant's company-wide login (``TenantPools``), in one
``REPEATABLE READ, READ ONLY`` transaction (one snapshot for every table). PostgreSQL decides
what it can see, not this module: its schema (the only one its role reaches) and, through the
forced row-level security of the shared tables, its own rows of them. The file holds, per
table, a binary COPY stream (``COPY (SELECT …) TO STDOUT``); for shared tables without the
``company_id`` column, so a file carries no tenant key at all. Definitions of what the tenant
created itself (tables, sequences, views, functions, triggers) are generated from the catalog as
the tenant sees it; what the tenant migrations create is not stored, the restore path creates it.

**Restore** creates the tenant through the normal creation path when it does not exist (same
migrations, fresh opaque names and secret), then loads everything in one transaction of the
tenant's own login: the tenant's objects, its tables by COPY (in foreign-key order), the shared
tables through a staging table of its schema (COPY cannot target a table under row-level
security) with ``company_id`` left to its default, ``session_company()``: rows are keyed to the
tenant doing the restore, whatever the file says, and the policies' WITH CHECK would refuse
anything else. Sequences get their values back. Any failure rolls the transaction back, and a
tenant created for the restore is deleted again: all or nothing.

Derived tables (the shared ``candles_1m``, which tenants may only read) are not exported: the
triggers on the restored ticks rebuild them.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import graphlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import asyncpg

from database_service import __version__
from database_service.backup.archive import (
    FORMAT,
    FORMAT_VERSION,
    ArchiveReader,
    ArchiveWriter,
)
from database_service.errors import (
    BackupCorrupt,
    BackupTargetNotEmpty,
    BackupUnsupported,
    TenantSuspended,
)
from database_service.postgres import Connection, TenantPools
from database_service.stores.vector.model import CollectionInfo, Metric, PropertyType
from database_service.tenancy import TenantLimits, TenantManager, TenantRecord, TenantRegistry
from database_service.tenancy.ids import quote_ident, quote_literal, validate_tenant_id
from database_service.tenancy.migrations import Migrator
from database_service.tenancy.secrets import TenantLogins

__all__ = [
    "BackupProgress",
    "ExternalCollections",
    "ProgressCallback",
    "RestoreReport",
    "TenantBackups",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class BackupProgress:
    """Where an export or restore is: rows and bytes done of the total (an export learns its
    totals from a count in the same snapshot first), and the table at hand."""

    phase: str  # "export" | "verify" | "restore"
    table: str
    rows_done: int
    rows_total: int
    bytes_done: int = 0
    bytes_total: int = 0


ProgressCallback = Callable[[BackupProgress], None]


class ExternalCollections(Protocol):
    """Vector collections kept outside PostgreSQL (Weaviate: ``WeaviateVectorStore``). On
    pgvector they are tables of the tenant's schema, exported as any table is."""

    kind: str

    async def tenant_collections(self, tenant_id: str) -> list[CollectionInfo]: ...

    def export_objects(
        self, tenant_id: str, info: CollectionInfo
    ) -> AsyncIterator[list[dict[str, Any]]]: ...

    async def restore_collection(self, tenant_id: str, info: CollectionInfo) -> None: ...

    async def restore_objects(
        self, tenant_id: str, info: CollectionInfo, objects: list[dict[str, Any]]
    ) -> int: ...

    async def drop_tenant(self, tenant_id: str) -> int: ...


@dataclass(frozen=True, slots=True)
class RestoreReport:
    tenant_id: str
    source_tenant_id: str
    created: bool
    replaced: bool
    rows: int
    tables: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "tenant_id": self.tenant_id,
            "source_tenant_id": self.source_tenant_id,
            "created": self.created,
            "replaced": self.replaced,
            "rows": self.rows,
            "tables": self.tables,
            "seconds": round(self.seconds, 3),
        }


_OBJECTS_PER_BATCH = 500  # vector objects per write to the store on restore


def _member(index: int) -> str:
    return f"data/{index:04d}.copy"


def _collection_member(index: int) -> str:
    return f"vectors/{index:04d}.jsonl"


def _collection_info(entry: dict[str, Any]) -> CollectionInfo:
    return CollectionInfo(
        entry["name"],
        int(entry["dimension"]),
        Metric(entry["metric"]),
        {p: PropertyType(k) for p, k in entry["properties"].items()},
    )


def _qualified(schema: str, name: str) -> str:
    return f"{quote_ident(schema)}.{quote_ident(name)}"


# The catalog as the tenant sees it. ``$1`` is the tenant's schema. What the schema's owner (the
# service) owns came from the tenant migrations; anything else the tenant created.
_TABLES = """
SELECT c.oid, c.relname, c.relkind::text, c.relpersistence::text, c.relispartition,
       c.relowner <> (SELECT nspowner FROM pg_namespace WHERE oid = c.relnamespace) AS own
FROM pg_class c
WHERE c.relnamespace = (SELECT oid FROM pg_namespace WHERE nspname = $1)
  AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'c')
ORDER BY c.oid
"""
_COLUMNS = """
SELECT a.attname, format_type(a.atttypid, a.atttypmod) AS type, a.attnotnull,
       EXISTS (SELECT 1 FROM pg_type ty LEFT JOIN pg_type el ON el.oid = ty.typelem
               WHERE ty.oid = a.atttypid
                 AND 'pg_catalog'::regnamespace NOT IN (ty.typnamespace,
                                                        coalesce(el.typnamespace, ty.typnamespace))
              ) AS custom,
       pg_get_expr(d.adbin, d.adrelid) AS default_expr, a.attidentity::text,
       a.attgenerated::text
FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
"""
_CONSTRAINTS = """
SELECT conname, contype::text, pg_get_constraintdef(oid) AS def FROM pg_constraint
WHERE conrelid = $1 AND contype IN ('p', 'u', 'c', 'x', 'f')
ORDER BY contype = 'f', oid
"""
_INDEXES = """
SELECT pg_get_indexdef(i.indexrelid) AS def FROM pg_index i
WHERE i.indrelid = $1
  AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = i.indexrelid
                  AND k.conrelid = i.indrelid)
ORDER BY i.indexrelid
"""
_REFERENCES = """
SELECT c.conrelid::int AS child, c.confrelid::int AS parent FROM pg_constraint c
WHERE c.contype = 'f' AND c.connamespace = (SELECT oid FROM pg_namespace WHERE nspname = $1)
"""
_SEQUENCES = """
SELECT c.relname,
       c.relowner <> (SELECT nspowner FROM pg_namespace WHERE oid = c.relnamespace) AS own,
       format_type(s.seqtypid, NULL) AS type, s.seqstart, s.seqincrement, s.seqmin, s.seqmax,
       s.seqcache, s.seqcycle,
       (SELECT d.deptype::text FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
          AND d.objid = c.oid AND d.refclassid = 'pg_class'::regclass
          AND d.deptype IN ('a', 'i') LIMIT 1) AS deptype,
       (SELECT r.relname || '.' || a.attname FROM pg_depend d
          JOIN pg_class r ON r.oid = d.refobjid
          JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
          WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
          AND d.refclassid = 'pg_class'::regclass AND d.deptype = 'a' LIMIT 1) AS owned_by
FROM pg_class c JOIN pg_sequence s ON s.seqrelid = c.oid
WHERE c.relnamespace = (SELECT oid FROM pg_namespace WHERE nspname = $1)
ORDER BY c.oid
"""
_FUNCTIONS = """
SELECT p.proname, p.prokind::text, p.oid::regprocedure::text AS signature,
       pg_get_functiondef(p.oid) AS def
FROM pg_proc p
WHERE p.pronamespace = (SELECT oid FROM pg_namespace WHERE nspname = $1)
  AND p.proowner <> (SELECT nspowner FROM pg_namespace WHERE oid = p.pronamespace)
ORDER BY p.oid
"""
_TRIGGERS = """
SELECT t.tgname, c.relname, pg_get_triggerdef(t.oid) AS def FROM pg_trigger t
JOIN pg_class c ON c.oid = t.tgrelid
WHERE c.relnamespace = (SELECT oid FROM pg_namespace WHERE nspname = $1)
  AND NOT t.tgisinternal AND t.tgname NOT LIKE 'dbsvc\\_%'
ORDER BY t.oid
"""
# Types the tenant created: enums, composites and domains are carried; ranges are refused.
_TYPES = """
SELECT t.oid, t.typname, t.typtype::text,
       (SELECT array_agg(e.enumlabel ORDER BY e.enumsortorder) FROM pg_enum e
          WHERE e.enumtypid = t.oid) AS labels,
       (SELECT array_agg(quote_ident(a.attname) || ' ' || format_type(a.atttypid, a.atttypmod)
                         ORDER BY a.attnum)
          FROM pg_attribute a WHERE a.attrelid = t.typrelid AND a.attnum > 0
          AND NOT a.attisdropped) AS attributes,
       format_type(t.typbasetype, t.typtypmod) AS base, t.typnotnull, t.typdefault,
       (SELECT array_agg('CONSTRAINT ' || quote_ident(k.conname) || ' '
                         || pg_get_constraintdef(k.oid) ORDER BY k.oid)
          FROM pg_constraint k WHERE k.contypid = t.oid AND k.contype = 'c') AS checks
FROM pg_type t
WHERE t.typnamespace = (SELECT oid FROM pg_namespace WHERE nspname = $1)
  AND t.typtype IN ('c', 'e', 'd', 'r', 'm')
  AND NOT EXISTS (SELECT 1 FROM pg_class c WHERE c.reltype = t.oid AND c.relkind <> 'c')
ORDER BY t.oid
"""
# The shared tables keyed by company (the same test the tenant deletion uses).
_SHARED = """
SELECT c.oid, c.relname, has_table_privilege(c.oid, 'INSERT') AS insertable
FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid
WHERE c.relnamespace = (SELECT oid FROM pg_namespace WHERE nspname = $1)
  AND c.relkind IN ('r', 'p') AND NOT c.relispartition
  AND a.attname = 'company_id' AND NOT a.attisdropped
  AND has_table_privilege(c.oid, 'SELECT')
ORDER BY c.relname
"""
_STAGE = "_dbsvc_restore_stage"


class TenantBackups:
    """Export a tenant to one file and restore a file into a tenant (see the module text).
    Authorization is the caller's (``application.tenant_backups``)."""

    def __init__(
        self,
        *,
        pools: TenantPools,
        logins: TenantLogins,
        registry: TenantRegistry,
        manager: TenantManager,
        migrator: Migrator,
        owner_pool: asyncpg.Pool,
        signing_key: bytes,
        directory: Path,
        control_schema: str,
        shared_schema: str,
        vectors: ExternalCollections | None = None,
    ) -> None:
        self._pools = pools
        self._vectors = vectors
        self._logins = logins
        self._registry = registry
        self._manager = manager
        self._migrator = migrator
        self._owner = owner_pool
        self._key = signing_key
        self.directory = directory
        self._control = control_schema
        self._shared = shared_schema

    # ---------------------------------------------------------------- export

    async def export(
        self, tenant_id: str, path: Path, *, progress: ProgressCallback | None = None
    ) -> dict[str, Any]:
        """Write the tenant to ``path`` (whole or not at all); returns the signed manifest."""
        record = await self._registry.get_active(validate_tenant_id(tenant_id))
        versions = await self._owner.fetch(
            f"SELECT version FROM {quote_ident(self._control)}.tenant_migrations"
            " WHERE tenant_id = $1 ORDER BY version",
            record.tenant_id,
        )
        writer = ArchiveWriter(path)
        try:
            async with self._pools.acquire(self._logins.login(record), "bulk") as conn:
                manifest = await self._export_on(conn, record, writer, progress)
            manifest["migrations"] = [r["version"] for r in versions]
            if self._vectors is not None:
                manifest["collections"] = await self._export_collections(
                    record.tenant_id, self._vectors, writer, progress
                )
            return writer.finish(manifest, self._key)
        except BaseException:
            writer.abort()
            raise

    async def _export_collections(
        self,
        tenant_id: str,
        vectors: ExternalCollections,
        writer: ArchiveWriter,
        progress: ProgressCallback | None,
    ) -> list[dict[str, Any]]:
        """The tenant's collections on the external store, one JSON-lines member each (an
        object per line, as ``upsert`` takes it), read a page at a time after the PostgreSQL
        snapshot: the store has no snapshot of its own (see ``export_objects``)."""
        entries = []
        for index, info in enumerate(await vectors.tenant_collections(tenant_id)):
            objects = 0
            with writer.member(_collection_member(index)) as sink:
                async for page in vectors.export_objects(tenant_id, info):
                    lines = b"".join(
                        json.dumps(o, separators=(",", ":")).encode() + b"\n" for o in page
                    )
                    await sink(lines)
                    objects += len(page)
                    if progress is not None:
                        progress(BackupProgress("export", f"vector:{info.name}", objects, objects))
            entries.append(
                {
                    **info.to_dict(),
                    "store": vectors.kind,
                    "member": _collection_member(index),
                    "objects": objects,
                    "bytes": sink.bytes,
                    "sha256": sink.sha256,
                }
            )
        return entries

    async def _export_on(
        self,
        conn: Connection,
        record: TenantRecord,
        writer: ArchiveWriter,
        progress: ProgressCallback | None,
    ) -> dict[str, Any]:
        schema = record.schema_name
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            # The role's own statement limit is for requests; an export of a large tenant is
            # one long COPY per table, watched by the caller instead.
            await conn.execute("SET LOCAL statement_timeout = 0")
            await conn.execute("SET LOCAL idle_in_transaction_session_timeout = 0")
            objects = await self._definitions(conn, schema)
            tables = objects.pop("_copy")
            counts = []
            for table in tables:
                counts.append(await conn.fetchval(f"SELECT count(*) FROM {table['_source']}"))
            total = sum(counts)
            done = 0
            entries: list[dict[str, Any]] = []
            for index, table in enumerate(tables):
                source = table.pop("_source")
                columns = ", ".join(quote_ident(c) for c in table["columns"])
                with writer.member(_member(index)) as sink:
                    status = await conn.copy_from_query(
                        f"SELECT {columns} FROM {source}", output=sink, format=table["format"]
                    )
                rows = int(status.split()[-1])
                done += rows
                entries.append(
                    {
                        **table,
                        "member": _member(index),
                        "rows": rows,
                        "bytes": sink.bytes,
                        "sha256": sink.sha256,
                    }
                )
                if progress is not None:
                    progress(BackupProgress("export", table["name"], done, total))
            sequences = []
            for seq in objects["sequences"]:
                value = await conn.fetchrow(
                    f"SELECT last_value, is_called FROM {_qualified(schema, seq['name'])}"
                )
                assert value is not None
                sequences.append({**seq, "last_value": value[0], "is_called": value[1]})
            objects["sequences"] = sequences
            server = conn.get_server_version()
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "service_version": __version__,
            "postgres_version": f"{server.major}.{server.minor}",
            "tenant_id": record.tenant_id,
            "source_schema": schema,
            "created_at": dt.datetime.now(dt.UTC).isoformat(),
            "limits": {
                "connection_limit": record.limits.connection_limit,
                "statement_timeout_ms": record.limits.statement_timeout_ms,
            },
            "tables": entries,
            "objects": objects,
            "totals": {"rows": done, "bytes": sum(e["bytes"] for e in entries)},
        }

    async def _definitions(self, conn: Connection, schema: str) -> dict[str, Any]:
        """What the tenant's schema holds, as the tenant sees it: the tables to copy (its own
        and the migrations'), and the definitions of what it created itself."""
        relations = await conn.fetch(_TABLES, schema)
        types = [_type_definition(t) for t in await conn.fetch(_TYPES, schema)]
        copy: list[dict[str, Any]] = []
        own_tables: list[dict[str, Any]] = []
        views: list[dict[str, Any]] = []
        by_oid: dict[int, str] = {}
        for rel in relations:
            kind, name = rel["relkind"], rel["relname"]
            if kind == "c":
                continue  # a composite type's relation: carried with the types
            if kind in ("p", "f") or rel["relispartition"]:
                raise BackupUnsupported(
                    f"table {name!r} is partitioned or foreign: tenant exports do not carry"
                    " those yet"
                )
            if kind in ("v", "m"):
                if rel["own"]:
                    definition = await conn.fetchval("SELECT pg_get_viewdef($1::oid)", rel["oid"])
                    views.append({"name": name, "materialized": kind == "m", "query": definition})
                continue
            by_oid[rel["oid"]] = name
            columns = await conn.fetch(_COLUMNS, rel["oid"])
            copied = [c for c in columns if not c["attgenerated"]]
            entry: dict[str, Any] = {
                "kind": "tenant",
                "name": name,
                "columns": [c["attname"] for c in copied],
                # Binary COPY writes the type OIDs of arrays' and composites' elements, which
                # differ for the tenant's own types in another schema: text for those tables.
                "format": "text" if any(c["custom"] for c in copied) else "binary",
                "_source": _qualified(schema, name),
            }
            copy.append(entry)
            if rel["own"]:
                own_tables.append(
                    {
                        "name": name,
                        "unlogged": rel["relpersistence"] == "u",
                        "columns": [
                            {
                                "name": c["attname"],
                                "type": c["type"],
                                "not_null": c["attnotnull"],
                                "default": c["default_expr"],
                                "identity": c["attidentity"] or None,
                                "generated": c["attgenerated"] or None,
                            }
                            for c in columns
                        ],
                        "constraints": [
                            {"name": k["conname"], "type": k["contype"], "definition": k["def"]}
                            for k in await conn.fetch(_CONSTRAINTS, rel["oid"])
                        ],
                        "indexes": [r["def"] for r in await conn.fetch(_INDEXES, rel["oid"])],
                    }
                )
        # Parents before children, so a restore loads each table after those it references.
        graph: dict[str, set[str]] = {name: set() for name in by_oid.values()}
        for ref in await conn.fetch(_REFERENCES, schema):
            child, parent = by_oid.get(ref["child"]), by_oid.get(ref["parent"])
            if child and parent and child != parent:
                graph[child].add(parent)
        try:
            order = list(graphlib.TopologicalSorter(graph).static_order())
        except graphlib.CycleError:
            raise BackupUnsupported(
                "the tenant's tables reference each other in a cycle: a restore cannot order them"
            ) from None
        copy.sort(key=lambda e: order.index(e["name"]))
        for shared in await conn.fetch(_SHARED, self._shared):
            if not shared["insertable"]:
                continue  # derived (candles_1m): the restored rows' triggers rebuild it
            columns = await conn.fetch(_COLUMNS, shared["oid"])
            copy.append(
                {
                    "kind": "shared",
                    "name": shared["relname"],
                    # No company_id: the file carries no tenant key; a restore's rows get the
                    # restoring tenant's from the column's default.
                    "columns": [
                        c["attname"]
                        for c in columns
                        if c["attname"] != "company_id" and not c["attgenerated"]
                    ],
                    "format": "binary",
                    "_source": _qualified(self._shared, shared["relname"]),
                }
            )
        sequences = [
            {
                "name": s["relname"],
                "own": s["own"],
                "identity": s["deptype"] == "i",
                "owned_by": s["owned_by"],
                "definition": (
                    f"AS {s['type']} INCREMENT BY {s['seqincrement']} MINVALUE {s['seqmin']}"
                    f" MAXVALUE {s['seqmax']} START WITH {s['seqstart']} CACHE {s['seqcache']}"
                    f" {'' if s['seqcycle'] else 'NO '}CYCLE"
                ),
            }
            for s in await conn.fetch(_SEQUENCES, schema)
        ]
        return {
            "_copy": copy,
            "tables": own_tables,
            "sequences": sequences,
            "views": views,
            "types": types,
            "functions": [
                {"name": f["proname"], "signature": f["signature"], "definition": f["def"]}
                for f in await conn.fetch(_FUNCTIONS, schema)
                if f["prokind"] in ("f", "p")
            ],
            "triggers": [
                {"name": t["tgname"], "table": t["relname"], "definition": t["def"]}
                for t in await conn.fetch(_TRIGGERS, schema)
            ],
        }

    # ---------------------------------------------------------------- restore

    def open(self, path: Path) -> ArchiveReader:
        """The file with its manifest verified (signature, format); ``verify`` checks members."""
        return ArchiveReader.open(path, self._key)

    async def restore(
        self,
        path: Path,
        *,
        into: str | None = None,
        replace: bool = False,
        progress: ProgressCallback | None = None,
    ) -> RestoreReport:
        """Restore the file into its own tenant, or ``into`` another id (rows re-keyed).
        Refused before anything changes when the file does not verify, names a newer tenant
        schema, or the target holds data and ``replace`` is not given."""
        started = time.monotonic()
        with await asyncio.to_thread(self.open, path) as archive:
            manifest = archive.manifest
            source = manifest["tenant_id"]
            target = validate_tenant_id(into or source)
            known = {m.version for m in self._migrator.tenant_migrations}
            newer = sorted(set(manifest.get("migrations", [])) - known)
            if newer:
                raise BackupUnsupported(
                    f"the backup's tenant schema has migrations {newer} this service does not"
                    " know: restore it with the version that made it or a newer one"
                )
            if progress is not None:
                progress(BackupProgress("verify", "", 0, manifest["totals"]["rows"]))
            # Hashing the whole file: in a thread, not on the event loop.
            await asyncio.to_thread(archive.verify)
            collections = archive.collections()
            vectors = self._vectors
            if collections and vectors is None:
                raise BackupUnsupported(
                    f"the backup holds {len(collections)} vector collections kept on"
                    f" {collections[0].get('store', 'an external store')}, and this service has"
                    " none configured (DBSVC_WEAVIATE_URL)"
                )
            record = await self._registry.find(target)
            if record is not None and vectors is not None:
                have = await vectors.tenant_collections(target)
                if have:
                    # Not even with replace: the store has no transaction, so collections
                    # dropped here could not come back if the restore then failed.
                    raise BackupTargetNotEmpty(
                        f"tenant {target!r} has vector collections on {vectors.kind}"
                        f" ({', '.join(i.name for i in have[:5])}): drop them first (a restore"
                        " cannot replace them and still leave everything as it was if it fails)"
                    )
            created = record is None
            if record is None:
                limits = manifest.get("limits") or {}
                record = await self._manager.create(
                    target,
                    TenantLimits(
                        int(limits.get("connection_limit", 0))
                        or self._manager.default_limits.connection_limit,
                        int(limits.get("statement_timeout_ms", 0))
                        or self._manager.default_limits.statement_timeout_ms,
                    ),
                )
            elif not record.active:
                raise TenantSuspended(
                    f"tenant {target!r} is {record.status}: resume it (or delete it) first"
                )
            try:
                async with self._pools.acquire(self._logins.login(record), "bulk") as conn:
                    rows = await self._restore_on(
                        conn, record, archive, replace=replace and not created, progress=progress
                    )
            except BaseException:
                if collections and vectors is not None:
                    # The target had no collections on the store (checked above): whatever
                    # the restore made there goes with the rolled-back PostgreSQL part.
                    try:
                        await vectors.drop_tenant(target)
                    except Exception:
                        log.exception(
                            "tenant %s: the vector collections of a restore that failed could"
                            " not be dropped: drop them",
                            target,
                        )
                if created:
                    # Nothing of the restore may remain: the tenant it created goes again.
                    try:
                        await self._manager.delete(target, confirm=True)
                    except Exception:
                        log.exception(
                            "tenant %s: created for a restore that failed, and could not be"
                            " deleted again: delete it",
                            target,
                        )
                raise
        return RestoreReport(
            tenant_id=target,
            source_tenant_id=source,
            created=created,
            replaced=replace and not created,
            rows=rows,
            tables=len(manifest["tables"]),
            seconds=time.monotonic() - started,
        )

    async def _restore_on(
        self,
        conn: Connection,
        record: TenantRecord,
        archive: ArchiveReader,
        *,
        replace: bool,
        progress: ProgressCallback | None,
    ) -> int:
        manifest = archive.manifest
        schema = record.schema_name
        rename = _renamer(manifest["source_schema"], schema)
        objects = manifest["objects"]
        own = {t["name"] for t in objects["tables"]}
        async with conn.transaction():
            await conn.execute("SET LOCAL statement_timeout = 0")
            await conn.execute("SET LOCAL idle_in_transaction_session_timeout = 0")
            await conn.execute(
                f"SET LOCAL search_path = {quote_ident(schema)}, {quote_ident(self._shared)}"
            )
            current = await self._definitions(conn, schema)
            if replace:
                await self._clear(conn, schema, current)
                current = await self._definitions(conn, schema)
            else:
                await self._require_empty(conn, record.tenant_id, current)
            existing = {t["name"]: t for t in current["_copy"] if t["kind"] == "tenant"}
            for kind in objects.get("types", []):
                await conn.execute(rename(kind["definition"]))
            for function in objects["functions"]:
                await conn.execute(rename(function["definition"]))
            for seq in objects["sequences"]:
                if seq["own"] and not seq["identity"]:
                    await conn.execute(
                        f"CREATE SEQUENCE {_qualified(schema, seq['name'])} {seq['definition']}"
                    )
            for table in objects["tables"]:
                await conn.execute(_create_table(schema, table, rename))
            shared_tables = {t["name"] for t in current["_copy"] if t["kind"] == "shared"}
            for table in manifest["tables"]:
                if table["kind"] == "tenant" and table["name"] not in own:
                    have = existing.get(table["name"])
                    if have is None or have["columns"] != table["columns"]:
                        raise BackupUnsupported(
                            f"table {table['name']!r} of the backup does not match the tenant"
                            " schema this service creates (another migration level?)"
                        )
                if table["kind"] == "shared" and table["name"] not in shared_tables:
                    raise BackupUnsupported(
                        f"shared table {table['name']!r} of the backup does not exist here"
                    )
            total_rows = manifest["totals"]["rows"]
            total_bytes = manifest["totals"]["bytes"]
            done_rows = done_bytes = 0
            for table in manifest["tables"]:
                meter = _Meter(progress, table, done_rows, total_rows, done_bytes, total_bytes)
                loaded = await self._load(conn, schema, archive, table, meter.advance)
                if loaded != table["rows"]:
                    raise BackupCorrupt(
                        f"table {table['name']!r}: {loaded} rows loaded, the manifest says"
                        f" {table['rows']}"
                    )
                done_rows += loaded
                done_bytes += table["bytes"]
                if progress is not None:
                    progress(
                        BackupProgress(
                            "restore", table["name"], done_rows, total_rows, done_bytes, total_bytes
                        )
                    )
            for table in objects["tables"]:
                for constraint in table["constraints"]:
                    await conn.execute(
                        f"ALTER TABLE {_qualified(schema, table['name'])} ADD CONSTRAINT"
                        f" {quote_ident(constraint['name'])} {rename(constraint['definition'])}"
                    )
                for index in table["indexes"]:
                    await conn.execute(rename(index))
            for seq in objects["sequences"]:
                if seq["own"] and seq["owned_by"] and not seq["identity"]:
                    owner_table, column = seq["owned_by"].split(".", 1)
                    await conn.execute(
                        f"ALTER SEQUENCE {_qualified(schema, seq['name'])} OWNED BY"
                        f" {_qualified(schema, owner_table)}.{quote_ident(column)}"
                    )
                await conn.execute(
                    "SELECT setval($1::regclass, $2, $3)",
                    _qualified(schema, seq["name"]),
                    seq["last_value"],
                    seq["is_called"],
                )
            for view in objects["views"]:
                kind = "MATERIALIZED VIEW" if view["materialized"] else "VIEW"
                await conn.execute(
                    f"CREATE {kind} {_qualified(schema, view['name'])} AS {rename(view['query'])}"
                )
            for trigger in objects["triggers"]:
                await conn.execute(rename(trigger["definition"]))
            # Last, in the open transaction: a collection that fails to load rolls back the
            # PostgreSQL part too (and ``restore`` drops what was made on the store).
            if self._vectors is not None:
                for entry in archive.collections():
                    await self._load_collection(
                        self._vectors, record.tenant_id, archive, entry, progress
                    )
        return done_rows

    async def _load_collection(
        self,
        vectors: ExternalCollections,
        tenant_id: str,
        archive: ArchiveReader,
        entry: dict[str, Any],
        progress: ProgressCallback | None,
    ) -> None:
        info = _collection_info(entry)
        await vectors.restore_collection(tenant_id, info)
        total = int(entry["objects"])
        done = 0
        batch: list[dict[str, Any]] = []

        async def flush() -> None:
            nonlocal done, batch
            if batch:
                done += await vectors.restore_objects(tenant_id, info, batch)
                batch = []
                if progress is not None:
                    progress(BackupProgress("restore", f"vector:{info.name}", done, total))

        rest = b""
        # The checksum is checked again as the bytes are read (see ``_load``).
        for chunk in archive.chunks(entry):
            lines = (rest + chunk).split(b"\n")
            rest = lines.pop()
            for line in lines:
                if line:
                    batch.append(json.loads(line))
                    if len(batch) >= _OBJECTS_PER_BATCH:
                        await flush()
        if rest:
            batch.append(json.loads(rest))
        await flush()
        if done != total:
            raise BackupCorrupt(
                f"vector collection {info.name!r}: {done} objects loaded, the manifest says {total}"
            )

    async def _load(
        self,
        conn: Connection,
        schema: str,
        archive: ArchiveReader,
        table: dict[str, Any],
        advance: Callable[[int], None],
    ) -> int:
        async def source() -> AsyncIterator[bytes]:
            # The checksum is checked again as the bytes go in: a file changed since it was
            # verified raises BackupCorrupt here, and the transaction rolls back.
            for chunk in archive.chunks(table):
                advance(len(chunk))
                yield chunk

        columns = list(table["columns"])
        if table["kind"] == "tenant":
            status = await conn.copy_to_table(
                table["name"], schema_name=schema, columns=columns, source=source(),
                format=table.get("format", "binary"),
            )  # fmt: skip
            return int(status.split()[-1])
        target = _qualified(self._shared, table["name"])
        listed = ", ".join(quote_ident(c) for c in columns)
        stage = _qualified(schema, _STAGE)
        await conn.execute(
            f"CREATE UNLOGGED TABLE {stage} AS SELECT {listed} FROM {target} WITH NO DATA"
        )
        await conn.copy_to_table(
            _STAGE, schema_name=schema, columns=columns, source=source(), format="binary"
        )
        # company_id is not listed: its default, session_company(), keys every row to the
        # tenant whose login this is, and row-level security checks it.
        status = await conn.execute(f"INSERT INTO {target} ({listed}) SELECT {listed} FROM {stage}")
        await conn.execute(f"DROP TABLE {stage}")
        return int(status.split()[-1])

    async def _require_empty(
        self, conn: Connection, tenant_id: str, current: dict[str, Any]
    ) -> None:
        created = [
            kind for kind in ("tables", "views", "functions", "triggers", "types") if current[kind]
        ] + (["sequences"] if any(s["own"] for s in current["sequences"]) else [])
        if created:
            raise BackupTargetNotEmpty(
                f"tenant {tenant_id!r} holds objects of its own ({', '.join(created)}):"
                " restore with replace to drop and replace them"
            )
        for table in current["_copy"]:
            if await conn.fetchval(f"SELECT EXISTS (SELECT 1 FROM {table['_source']})"):
                raise BackupTargetNotEmpty(
                    f"tenant {tenant_id!r} holds data (table {table['name']!r}): restore with"
                    " replace to replace it"
                )

    async def _clear(self, conn: Connection, schema: str, current: dict[str, Any]) -> None:
        """``replace``: what the tenant created goes, the migrations' tables and its shared
        rows are emptied — in the restore's transaction, so a failed restore keeps them."""
        for trigger in current["triggers"]:
            await conn.execute(
                f"DROP TRIGGER {quote_ident(trigger['name'])} ON"
                f" {_qualified(schema, trigger['table'])}"
            )
        for view in reversed(current["views"]):
            kind = "MATERIALIZED VIEW" if view["materialized"] else "VIEW"
            await conn.execute(f"DROP {kind} IF EXISTS {_qualified(schema, view['name'])} CASCADE")
        for table in current["tables"]:
            await conn.execute(f"DROP TABLE IF EXISTS {_qualified(schema, table['name'])} CASCADE")
        for seq in current["sequences"]:
            if seq["own"] and not seq["identity"]:
                await conn.execute(f"DROP SEQUENCE IF EXISTS {_qualified(schema, seq['name'])}")
        for function in current["functions"]:
            # By signature (the search path is the tenant's schema): overloads are apart.
            await conn.execute(f"DROP ROUTINE IF EXISTS {function['signature']} CASCADE")
        for kind in reversed(current["types"]):
            await conn.execute(f"DROP TYPE IF EXISTS {_qualified(schema, kind['name'])} CASCADE")
        own = {t["name"] for t in current["tables"]}
        kept = [
            t["_source"] for t in current["_copy"] if t["kind"] == "tenant" and t["name"] not in own
        ]
        if kept:
            await conn.execute(f"TRUNCATE {', '.join(kept)}")
        for table in current["_copy"]:
            if table["kind"] == "shared":
                # Row-level security limits the DELETE to the tenant's own rows.
                await conn.execute(f"DELETE FROM {table['_source']}")


class _Meter:
    """Restore progress within one table: rows in proportion to its bytes loaded so far."""

    def __init__(
        self,
        progress: ProgressCallback | None,
        table: dict[str, Any],
        rows_before: int,
        rows_total: int,
        bytes_before: int,
        bytes_total: int,
    ) -> None:
        self._progress = progress
        self._table = table
        self._rows = (rows_before, rows_total)
        self._bytes = (bytes_before, bytes_total)
        self._done = 0

    def advance(self, n: int) -> None:
        self._done += n
        if self._progress is None:
            return
        rows, size = self._table["rows"], self._table["bytes"]
        share = rows * self._done // size if size else 0
        self._progress(
            BackupProgress(
                "restore",
                self._table["name"],
                min(self._rows[0] + share, self._rows[1]),
                self._rows[1],
                self._bytes[0] + self._done,
                self._bytes[1],
            )
        )


def _renamer(source_schema: str, target_schema: str) -> Callable[[str], str]:
    """Definitions name the exported tenant's schema (an opaque ``t_<random>``); a restore
    names its own."""
    if source_schema == target_schema:
        return lambda text: text
    pattern = re.compile(rf"(?<![A-Za-z0-9_$]){re.escape(source_schema)}(?![A-Za-z0-9_$])")
    return lambda text: pattern.sub(target_schema, text)


def _type_definition(row: Any) -> dict[str, Any]:
    """``CREATE TYPE`` / ``CREATE DOMAIN`` for a type the tenant created (names as the tenant's
    search path shows them: its own schema's unqualified)."""
    name = quote_ident(row["typname"])
    kind = row["typtype"]
    if kind == "e":
        labels = ", ".join(quote_literal(label) for label in row["labels"] or [])
        definition = f"CREATE TYPE {name} AS ENUM ({labels})"
    elif kind == "c":
        definition = f"CREATE TYPE {name} AS ({', '.join(row['attributes'] or [])})"
    elif kind == "d":
        parts = [f"CREATE DOMAIN {name} AS {row['base']}"]
        if row["typdefault"] is not None:
            parts.append(f"DEFAULT {row['typdefault']}")
        if row["typnotnull"]:
            parts.append("NOT NULL")
        parts.extend(row["checks"] or [])
        definition = " ".join(parts)
    else:
        raise BackupUnsupported(
            f"type {row['typname']!r} is a range type: tenant exports do not carry those yet"
        )
    return {"name": row["typname"], "definition": definition}


def _create_table(schema: str, table: dict[str, Any], rename: Callable[[str], str]) -> str:
    columns = []
    for column in table["columns"]:
        parts = [quote_ident(column["name"]), column["type"]]
        if column["generated"] == "s":
            parts.append(f"GENERATED ALWAYS AS ({rename(column['default'])}) STORED")
        elif column["identity"]:
            always = "ALWAYS" if column["identity"] == "a" else "BY DEFAULT"
            parts.append(f"GENERATED {always} AS IDENTITY")
        elif column["default"] is not None:
            parts.append(f"DEFAULT {rename(column['default'])}")
        if column["not_null"]:
            parts.append("NOT NULL")
        columns.append(" ".join(parts))
    unlogged = "UNLOGGED " if table["unlogged"] else ""
    return f"CREATE {unlogged}TABLE {_qualified(schema, table['name'])} ({', '.join(columns)})"
