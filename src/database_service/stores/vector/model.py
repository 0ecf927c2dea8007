"""What a vector store holds, whichever implementation: collections (Weaviate's "classes") with
typed properties and one vector per object, and the checks every front end's input goes through
before a store sees it.

Names are checked against strict patterns here, once: a collection name or property name that
reaches SQL (``stores.vector.pgvector``) has passed ``collection_name``/``property_name``, and is
quoted as well. Vectors are checked for their dimension and for NaN/infinity (PostgreSQL would
refuse NaN in a ``vector`` too, but as a 500-looking driver error, after the round trip).
"""

from __future__ import annotations

import datetime as dt
import enum
import math
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from database_service.errors import Conflict, InvalidRequest, NotFound

__all__ = [
    "MAX_BATCH",
    "MAX_DIMENSION",
    "MAX_LIMIT",
    "MAX_PROPERTIES",
    "CollectionExists",
    "CollectionInfo",
    "CollectionNotFound",
    "Hit",
    "InvalidCollection",
    "InvalidFilter",
    "InvalidVector",
    "Metric",
    "ObjectNotFound",
    "PropertyType",
    "SearchQuery",
    "VectorObject",
    "check_dimension",
    "check_vector",
    "collection_name",
    "json_value",
    "metric_of",
    "object_id",
    "object_row",
    "parse_properties",
    "property_name",
    "property_value",
]

# pgvector's HNSW indexes take vectors of up to 2,000 dimensions (``vector`` type).
MAX_DIMENSION = 2000
MAX_PROPERTIES = 64
MAX_LIMIT = 1000
MAX_BATCH = 10_000
# A collection name is Weaviate's class name shape (a letter first); a property name is lower
# case, as PostgreSQL folds unquoted names (a tenant's own SQL can then name the column bare).
_COLLECTION = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,47}$")
_PROPERTY = re.compile(r"^[a-z][a-z0-9_]{0,47}$")
RESERVED_PROPERTIES = frozenset({"id", "vector", "distance", "certainty"})


class CollectionNotFound(NotFound):
    code = "collection_not_found"


class ObjectNotFound(NotFound):
    code = "object_not_found"


class CollectionExists(Conflict):
    code = "collection_exists"


class InvalidCollection(InvalidRequest):
    """A collection or property name, or a collection definition, that is not allowed."""

    code = "invalid_collection"


class InvalidVector(InvalidRequest):
    """A vector of the wrong dimension, or with NaN or infinite values."""

    code = "invalid_vector"


class InvalidFilter(InvalidRequest):
    code = "invalid_filter"


class Metric(enum.StrEnum):
    """The distance an index and a search use. ``distance`` as Weaviate reports it: cosine
    distance (1 - cosine similarity, 0..2), Euclidean distance (L2), and the negative inner
    product (``dot``: smaller is closer)."""

    COSINE = "cosine"
    L2 = "l2"
    DOT = "dot"


class PropertyType(enum.StrEnum):
    TEXT = "text"
    INT = "int"
    NUMBER = "number"
    BOOL = "bool"
    DATE = "date"
    UUID = "uuid"
    TEXT_ARRAY = "text[]"


@dataclass(frozen=True, slots=True)
class CollectionInfo:
    name: str
    dimension: int
    metric: Metric
    properties: Mapping[str, PropertyType]
    count: int | None = None  # filled where asked for (get, list)

    def to_dict(self) -> dict[str, Any]:
        document: dict[str, Any] = {
            "name": self.name,
            "dimension": self.dimension,
            "metric": self.metric.value,
            "properties": {k: v.value for k, v in self.properties.items()},
        }
        if self.count is not None:
            document["count"] = self.count
        return document


@dataclass(slots=True)
class VectorObject:
    id: uuid.UUID
    vector: list[float] | None
    properties: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Hit:
    id: uuid.UUID
    distance: float
    certainty: float | None  # cosine collections only (Weaviate defines it for cosine alone)
    properties: dict[str, Any]
    vector: list[float] | None = None


@dataclass(frozen=True, slots=True)
class SearchQuery:
    vector: Sequence[float]
    limit: int = 10
    certainty: float | None = None  # at least this (cosine only)
    distance: float | None = None  # at most this
    where: Mapping[str, Any] | None = None
    with_vector: bool = False


def collection_name(name: object) -> str:
    if not isinstance(name, str) or not _COLLECTION.fullmatch(name):
        raise InvalidCollection(
            "a collection name is a letter then up to 47 letters, digits or underscores,"
            f" not {str(name)[:60]!r}"
        )
    return name


def property_name(name: object) -> str:
    if not isinstance(name, str) or not _PROPERTY.fullmatch(name):
        raise InvalidCollection(
            "a property name is a lower-case letter then up to 47 lower-case letters, digits or"
            f" underscores, not {str(name)[:60]!r}"
        )
    if name in RESERVED_PROPERTIES:
        raise InvalidCollection(f"{name!r} is reserved (id, vector, distance, certainty)")
    return name


