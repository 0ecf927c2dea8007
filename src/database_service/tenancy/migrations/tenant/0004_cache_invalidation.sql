-- Watch the tenant's existing tables for cache invalidation (runs with search_path =
-- {{schema}}; see control migration 0009). Tables created later are watched by the event
-- trigger there. The ingestion staging tables are not watched: they hold no rows outside a
-- transaction.
SELECT {{control}}.cache_watch(c.oid::regclass)
FROM pg_class c
WHERE c.relnamespace = current_schema()::regnamespace
  AND c.relkind IN ('r', 'p')
  AND c.relname NOT LIKE '\_ingest\_%';
