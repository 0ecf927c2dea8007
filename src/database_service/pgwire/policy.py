"""What the port does with a statement: the SQL guard's verdict (cached per text and tenant),
the caller's scopes, and the two kinds of statement the guard refuses that a PostgreSQL client
needs: transaction control (the port, not the service, runs a client's transaction here) and
the few session settings the port tracks per client and replays on whichever server
connection runs its next transaction, and the user id (``SET dbsvc.user_id``), tracked by the
port and applied per transaction by ``control.enter_user`` (never set on the server by the
client's SQL).

Every refusal carries the service's stable error code (``sql_rejected``, ``permission_denied``,
...) beside its SQLSTATE; the port sends it in the ErrorResponse's routine field.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any

import pglast
from pglast.enums import TransactionStmtKind, VariableSetKind
from pglast.stream import RawStream

from database_service.auth import Principal, Scope
from database_service.errors import DatabaseServiceError
from database_service.results import StatementKind
from database_service.sqlguard import Classification, SqlGuard
from database_service.textmemo import short_text_cache

__all__ = [
    "TRACKED_SETTINGS",
    "USER_ID_SETTING",
    "Decision",
    "StatementPolicy",
    "driver_catalog_query",
    "reset_batch",
    "valid_user_id",
]

# The user id behind user-level row security, as a client names it (SET, startup option).
USER_ID_SETTING = "dbsvc.user_id"
# As the other front ends accept it (query/executor.py).
_USER_ID = re.compile(r"^[A-Za-z0-9_.@:+-]{1,50}$")

# Settings a client may set (at startup or with SET) because PostgreSQL reports each change
# (ParameterStatus), so the port always knows a server connection's value and can set the
# client's own before lending it. Lower-case name -> the name PostgreSQL reports.
TRACKED_SETTINGS = {
    "application_name": "application_name",
    "timezone": "TimeZone",
    "datestyle": "DateStyle",
    "intervalstyle": "IntervalStyle",
}
_REQUIRED_SCOPE = {
    StatementKind.READ: Scope.READ,
    StatementKind.WRITE: Scope.WRITE,
    StatementKind.DDL: Scope.ADMIN,
}
_TRACKED_SET_KINDS = (
    VariableSetKind.VAR_SET_VALUE,
    VariableSetKind.VAR_SET_DEFAULT,
    VariableSetKind.VAR_RESET,
)
_ALLOWED_TRANSACTION = {
    TransactionStmtKind.TRANS_STMT_BEGIN: "begin",
    TransactionStmtKind.TRANS_STMT_START: "begin",
    TransactionStmtKind.TRANS_STMT_COMMIT: "commit",
    TransactionStmtKind.TRANS_STMT_ROLLBACK: "rollback",
    TransactionStmtKind.TRANS_STMT_SAVEPOINT: "savepoint",
    TransactionStmtKind.TRANS_STMT_RELEASE: "savepoint",
    TransactionStmtKind.TRANS_STMT_ROLLBACK_TO: "savepoint",
}


def valid_user_id(value: str) -> bool:
    return _USER_ID.fullmatch(value) is not None


@dataclass(frozen=True, slots=True)
class Decision:
    """``refused``: (SQLSTATE, message, stable code); else ``control`` names transaction control
    (begin/commit/rollback/savepoint), "set" a tracked setting, "user_id" (``name``: the new
    user id, None to clear it), "deallocate", "rewrite" (``name``: the query to run instead of
    a driver's catalog lookup), or None for a statement the guard accepted
    (``kind``)."""

    kind: StatementKind | None = None
    control: str | None = None
    refused: tuple[str, str, str] | None = None
    name: str | None = None  # DEALLOCATE's statement (None: ALL); the user id for "user_id"
    verdict: Classification | None = None  # the guard's, for the statement figures
    resets: tuple[str, ...] = ()  # control "reset": the batch's statements (see reset_batch)


@short_text_cache(maxsize=2048)
def _session_statement(sql: str) -> tuple[str, Any] | None:
    """A lone statement the port treats itself (transaction control, SET, DEALLOCATE, COPY)
    or refuses in its own words (a session-only feature), or None (the guard's verdict)."""
    try:
        tree = pglast.parse_sql(sql)
    except pglast.parser.ParseError:
        return None
    if len(tree) != 1:
        return None
    stmt = tree[0].stmt
    name = type(stmt).__name__
    feature = _session_only(name, stmt)
    if feature is not None:
        return ("session_only", feature)
    if name == "TransactionStmt":
        return ("transaction", stmt)
    if name == "VariableSetStmt":
        return ("set", stmt)
    if name == "DeallocateStmt":
        return ("deallocate", stmt)
    if name == "CopyStmt":
        return ("copy", stmt)
    return None


_CURSOR_OPT_HOLD = 0x20  # PostgreSQL's CURSOR_OPT_HOLD
# What a pooled driver sends when a connection goes back to *its* pool (asyncpg's reset query,
# PgBouncer's server_reset_query, SQLAlchemy/psycopg pools' DISCARD ALL / RESET ALL). The port
# answers these itself (server.py ``_reset``): none is ever sent to a server connection other
# clients share. The advisory-unlock call is recognised only in exactly this form (its text as
# pglast prints it back): any other target, clause or alias makes it an ordinary statement.
_UNLOCK_ALL = frozenset(
    {"SELECT pg_advisory_unlock_all()", "SELECT pg_catalog.pg_advisory_unlock_all()"}
)
_DISCARD_TAGS = {0: "DISCARD ALL", 1: "DISCARD PLANS", 2: "DISCARD SEQUENCES", 3: "DISCARD TEMP"}


def _reset_kind(stmt: Any) -> str | None:
    """One statement of a driver's reset: its kind, or None for any other statement."""
    name = type(stmt).__name__
    if name == "VariableSetStmt" and stmt.kind == VariableSetKind.VAR_RESET_ALL:
        return "reset_all"
    if name == "DiscardStmt":
        return _DISCARD_TAGS.get(int(stmt.target))
    if name == "UnlistenStmt":
        return "unlisten"  # the port never lets a client LISTEN: nothing to stop
    if name == "ClosePortalStmt" and stmt.portalname is None:
        return "close_all"
    if name == "SelectStmt" and RawStream()(stmt) in _UNLOCK_ALL:
        return "unlock_all"
    if name == "TransactionStmt" and stmt.kind == TransactionStmtKind.TRANS_STMT_ROLLBACK:
        return "rollback"  # asyncpg puts one first when it releases a connection mid-transaction
    return None


@functools.lru_cache(maxsize=256)
def reset_batch(sql: str) -> tuple[str, ...] | None:
    """The kinds of a Query made only of reset statements (one or several: asyncpg sends its
    four as one Query; a ROLLBACK may only come first), or None: then the text is an ordinary
    statement, and several statements in one Query stay refused by the guard as a whole."""
    try:
        tree = pglast.parse_sql(sql)
    except pglast.parser.ParseError:
        return None
    kinds = tuple(_reset_kind(raw.stmt) for raw in tree)
    if not kinds or None in kinds or "rollback" in kinds[1:] or kinds == ("rollback",):
        return None
    return kinds  # type: ignore[return-value]


# What drivers ask the catalog at connect time that the guard refuses (pg_type lists every
# tenant's types, tables' row types included), by its text with whitespace collapsed: the port
# runs instead a query of the same parameters and columns over the types of pg_catalog and the
# tenant's own schema only. The bound name is matched as text against those types' names
# (plain, qualified by their schema, or as ``regtype`` prints them), never resolved by
# ``to_regtype``, which would look into other schemas (and tell by an error which exist).
_TYPE_INFO = (
    "SELECT typname AS name, oid, typarray AS array_oid, oid::regtype::text AS regtype,"
    " typdelim AS delimiter FROM pg_type t WHERE t.oid = {regtype} ORDER BY t.oid"
)
_TYPE_INFO_LIMITED = (
    "SELECT typname AS name, oid, typarray AS array_oid, oid::regtype::text AS regtype,"
    " typdelim AS delimiter FROM pg_catalog.pg_type t"
    " WHERE t.typnamespace IN ('pg_catalog'::regnamespace, {schema}::regnamespace)"
    " AND $1::text IN (t.typname, t.oid::regtype::text, 'pg_catalog.' || t.typname,"
    " {prefix} || t.typname) ORDER BY t.oid"
)
_DRIVER_CATALOG_QUERIES = {
    # psycopg 3's TypeInfo.fetch (SQLAlchemy's psycopg dialect looks up hstore with it).
    _TYPE_INFO.format(regtype=regtype): _TYPE_INFO_LIMITED
    for regtype in ("to_regtype($1)", "$1::regtype")
}


def driver_catalog_query(sql: str, own_schema: str) -> str | None:
    """The tenant-limited query to run instead of a driver's known catalog lookup, or None."""
    template = _DRIVER_CATALOG_QUERIES.get(" ".join(sql.split()))
    if template is None:
        return None
    quoted = '"' + own_schema.replace('"', '""') + '"'
    return template.format(
        schema="'" + quoted.replace("'", "''") + "'",
        prefix="'" + own_schema.replace("'", "''") + ".'",
    )


def _session_only(name: str, stmt: Any) -> str | None:
    """What a statement needs a session for (LISTEN, a WITH HOLD cursor, temporary objects,
    DISCARD / RESET ALL, PREPARE), or None."""
    if name in ("ListenStmt", "UnlistenStmt"):
        return "LISTEN/UNLISTEN"
    if name == "DeclareCursorStmt" and (stmt.options or 0) & _CURSOR_OPT_HOLD:
        return "a WITH HOLD cursor"
    if name == "DiscardStmt":
        return "DISCARD"
    if name == "VariableSetStmt" and stmt.kind == VariableSetKind.VAR_RESET_ALL:
        return "RESET ALL"
    if name in ("PrepareStmt", "ExecuteStmt"):
        return "PREPARE/EXECUTE (the extended protocol's named statements work)"
    for attribute in ("relation", "view", "sequence"):
        relation = getattr(stmt, attribute, None)
        if getattr(relation, "relpersistence", None) == "t":
            return "a temporary object"
    for attribute in ("into", "intoClause"):  # CREATE TABLE AS, SELECT INTO
        into = getattr(stmt, attribute, None)
        if getattr(getattr(into, "rel", None), "relpersistence", None) == "t":
            return "a temporary object"
    return None


def _read_write_requested(stmt: Any) -> bool:
    for option in stmt.options or ():
        if option.defname == "transaction_read_only":
            value = getattr(getattr(option.arg, "val", None), "ival", 1)
            if not value:
                return True
    return False


class StatementPolicy:
    def __init__(self, guard: SqlGuard, shared_schemas: tuple[str, ...]) -> None:
        self._guard = guard
        self._shared = shared_schemas

    @property
    def shared_schemas(self) -> tuple[str, ...]:
        return self._shared

    async def decide(self, sql: str, principal: Principal, own_schema: str) -> Decision:
        try:
            # By shape: a driver that inlines its values (psql, pgbench -M simple, psycopg's
            # client-side binding) sends new text for each statement.
            verdict = await self._guard.classify_shape_async(
                sql, own_schema=own_schema, shared_schemas=self._shared
            )
        except DatabaseServiceError as exc:
            # Only what the guard refused can be a driver's reset: an accepted statement never
            # pays for the check.
            resets = reset_batch(sql) if exc.sqlstate == "42501" else None
            if resets is not None:
                return Decision(control="reset", resets=resets)
            rewritten = driver_catalog_query(sql, own_schema) if exc.sqlstate == "42501" else None
            if rewritten is not None:
                return Decision(kind=StatementKind.READ, control="rewrite", name=rewritten)
            special = _session_statement(sql) if exc.sqlstate == "42501" else None
            if special is None:
                return Decision(refused=(exc.sqlstate or "42501", exc.message, exc.error_code))
            if special[0] == "copy":
                return await self._copy(special[1], principal, own_schema)
            if special[0] == "session_only":
                return Decision(
                    refused=(
                        "0A000",
                        f"{special[1]} needs a session of its own, which this port does not"
                        " give: it pools transactions (each may run on another server"
                        " connection)",
                        "sql_rejected",
                    )
                )
            return self._session(special, principal, exc.message)
        scope = _REQUIRED_SCOPE[verdict.kind]
        if not principal.has_scope(scope):
            return Decision(
                refused=(
                    "42501",
                    f"service {principal.service!r} lacks the {scope.value!r} scope for this"
                    f" {verdict.kind.value} statement",
                    "permission_denied",
                )
            )
        return Decision(kind=verdict.kind, verdict=verdict)

    async def _copy(self, stmt: Any, principal: Principal, own_schema: str) -> Decision:
        """COPY FROM STDIN / TO STDOUT only (never a file or a program: the server's, not the
        tenant's), checked by the guard as the statement it amounts to: ``INSERT INTO rel`` or
        ``SELECT * FROM rel``, or the query of ``COPY (query) TO STDOUT``. PostgreSQL then runs it
        as the tenant's role, which reaches only what the tenant may."""
        if stmt.filename is not None or stmt.is_program:
            return Decision(
                refused=(
                    "42501",
                    "COPY to or from a file or a program is not allowed: use COPY ... FROM STDIN"
                    " or TO STDOUT (psql's \\copy)",
                    "sql_rejected",
                )
            )
        if stmt.whereClause is not None:
            return Decision(
                refused=("0A000", "COPY FROM ... WHERE is not supported through this port",
                         "sql_rejected")
            )  # fmt: skip
        stream = RawStream()
        if stmt.query is not None:
            equivalent = stream(stmt.query)
        elif stmt.is_from:
            equivalent = f"INSERT INTO {stream(stmt.relation)} DEFAULT VALUES"
        else:
            equivalent = f"SELECT * FROM {stream(stmt.relation)}"
        decision = await self.decide(equivalent, principal, own_schema)
        if decision.refused is not None or decision.control is not None:
            refused = decision.refused or ("42501", "COPY of this is not allowed", "sql_rejected")
            return Decision(refused=refused)
        return Decision(kind=decision.kind, control="copy", verdict=decision.verdict)

    @staticmethod
    def _session(special: tuple[str, Any], principal: Principal, refusal: str) -> Decision:
        what, stmt = special
        if what == "deallocate":
            # The client's own statement names, kept by the port: forgotten there, never sent
            # to a server connection that other clients share (drivers send DEALLOCATE ALL
            # after a rollback, psycopg for one).
            return Decision(control="deallocate", name=getattr(stmt, "name", None) or None)
        if what == "transaction":
            control = _ALLOWED_TRANSACTION.get(stmt.kind)
            if control is None:
                return Decision(
                    refused=(
                        "0A000",
                        "two-phase commit is not available through this port",
                        "sql_rejected",
                    )
                )
            writes = control == "begin" and _read_write_requested(stmt)
            if writes and not principal.has_scope(Scope.WRITE):
                return Decision(
                    refused=(
                        "25006",
                        f"service {principal.service!r} is read-only: its transactions are"
                        " READ ONLY",
                        "read_only_transaction",
                    )
                )
            return Decision(control=control)
        name = (stmt.name or "").lower()
        if name == USER_ID_SETTING:
            return _user_id(stmt)
        if stmt.kind in _TRACKED_SET_KINDS and name in TRACKED_SETTINGS:
            return Decision(control="set")
        allowed = ", ".join(sorted(TRACKED_SETTINGS))
        return Decision(
            refused=(
                "42501",
                f"{refusal}; through the PostgreSQL port only these settings can be set"
                f" (tracked per client in transaction pooling): {allowed}, {USER_ID_SETTING}",
                "sql_rejected",
            )
        )


def _user_id(stmt: Any) -> Decision:
    """``SET dbsvc.user_id = 'u'`` / ``RESET dbsvc.user_id``: kept by the port for the client's
    next transactions. ``SET LOCAL`` is refused: the user id of a transaction is fixed when it
    begins (``control.enter_user``), so a change inside one could only be a forgery."""
    if stmt.is_local:
        return Decision(
            refused=(
                "42501",
                f"SET LOCAL {USER_ID_SETTING} is not allowed: the user id applies per"
                f" transaction from the next one on; use SET {USER_ID_SETTING} outside a"
                " transaction block",
                "sql_rejected",
            )
        )
    if stmt.kind in (VariableSetKind.VAR_RESET, VariableSetKind.VAR_SET_DEFAULT):
        return Decision(control="user_id", name=None)
    args = tuple(stmt.args or ())
    value = getattr(args[0], "val", None) if len(args) == 1 else None
    text = getattr(value, "sval", None)
    if text is None and isinstance(getattr(value, "ival", None), int):
        text = str(value.ival)  # type: ignore[union-attr]
    if text is None or not valid_user_id(text):
        return Decision(
            refused=(
                "22023",
                f"{USER_ID_SETTING} must be one value of 1-50 characters of letters, digits"
                " and _ . @ : + -",
                "invalid_parameters",
            )
        )
    return Decision(control="user_id", name=text)