def parse_properties(properties: Mapping[str, object]) -> dict[str, PropertyType]:
    if len(properties) > MAX_PROPERTIES:
        raise InvalidCollection(f"at most {MAX_PROPERTIES} properties")
    parsed = {}
    for name, kind in properties.items():
        try:
            parsed[property_name(name)] = PropertyType(str(kind))
        except ValueError:
            known = ", ".join(t.value for t in PropertyType)
            raise InvalidCollection(f"property {name!r}: type is one of {known}") from None
    return parsed


def check_dimension(dimension: object) -> int:
    if isinstance(dimension, bool) or not isinstance(dimension, int):
        raise InvalidCollection("dimension must be an integer")
    if not 1 <= dimension <= MAX_DIMENSION:
        raise InvalidCollection(f"dimension must be 1 to {MAX_DIMENSION}")
    return dimension


def metric_of(name: object) -> Metric:
    try:
        return Metric(str(name).lower())
    except ValueError:
        raise InvalidCollection("metric is one of cosine, l2, dot") from None


def check_vector(vector: object, dimension: int) -> list[float]:
    """``vector`` as floats, or InvalidVector: a sequence of ``dimension`` finite numbers."""
    if isinstance(vector, str | bytes) or not isinstance(vector, Sequence):
        raise InvalidVector("a vector is a list of numbers")
    if len(vector) != dimension:
        raise InvalidVector(
            f"the collection's vectors have {dimension} dimensions, not {len(vector)}"
        )
    try:
        values = [float(v) for v in vector if not isinstance(v, bool)]
    except (TypeError, ValueError):
        raise InvalidVector("a vector is a list of numbers") from None
    if len(values) != dimension:
        raise InvalidVector("a vector is a list of numbers (not booleans)")
    if not all(math.isfinite(v) for v in values):
        raise InvalidVector("a vector's values must be finite (no NaN or infinity)")
    return values


def object_id(value: object) -> uuid.UUID:
    if isinstance(value, uuid.UUID):
        return value
    try:
        return uuid.UUID(str(value))
    except ValueError:
        raise InvalidRequest(f"an object id is a UUID, not {str(value)[:60]!r}") from None


_INT64 = (-(2**63), 2**63 - 1)


def property_value(kind: PropertyType, value: object, what: str) -> Any:
    """A JSON-ish value as the Python value for ``kind`` (what asyncpg encodes for its column);
    None stays None. ``error`` raised on a mismatch: InvalidRequest, or InvalidFilter for a
    filter's operand (the caller passes ``what`` to say which)."""
    if value is None:
        return None
    error = InvalidFilter if what.startswith("filter") else InvalidRequest
    if kind is PropertyType.TEXT:
        if isinstance(value, str):
            if "\x00" in value:
                raise error(f"{what}: text cannot hold NUL")
            return value
    elif kind is PropertyType.INT:
        if isinstance(value, int) and not isinstance(value, bool):
            if not _INT64[0] <= value <= _INT64[1]:
                raise error(f"{what}: outside 64-bit integers")
            return value
    elif kind is PropertyType.NUMBER:
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value)
            if not math.isfinite(number):
                raise error(f"{what}: must be finite")
            return number
    elif kind is PropertyType.BOOL:
        if isinstance(value, bool):
            return value
    elif kind is PropertyType.DATE:
        moment = value
        if isinstance(value, str):
            try:
                moment = dt.datetime.fromisoformat(value)
            except ValueError:
                raise error(f"{what}: not an ISO 8601 date-time") from None
        if isinstance(moment, dt.datetime):
            return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)
    elif kind is PropertyType.UUID:
        try:
            return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))
        except ValueError:
            raise error(f"{what}: not a UUID") from None
    elif isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):  # text[]
        if any("\x00" in v for v in value):
            raise error(f"{what}: text cannot hold NUL")
        return list(value)
    raise error(f"{what}: expected {kind.value}, got {type(value).__name__}")


def json_value(value: Any) -> Any:
    """A property value as JSON carries it (dates as ISO 8601, UUIDs as text)."""
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    return value


def object_row(
    info: CollectionInfo, names: list[str], obj: Mapping[str, Any], number: int
) -> list[Any]:
    """An object to write (``{"id", "vector", "properties"}``) checked against the collection:
    ``[id, vector, *values of names]`` (a missing id gets a new one; properties left out are
    None). ``number`` (from 1) names the object in errors."""
    if not isinstance(obj, Mapping):
        raise InvalidRequest(f"object {number}: an object is a mapping")
    extra = set(obj) - {"id", "vector", "properties"}
    if extra:
        raise InvalidRequest(f"object {number}: unknown fields {', '.join(sorted(extra))[:80]}")
    raw_id = obj.get("id")
    oid = uuid.uuid4() if raw_id is None else object_id(raw_id)
    try:
        vector = check_vector(obj.get("vector"), info.dimension)
    except InvalidVector as exc:
        exc.message = f"object {number}: {exc.message}"
        raise
    properties = obj.get("properties") or {}
    if not isinstance(properties, Mapping):
        raise InvalidRequest(f"object {number}: properties is a mapping")
    unknown = [p for p in properties if p not in info.properties]
    if unknown:
        raise InvalidRequest(
            f"object {number}: the collection has no property {str(unknown[0])[:60]!r}"
        )
    return [
        oid,
        vector,
        *(
            property_value(info.properties[p], properties.get(p), f"object {number}, {p!r}")
            for p in names
        ),
    ]
