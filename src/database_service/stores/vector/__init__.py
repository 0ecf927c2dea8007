"""Vector similarity stores (health name ``weaviate``, the seed's): one ``VectorStore``
interface (``base``), the shared model and checks (``model``), filters compiled to SQL or to
Weaviate's filter (``filters``), the embedded implementation on pgvector (``pgvector``), and
Weaviate by URL (``weaviate``, imported by the composition root where it is configured)."""

from database_service.stores.vector.base import VectorStore
from database_service.stores.vector.model import (
    MAX_BATCH,
    MAX_DIMENSION,
    MAX_LIMIT,
    CollectionExists,
    CollectionInfo,
    CollectionNotFound,
    Hit,
    InvalidCollection,
    InvalidFilter,
    InvalidVector,
    Metric,
    ObjectNotFound,
    PropertyType,
    SearchQuery,
    VectorObject,
    check_dimension,
    check_vector,
    collection_name,
    json_value,
    metric_of,
    object_id,
    parse_properties,
    property_name,
)
from database_service.stores.vector.pgvector import PgVectorStore, VectorStoreUnavailable
from database_service.stores.vector.probe import VectorProbe

__all__ = [
    "MAX_BATCH",
    "MAX_DIMENSION",
    "MAX_LIMIT",
    "CollectionExists",
    "CollectionInfo",
    "CollectionNotFound",
    "Hit",
    "InvalidCollection",
    "InvalidFilter",
    "InvalidVector",
    "Metric",
    "ObjectNotFound",
    "PgVectorStore",
    "PropertyType",
    "SearchQuery",
    "VectorObject",
    "VectorProbe",
    "VectorStore",
    "VectorStoreUnavailable",
    "check_dimension",
    "check_vector",
    "collection_name",
    "json_value",
    "metric_of",
    "object_id",
    "parse_properties",
    "property_name",
]
