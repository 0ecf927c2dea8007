"""What a graph request says, validated once for every store.

Names a caller gives — collections, vertex keys, property paths — never become SQL or AQL text:
collections and keys travel as bind parameters (PostgreSQL ``$n``, AQL ``@name``), property
paths as ``text[]`` parameters (``props #> $n``) or AQL attribute bind parameters
(``v.@a0.@a1``). The patterns below exist so that a bad name gets a clear ``400`` with a stable
code before any store sees it, and so that the two stores accept exactly the same names
(ArangoDB's rules for collection names and document keys).
"""

from __future__ import annotations

import enum
import hashlib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from database_service.errors import (
    DepthOutOfRange,
    InvalidFilter,
    InvalidParameters,
)

__all__ = [
    "Aggregate",
    "Direction",
    "Edge",
    "Filter",
    "GraphLimits",
    "Neighborhood",
    "NeighborhoodGroup",
    "Op",
    "PathResult",
    "ShortestPath",
    "TraversalHit",
    "TraversalResult",
    "Traverse",
    "Vertex",
    "check_collection",
    "check_key",
    "edge_key",
    "split_id",
]

# ArangoDB's collection names (letters first; we do not allow its system "_" prefix) and keys.
_COLLECTION = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")
_KEY = re.compile(r"[A-Za-z0-9_\-:.@()+,=;$!*'%]{1,254}")
# A property path: up to four dotted names; none starts with "_" (the stores' own attributes).
_PROPERTY = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,62}")
MAX_PATH_PARTS = 4
MAX_FILTERS = 16
MAX_IN_VALUES = 1000
MAX_BATCH = 10_000
MAX_PROPERTIES_BYTES = 64 * 1024


class Direction(enum.StrEnum):
    OUTBOUND = "outbound"
    INBOUND = "inbound"
    ANY = "any"


class Op(enum.StrEnum):
    EQ = "eq"
    NE = "ne"
    LT = "lt"
    LTE = "lte"
    GT = "gt"
    GTE = "gte"
    IN = "in"


class Aggregate(enum.StrEnum):
    COUNT = "count"
    SUM = "sum"
    AVG = "avg"
    MIN = "min"
    MAX = "max"


def direction_of(name: str) -> Direction:
    try:
        return Direction(name.lower())
    except ValueError:
        raise InvalidParameters("direction must be outbound, inbound or any") from None


def check_collection(name: str) -> str:
    if not isinstance(name, str) or not _COLLECTION.fullmatch(name):
        raise InvalidParameters(
            "a collection name is 1-64 letters, digits, _ and -, starting with a letter"
            f" (not {str(name)[:80]!r})"
        )
    return name


def check_key(key: str) -> str:
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        raise InvalidParameters(
            "a vertex or edge key is 1-254 characters of letters, digits and _-:.@()+,=;$!*'%"
            f" (not {str(key)[:80]!r})"
        )
    return key


def split_id(vertex_id: str) -> tuple[str, str]:
    """``"users/alice"`` → ``("users", "alice")``, both checked."""
    if not isinstance(vertex_id, str) or vertex_id.count("/") != 1:
        raise InvalidParameters(f"a vertex id is 'collection/key' (not {str(vertex_id)[:80]!r})")
    collection, key = vertex_id.split("/")
    return check_collection(collection), check_key(key)


def edge_key(from_id: str, to_id: str) -> str:
    """The key of an edge written without one: the same pair gets the same key, so writing a
    relationship twice is one edge (a copier copies a trader once)."""
    return hashlib.sha256(f"{from_id}\x00{to_id}".encode()).hexdigest()[:24]


def property_path(path: str, *, what: str = "property") -> tuple[str, ...]:
    parts = tuple(path.split(".")) if isinstance(path, str) else ()
    if not 1 <= len(parts) <= MAX_PATH_PARTS or not all(_PROPERTY.fullmatch(p) for p in parts):
        raise InvalidFilter(
            f"a {what} is up to {MAX_PATH_PARTS} dotted names of letters, digits and _,"
            f" each starting with a letter (not {str(path)[:80]!r})"
        )
    return parts


def _json_scalar(value: Any, what: str) -> Any:
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int | float):
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidFilter(f"{what} must be a finite number")
        return value
    raise InvalidFilter(f"{what} must be a string, number, boolean or null")


