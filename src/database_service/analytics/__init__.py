"""Analytics on ClickHouse (issue 12): replication from PostgreSQL, tenant SQL behind a guard on
ClickHouse's own parse tree, and the reports. The store itself is ``stores.clickhouse``."""