@dataclass(frozen=True, slots=True)
class Filter:
    """``property op value`` on a vertex's or an edge's properties. eq/ne compare JSON values
    (``1`` is not ``"1"``); lt/lte/gt/gte compare numbers with numbers and strings with strings
    (a property of another type never matches); in takes a list of values."""

    path: tuple[str, ...]
    op: Op
    value: Any

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> Filter:
        if not isinstance(raw, Mapping):
            raise InvalidFilter("a filter is an object: {field, op, value}")
        extra = set(raw) - {"field", "op", "value"}
        if extra:
            raise InvalidFilter(f"a filter has field, op and value only (not {sorted(extra)})")
        path = property_path(raw.get("field", ""), what="filter field")
        try:
            op = Op(str(raw.get("op", "eq")).lower())
        except ValueError:
            raise InvalidFilter(
                f"filter op must be one of {', '.join(o.value for o in Op)}"
            ) from None
        value = raw.get("value")
        if op is Op.IN:
            if not isinstance(value, list) or not 1 <= len(value) <= MAX_IN_VALUES:
                raise InvalidFilter(f"'in' takes a list of 1 to {MAX_IN_VALUES} values")
            value = [_json_scalar(v, "an 'in' value") for v in value]
        else:
            value = _json_scalar(value, "a filter value")
            if op in (Op.LT, Op.LTE, Op.GT, Op.GTE) and (value is None or isinstance(value, bool)):
                raise InvalidFilter(f"'{op.value}' compares numbers or strings")
        return cls(path, op, value)

    def to_dict(self) -> dict[str, Any]:
        return {"field": ".".join(self.path), "op": self.op.value, "value": self.value}


def parse_filters(raw: Sequence[Mapping[str, Any]] | None) -> tuple[Filter, ...]:
    if not raw:
        return ()
    if len(raw) > MAX_FILTERS:
        raise InvalidFilter(f"at most {MAX_FILTERS} filters")
    return tuple(Filter.parse(f) for f in raw)


@dataclass(frozen=True, slots=True)
class GraphLimits:
    """Bounds every store keeps: depth, results, the work a traversal may do, time."""

    max_depth: int = 10
    max_results: int = 10_000
    max_visits: int = 1_000_000
    statement_ms: int = 5_000


def check_depth(min_depth: int, max_depth: int, limits: GraphLimits) -> None:
    if not 0 <= min_depth <= max_depth <= limits.max_depth:
        raise DepthOutOfRange(
            f"depth must be 0 <= min ({min_depth}) <= max ({max_depth}) <= {limits.max_depth}"
        )


def _properties(raw: Any) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise InvalidParameters("properties are a JSON object")
    for name in raw:
        if not isinstance(name, str) or name.startswith("_") or not name:
            raise InvalidParameters(
                "property names are non-empty and do not start with '_' (the store's own)"
            )
    return raw


@dataclass(frozen=True, slots=True)
class Vertex:
    collection: str
    key: str
    properties: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.collection}/{self.key}"

    @classmethod
    def of(cls, collection: str, key: str, properties: Any = None) -> Vertex:
        return cls(check_collection(collection), check_key(key), _properties(properties))

    def to_dict(self) -> dict[str, Any]:
        return {
            "_id": self.id,
            "_key": self.key,
            "_collection": self.collection,
            "properties": self.properties,
        }


@dataclass(frozen=True, slots=True)
class Edge:
    collection: str
    key: str
    from_id: str
    to_id: str
    properties: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.collection}/{self.key}"

    @classmethod
    def of(
        cls,
        collection: str,
        from_id: str,
        to_id: str,
        key: str | None = None,
        properties: Any = None,
    ) -> Edge:
        check_collection(collection)
        split_id(from_id)
        split_id(to_id)
        key = edge_key(from_id, to_id) if key is None or key == "" else check_key(key)
        return cls(collection, key, from_id, to_id, _properties(properties))

    def to_dict(self) -> dict[str, Any]:
        return {
            "_id": self.id,
            "_key": self.key,
            "_collection": self.collection,
            "_from": self.from_id,
            "_to": self.to_id,
            "properties": self.properties,
        }


@dataclass(frozen=True, slots=True)
class Traverse:
    """A traversal from ``start``: vertices reached at min..max steps along edges of
    ``edge_collections`` (all of the tenant's when empty) in ``direction``, each vertex once, at
    the fewest steps it is reached in, with the path it was first reached by. ``edge_filters``
    hold for every edge walked (an edge failing them is not followed); ``vertex_filters`` and
    ``vertex_collections`` select which reached vertices are returned."""

    start: str
    direction: Direction = Direction.OUTBOUND
    min_depth: int = 1
    max_depth: int = 1
    edge_collections: tuple[str, ...] = ()
    vertex_collections: tuple[str, ...] = ()
    edge_filters: tuple[Filter, ...] = ()
    vertex_filters: tuple[Filter, ...] = ()
    limit: int = 1000

    def check(self, limits: GraphLimits) -> None:
        split_id(self.start)
        check_depth(self.min_depth, self.max_depth, limits)
        for name in (*self.edge_collections, *self.vertex_collections):
            check_collection(name)
        if not 1 <= self.limit <= limits.max_results:
            raise InvalidParameters(f"limit must be 1 to {limits.max_results}")


@dataclass(frozen=True, slots=True)
class ShortestPath:
    """The shortest path from ``start`` to ``end`` along edges of ``edge_collections`` (all
    when empty) satisfying ``edge_filters``, of at most ``max_depth`` edges.

    Unweighted (``weight_attribute`` None): the fewest steps. Weighted, as ArangoDB's
    ``weightAttribute``/``defaultWeight``: the least sum of each edge's ``weight_attribute``
    (a property path), ``default_weight`` where an edge has no number there; ties go to fewer
    steps. Weights must not be negative (an edge with a negative weight is refused, as
    ArangoDB refuses it), so a path's weight only grows along it."""

    start: str
    end: str
    direction: Direction = Direction.OUTBOUND
    max_depth: int = 6
    edge_collections: tuple[str, ...] = ()
    edge_filters: tuple[Filter, ...] = ()
    weight_attribute: str | None = None
    default_weight: float = 1.0

    @property
    def weight_path(self) -> tuple[str, ...] | None:
        if self.weight_attribute is None:
            return None
        return property_path(self.weight_attribute, what="weight attribute")

    def check(self, limits: GraphLimits) -> None:
        split_id(self.start)
        split_id(self.end)
        check_depth(1, self.max_depth, limits)
        for name in self.edge_collections:
            check_collection(name)
        self.weight_path  # noqa: B018 -- parses it: a bad path is a 400 before any store
        weight = self.default_weight
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise InvalidParameters("default_weight must be a number")
        if not math.isfinite(weight) or weight < 0:
            raise InvalidParameters("default_weight must be a finite number >= 0")


@dataclass(frozen=True, slots=True)
class TraversalHit:
    vertex: Vertex
    depth: int
    path: list[str]  # vertex ids, start first
    edges: list[str]  # edge ids walked, in order

    def to_dict(self) -> dict[str, Any]:
        return {
            "vertex": self.vertex.to_dict(),
            "depth": self.depth,
            "path": self.path,
            "edges": self.edges,
        }


@dataclass(slots=True)
class TraversalResult:
    hits: list[TraversalHit]
    truncated: bool  # more vertices matched than ``limit``


@dataclass(slots=True)
class PathResult:
    """A shortest path: vertex ids from start to end and the edge ids between them; ``found``
    False (empty lists) when none exists within ``max_depth``."""

    found: bool
    vertices: list[str]
    edges: list[str]
    weight: float | None = None  # the path's total weight, for a weighted search

    @property
    def length(self) -> int:
        return len(self.edges)


@dataclass(frozen=True, slots=True)
class Neighborhood:
    """The vertices within 1..``depth`` steps of ``start`` (as ``Traverse`` reaches them) —
    aggregated: ``function`` of ``of_field`` (a vertex property, or with ``of_edges`` a property
    of the edges walked), per value of ``group_by`` (a vertex property) when given. ``count``
    counts vertices (edges with ``of_edges``) and needs no field. Vertices (edges) without a
    numeric value of the field are left out of sum/avg/min/max."""

    start: str
    depth: int = 1
    direction: Direction = Direction.OUTBOUND
    edge_collections: tuple[str, ...] = ()
    vertex_collections: tuple[str, ...] = ()
    edge_filters: tuple[Filter, ...] = ()
    vertex_filters: tuple[Filter, ...] = ()
    function: Aggregate = Aggregate.COUNT
    of_field: tuple[str, ...] | None = None
    of_edges: bool = False
    group_by: tuple[str, ...] | None = None

    def check(self, limits: GraphLimits) -> None:
        split_id(self.start)
        check_depth(1, self.depth, limits)
        for name in (*self.edge_collections, *self.vertex_collections):
            check_collection(name)
        if self.function is not Aggregate.COUNT and self.of_field is None:
            raise InvalidFilter(f"{self.function.value} needs a field to aggregate")

    def traverse(self) -> Traverse:
        return Traverse(
            self.start,
            self.direction,
            1,
            self.depth,
            self.edge_collections,
            self.vertex_collections,
            self.edge_filters,
            self.vertex_filters,
        )


@dataclass(frozen=True, slots=True)
class NeighborhoodGroup:
    group: Any  # the group_by value (None: no group_by, or vertices without the property)
    count: int  # vertices (or edges) in the group
    value: float | int | None  # the aggregate (count: the count)

    def to_dict(self) -> dict[str, Any]:
        return {"group": self.group, "count": self.count, "value": self.value}


def aggregate_of(name: str) -> Aggregate:
    try:
        return Aggregate(name.lower())
    except ValueError:
        raise InvalidFilter(
            f"aggregate must be one of {', '.join(a.value for a in Aggregate)}"
        ) from None
